"""Errors that the CLI reports as plain messages instead of tracebacks.

Every error a user can fix by changing a recipe, a file or an installed package derives from
`AdapterCliError`; the CLI catches it, prints one line per problem and exits non-zero.
"""

from __future__ import annotations


class AdapterCliError(Exception):
    """Base class for errors with a message meant for the user, not a traceback."""


class RecipeError(AdapterCliError):
    """A recipe failed validation; `problems` lists every problem found, one line each.

    Each problem starts with the dotted path of the offending key, e.g.
    ``train.batch_size: expected int, got 'abc'``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class AdapterError(AdapterCliError):
    """Misuse of the adapter API: unknown names, collisions, wrong state."""
