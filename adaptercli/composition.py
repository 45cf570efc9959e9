"""Composition blocks: how several adapters combine in one forward pass.

* ``Stack("a", "b")``: ``a`` then ``b`` at every place both sit (bottleneck adapters in order,
  LoRA deltas added one after the other, prefixes joined).
* ``Fuse("a", "b")``: AdapterFusion: an attention over the members' outputs (bottleneck only; the
  fusion layer is added with ``add_adapter_fusion``).
* ``Parallel("a", "b")``: the batch is replicated once per child at the model input; rows
  ``[i*B, (i+1)*B)`` run child ``i``, so one forward pass gives every child's output (and head).
* ``BatchSplit("a", "b", batch_sizes=[2, 3])``: the first 2 rows run ``a``, the next 3 ``b``.
* ``Split("a", "b", splits=[4, 6])``: the first 4 tokens of each sequence run ``a``, the next 6 ``b``.
* ``Average("a", "b", weights=[0.7, 0.3])``: the weighted sum of the children's outputs (weights
  normalised to sum to 1 unless ``normalize_weights=False``).

Blocks nest as in AdapterHub (:data:`ALLOWED_NESTING`, at most two levels of blocks, and a nested
``Stack`` holds names only). A list is shorthand for a Stack, a list inside it for a Fuse:
``[["a", "b"], "c"]`` is ``Stack(Fuse("a", "b"), "c")``.

How a block runs is the same for every method family and written once, in :func:`run`: a family
provides a :class:`Composer` that knows its own per-site state (bottleneck hidden states, a
linear layer's input and output, the prefixes of each row) and how to slice, join and average it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from .errors import AdapterCliError

# A row of a mixed batch (or a BatchSplit group) that runs no adapter: the backbone as it is (PEFT's name).
BASE = "__base__"


class CompositionError(AdapterCliError):
    """A composition that cannot run: bad nesting, sizes that do not fit the batch, or a block
    that the adapters' method does not support."""


class CompositionBlock:
    """A named combination of adapters (or nested blocks)."""

    def __init__(self, *children: str | CompositionBlock | Sequence):
        if not children:
            raise CompositionError(f"{type(self).__name__} needs at least one adapter")
        self.children: list[str | CompositionBlock] = [_parse_child(c, 2) for c in children]

    def flatten(self) -> list[str]:
        """All adapter names, in order of first appearance."""
        names: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.flatten():
                if name not in names:
                    names.append(name)
        return names

    def first(self) -> str:
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    @property
    def parallel_channels(self) -> int:
        """How many copies of the batch the model runs (more than 1 only with ``Parallel``)."""
        return max(1 if isinstance(c, str) else c.parallel_channels for c in self.children)

    def _options(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        """AdapterHub's serialised form (``{"type": "Stack", "children": [...], "kwargs": {...}}``)."""
        data: dict[str, Any] = {"type": type(self).__name__, "children": [
            {"type": "single", "children": [c]} if isinstance(c, str) else c.to_dict() for c in self.children]}
        if self._options():
            data["kwargs"] = self._options()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompositionBlock:
        kind = data.get("type")
        if kind not in BLOCKS:
            raise CompositionError(f"unknown composition block '{kind}'; known: {', '.join(BLOCKS)}")
        children = [c["children"][0] if c["type"] == "single" else cls.from_dict(c) for c in data["children"]]
        return BLOCKS[kind](*children, **data.get("kwargs", {}))

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{options})"

    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and self.children == other.children  # type: ignore[attr-defined]
                and self._options() == other._options())  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))


class Stack(CompositionBlock):
    """Run the children one after the other."""


class Fuse(CompositionBlock):
    """AdapterFusion over the children; ``name`` defaults to the members joined by commas."""

    def __init__(self, *children: str | CompositionBlock, name: str | None = None):
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def _options(self) -> dict[str, Any]:
        return {"name": self._name} if self._name else {}


