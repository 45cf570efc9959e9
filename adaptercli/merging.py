"""Merging task tensors: weighted sums, TIES and DARE, as PEFT's ``add_weighted_adapter`` and its
``merge_utils`` define them, so adapters merged here equal PEFT's on the same weights.

Each strategy takes one tensor per source (same shape) and one weight per source:

* ``task_arithmetic``: ``sum_i w_i t_i``.
* ``magnitude_prune``: keep the ``density`` share of each ``t_i`` with the largest magnitudes, then sum.
* ``ties`` (Yadav et al., 2023): prune by magnitude; elect a sign per entry (``total``: the sign of
  the sum; ``frequency``: the sign most sources have); average, per entry, the weighted values that
  agree with it.
* ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): drop entries at random (each kept with
  probability ``density``, the kept ones divided by it), then sum, or elect signs as TIES does.

Random masks are drawn from ``generator``, tensor by tensor in the order given, so a merge is
reproducible from its seed.
"""

from __future__ import annotations

import torch

STRATEGIES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
NEEDS_DENSITY = ("magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def prune_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each entry kept with probability ``density`` and divided by it (the expected value stays)."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _elect_and_average(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES's sign election on the (pruned, unweighted) ``stacked`` [N, ...], then the mean of the
    weighted entries that agree with the elected sign (entries with none stay 0)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def combine(tensors: list[torch.Tensor], weights: list[float] | torch.Tensor, strategy: str, *,
            density: float = 1.0, sign_method: str = "total",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from ``tensors`` (one per source, same shape) by ``strategy`` (see the module)."""
    weights = torch.as_tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    if strategy in ("magnitude_prune", "ties"):
        tensors = [prune_by_magnitude(t, density) for t in tensors]
    elif strategy in ("dare_linear", "dare_ties"):
        tensors = [prune_at_random(t, density, generator) for t in tensors]
    elif strategy != "task_arithmetic":
        raise ValueError(f"unknown merge strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
    stacked = torch.stack(tensors)
    if strategy in ("ties", "dare_ties"):
        return _elect_and_average(stacked, weights, sign_method)
    return (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(dim=0)
