"""Batch-independent values kept across forward passes at inference.

Some adapters compute a weight-shaped value from their parameters at every call whatever the
batch: Compacter's Kronecker-sum weight, DoRA's per-row magnitude over ``||W + ΔW||``, LoRA's scaled
up-projection. Training must recompute them (autograd needs the graph); a server or an evaluation
pass would repeat the same work for every batch, for every adapter of a mixed batch. ``kept``
computes such a value once and returns it again while nothing could have changed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")


def kept(owner: nn.Module, slot: str, sources: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``, or the value it returned before for ``owner``'s ``slot``.

    The value is reused only while no autograd is recording, ``owner`` is in eval mode, nothing is
    being compiled, and each of ``sources`` (what the value is computed from) is the same tensor
    with the same version, dtype and device: any in-place update (an optimizer step,
    ``load_state_dict``, a merge) bumps a tensor's version, and the entry holds the tensors
    themselves, so a freed tensor's id is never mistaken for a live one's."""
    if torch.is_grad_enabled() or owner.training or torch.compiler.is_compiling():
        return compute()
    try:
        key = tuple((t._version, t.dtype, t.device) for t in sources)
    except RuntimeError:  # a tensor made under torch.inference_mode() keeps no version: never kept
        return compute()
    store = owner.__dict__.setdefault("_adaptercli_kept", {})
    entry = store.get(slot)
    if entry is not None and entry[1] == key and len(entry[0]) == len(sources) \
            and all(a is b for a, b in zip(entry[0], sources, strict=True)):
        return entry[2]
    value = compute()
    store[slot] = (tuple(sources), key, value)
    return value