class Parallel(CompositionBlock):
    """Replicate the batch and run each child on its own copy."""

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Average(CompositionBlock):
    """The weighted sum of the children's outputs; equal weights by default."""

    def __init__(self, *children: str | CompositionBlock, weights: Sequence[float] | None = None,
                 normalize_weights: bool = True):
        super().__init__(*children)
        weights = [1.0] * len(self.children) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.children):
            raise CompositionError(f"Average has {len(self.children)} children but {len(weights)} weights")
        if normalize_weights:
            total = sum(weights)
            if total == 0:
                raise CompositionError("Average weights sum to 0 and cannot be normalised; pass normalize_weights=False")
            weights = [w / total for w in weights]
        self.weights = weights

    def _options(self) -> dict[str, Any]:
        return {"weights": self.weights}


def _sizes(block: str, sizes: int | Sequence[int], n: int, what: str) -> list[int]:
    sizes = [sizes] * n if isinstance(sizes, int) else [int(s) for s in sizes]
    if len(sizes) != n or any(s < 0 for s in sizes):
        raise CompositionError(f"{block} needs one {what} (>= 0) per child: {n} children, got {sizes}")
    return sizes


class Split(CompositionBlock):
    """Split each sequence by position: child ``i`` runs on the next ``splits[i]`` tokens."""

    def __init__(self, *children: str | CompositionBlock, splits: int | Sequence[int]):
        super().__init__(*children)
        self.splits = _sizes("Split", splits, len(self.children), "split length")

    def _options(self) -> dict[str, Any]:
        return {"splits": self.splits}


class BatchSplit(CompositionBlock):
    """Split the batch by rows: child ``i`` runs on the next ``batch_sizes[i]`` rows."""

    def __init__(self, *children: str | CompositionBlock, batch_sizes: int | Sequence[int]):
        super().__init__(*children)
        self.batch_sizes = _sizes("BatchSplit", batch_sizes, len(self.children), "batch size")

    def _options(self) -> dict[str, Any]:
        return {"batch_sizes": self.batch_sizes}


BLOCKS: dict[str, type[CompositionBlock]] = {
    b.__name__: b for b in (Stack, Fuse, Parallel, Average, Split, BatchSplit)}
# The same blocks by the names a recipe gives them (``composition.type``: stack, ..., batch_split).
RECIPE_BLOCKS: dict[str, type[CompositionBlock]] = {
    re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(): block for name, block in BLOCKS.items()}

# What each block may hold (AdapterHub's table). Below the first level only Stack may appear, and a
# nested Stack holds adapter names only.
ALLOWED_NESTING: dict[type[CompositionBlock], tuple[type, ...]] = {
    Stack: (str, Fuse, Split, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
}


def _names(types: tuple[type, ...]) -> str:
    return ", ".join("adapter names" if t is str else t.__name__ for t in types)


def validate(block: CompositionBlock, level: int = 0) -> None:
    """Raise CompositionError for a nesting AdapterHub does not allow."""
    allowed = ALLOWED_NESTING[type(block)]
    if level >= 1:  # below the top only a Stack of names may appear
        allowed = (str,) if isinstance(block, Stack) else tuple(t for t in allowed if t in (str, Stack))
    for child in block.children:
        if isinstance(child, str):
            continue
        if type(child) not in allowed:
            raise CompositionError(
                f"cannot nest {type(child).__name__} inside {type(block).__name__}"
                f"{' (itself nested)' if level else ''}: it may hold {_names(allowed)} there")
        validate(child, level + 1)


def _parse_child(child: Any, level: int) -> str | CompositionBlock:
    if isinstance(child, str | CompositionBlock):
        return child
    if isinstance(child, Sequence):  # AdapterHub's list shorthand: a list inside a Stack is a Fuse
        return (Fuse if level == 1 else Stack)(*[_parse_child(c, level + 1) for c in child])
    raise CompositionError(f"cannot read {child!r} as an adapter name or composition block")


def parse(setup: str | Sequence | CompositionBlock | None) -> CompositionBlock | None:
    """``"a"`` -> Stack("a"); ``["a", "b"]`` -> Stack("a", "b"); ``[["a", "b"], "c"]`` ->
    Stack(Fuse("a", "b"), "c"); a block is validated and kept; None stays None."""
    if setup is None:
        return None
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, CompositionBlock):
        block = setup
    elif isinstance(setup, Sequence):
        if not setup:
            return None
        block = Stack(*[_parse_child(c, 1) for c in setup])
    else:
        raise CompositionError(f"cannot activate {setup!r}: give an adapter name, a list or a composition block")
    validate(block)
    return block


