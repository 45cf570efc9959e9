"""Composition blocks: how several adapters combine in one forward pass.

``Stack("a", "b")`` runs ``a`` then ``b`` at every place both sit (bottleneck adapters in order;
LoRA deltas summed; prefixes joined). The other blocks (``Fuse``, ``Split``, ``BatchSplit``,
``Parallel``, ``Average``) are accepted by ``set_active_adapters`` and validated, and are executed
by the composition engine (AdapterFusion and friends) — until then activating them says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import AdapterCliError


class CompositionBlock:
    """A named combination of adapters (or nested blocks)."""

    def __init__(self, *children: str | CompositionBlock):
        if not children:
            raise AdapterCliError(f"{type(self).__name__} needs at least one adapter")
        self.children = [parse(c) if not isinstance(c, str) else c for c in children]

    def flatten(self) -> list[str]:
        """All adapter names, in order of first appearance."""
        names: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.flatten():
                if name not in names:
                    names.append(name)
        return names

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.children == other.children  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.children)))


class Stack(CompositionBlock):
    pass


class Fuse(CompositionBlock):
    pass


class Parallel(CompositionBlock):
    pass


class Average(CompositionBlock):
    def __init__(self, *children: str | CompositionBlock, weights: Sequence[float] | None = None):
        super().__init__(*children)
        self.weights = list(weights) if weights is not None else None


class Split(CompositionBlock):
    def __init__(self, *children: str | CompositionBlock, splits: int | Sequence[int]):
        super().__init__(*children)
        self.splits = splits


class BatchSplit(CompositionBlock):
    def __init__(self, *children: str | CompositionBlock, batch_sizes: int | Sequence[int]):
        super().__init__(*children)
        self.batch_sizes = batch_sizes


def parse(setup: str | Sequence | CompositionBlock | None) -> CompositionBlock | None:
    """``"a"`` -> Stack("a"); a list -> Stack(...); a block stays as it is; None stays None."""
    if setup is None or isinstance(setup, CompositionBlock):
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, Sequence):
        return Stack(*setup)
    raise AdapterCliError(f"cannot activate {setup!r}: give an adapter name, a list or a composition block")