def blocks_in(block: CompositionBlock) -> list[CompositionBlock]:
    """The block and every block nested in it."""
    found = [block]
    for child in block.children:
        if not isinstance(child, str):
            found += blocks_in(child)
    return found


def is_plain_stack(block: CompositionBlock | None) -> bool:
    return block is None or (type(block) is Stack and all(isinstance(c, str) for c in block.children))


def end_node(block: CompositionBlock, end: str = "last") -> str | CompositionBlock:
    """The block's last (``end="first"``: first) element below any Stacks."""
    node: str | CompositionBlock = block
    while isinstance(node, Stack) and node.children:
        node = node.children[-1 if end == "last" else 0]
    return node


def row_groups(block: CompositionBlock, batch: int, end: str = "last") -> list[tuple[slice, str | CompositionBlock]]:
    """How the rows of a (replicated) batch map to children of a row-splitting block.

    ``end="last"`` looks at the block's last element (what the heads read: ``Stack("x",
    Parallel("a", "b"))`` -> a head per child), ``"first"`` at its first (what the embeddings-level
    invertible adapters read). Without a Parallel/BatchSplit there, one group holds every row.
    """
    node = end_node(block, end)
    if isinstance(node, Parallel):
        size = batch // len(node.children)
        return [(slice(i * size, (i + 1) * size), child) for i, child in enumerate(node.children)]
    if isinstance(node, BatchSplit):
        _check_rows(node, batch)
        starts = [sum(node.batch_sizes[:i]) for i in range(len(node.children) + 1)]
        return [(slice(starts[i], starts[i + 1]), child) for i, child in enumerate(node.children)]
    return [(slice(0, batch), block)]


def split_rows(block: str | CompositionBlock, batch: int) -> list[tuple[slice, str | CompositionBlock]] | None:
    """A block that splits the batch at its top (a Parallel or BatchSplit): each group's rows and
    child; else None. A site can then run each group end to end and join only its output, instead
    of joining every piece of its state after the split (what :func:`run` does, as it must when
    more follows the split)."""
    return row_groups(block, batch) if isinstance(block, Parallel | BatchSplit) else None


def touches(node: str | CompositionBlock, composer: Composer) -> bool:
    """Whether ``node`` has an adapter at the composer's site (else running it changes nothing)."""
    return any(composer.has(n) for n in ([node] if isinstance(node, str) else node.flatten()))


def rows_by_setup(setups: Sequence[str | CompositionBlock], key: Callable[[str | CompositionBlock], Any] | None = None,
                  ) -> tuple[list[int], str | CompositionBlock]:
    """Rows that each name their own adapter or block, as one forward pass: the order that puts
    rows naming the same setup next to each other (stable, setups in order of first appearance,
    then sorted by ``key`` of the setup where given) and what runs on the reordered rows: the one
    setup, or a BatchSplit over them."""
    groups: dict[str, tuple[str | CompositionBlock, list[int]]] = {}
    for row, setup in enumerate(setups):
        groups.setdefault(setup if isinstance(setup, str) else repr(setup), (setup, []))[1].append(row)
    if not groups:
        raise CompositionError("no rows: name one adapter per row")
    if key is not None:
        groups = dict(sorted(groups.items(), key=lambda item: key(item[1][0])))
    order = [row for _, rows in groups.values() for row in rows]
    if len(groups) == 1:
        return order, next(iter(groups.values()))[0]
    return order, BatchSplit(*[s for s, _ in groups.values()], batch_sizes=[len(r) for _, r in groups.values()])


def head_name(node: str | CompositionBlock) -> str:
    """The head a block's output goes to: a Fuse's name, else the name of its last adapter."""
    while isinstance(node, Stack):
        node = node.children[-1]
    return node.name if isinstance(node, Fuse) else node if isinstance(node, str) else node.last()


# -- running a block at one site --------------------------------------------------------------------
S = TypeVar("S")


class Composer(Protocol, Generic[S]):
    """What a method family provides to run any block at one place in the model.

    ``S`` is the family's state there (e.g. bottleneck: hidden states and residual; LoRA: the
    layer's input and output). Rows are the batch axis (dim 0), positions the sequence axis (dim 1).
    """

    def has(self, name: str) -> bool: ...
    def single(self, name: str, state: S) -> S: ...
    def size(self, state: S, dim: int) -> int: ...
    def take(self, state: S, dim: int, index: slice) -> S: ...
    def join(self, states: list[S], dim: int) -> S: ...
    def average(self, base: S, states: list[S], weights: list[float]) -> S: ...
    def fuse(self, block: Fuse, state: S, members: list[S]) -> S: ...


def _check_rows(block: BatchSplit, batch: int) -> None:
    if sum(block.batch_sizes) != batch:
        raise CompositionError(f"BatchSplit batch_sizes {block.batch_sizes} add up to {sum(block.batch_sizes)}, "
                               f"but the batch has {batch} rows")


def run(node: str | CompositionBlock, state: S, composer: Composer[S]) -> S:
    """Run ``node`` on ``state`` with one family's composer. Children with no adapter at this
    place leave their part of the state as it is."""
    if isinstance(node, str):
        return composer.single(node, state) if composer.has(node) else state
    if not touches(node, composer):
        return state
    if isinstance(node, Stack):
        for child in node.children:
            state = run(child, state, composer)
        return state
    if isinstance(node, Fuse):
        members = [run(c, state, composer) for c in node.children if touches(c, composer)]
        return composer.fuse(node, state, members)
    if isinstance(node, Average):
        return composer.average(state, [run(c, state, composer) for c in node.children], node.weights)
    if isinstance(node, Parallel | BatchSplit):
        rows = composer.size(state, 0)
        groups = row_groups(node, rows)
        if isinstance(node, Parallel) and rows % len(node.children):
            raise CompositionError(f"Parallel with {len(node.children)} children got {rows} rows, not a multiple")
        return composer.join([run(child, composer.take(state, 0, rows_), composer) for rows_, child in groups], 0)
    if isinstance(node, Split):
        length = composer.size(state, 1)
        if sum(node.splits) != length:
            raise CompositionError(f"Split splits {node.splits} add up to {sum(node.splits)}, "
                                   f"but the sequence has {length} positions")
        starts = [sum(node.splits[:i]) for i in range(len(node.children) + 1)]
        parts = [run(child, composer.take(state, 1, slice(starts[i], starts[i + 1])), composer)
                 for i, child in enumerate(node.children)]
        return composer.join(parts, 1)
    raise CompositionError(f"cannot run {type(node).__name__}")


def check_support(block: CompositionBlock, method_of: Callable[[str], str],
                  family_of: Callable[[str], str], supported: dict[str, tuple[str, ...]]) -> None:
    """Refuse a block that the method of one of its adapters cannot run (one error naming the
    block, the method and what is allowed). ``supported`` maps a family to its block names."""
    for node in blocks_in(block):
        kind = type(node).__name__
        names = [n for n in node.flatten() if n != BASE]  # no adapter: any block runs it
        for name in names:
            family = family_of(name)
            if kind not in supported[family]:
                can = [f for f, blocks in supported.items() if kind in blocks]
                raise CompositionError(
                    f"{kind} does not work with {method_of(name)} adapters ('{name}'): {kind} runs "
                    f"{' and '.join(can)} adapters; {method_of(name)} adapters run in "
                    f"{', '.join(supported[family])}")
        if isinstance(node, Average) and len({family_of(n) for n in names}) > 1:
            mixed = ", ".join(f"'{n}' ({method_of(n)})" for n in names)
            raise CompositionError(f"Average combines adapters of one method family only; got {mixed}")


__all__ = [
    "ALLOWED_NESTING", "Average", "BASE", "BatchSplit", "CompositionBlock", "CompositionError", "Composer", "Fuse",
    "Parallel", "Split", "Stack", "check_support", "end_node", "parse", "row_groups", "rows_by_setup", "run",
    "split_rows", "touches", "validate",
]
