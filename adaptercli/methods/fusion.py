"""AdapterFusion: an attention, at every place the members sit, over what each member adapter adds.

With ``q`` the query (the sub-layer output as the adapters see it, [B, T, H]) and ``u_i`` the
scaled up-projection of member ``i`` ([B, T, N, H] stacked), one fusion layer computes::

    s_i   = (W_q q) . (W_k u_i)                  scores [B, T, N] (dropout on the scores)
    p     = softmax(s / T)                       T = 1 ("temperature": 50, annealed to 1)
    out   = sum_i p_i * W_v u_i  + residual      (W_v after the sum when value_before_softmax is off)

which is AdapterHub's ``BertFusion`` (Pfeiffer et al., 2021); ``W_v`` starts as the identity
("value_initialized") and the "dynamic" config's regularisation pulls it back towards it. Parameter
names (``query``, ``key``, ``value``) match AdapterHub's files. :class:`FusionAttention` keeps the
mean of ``p`` per layer and member while recording is on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..schema import spec
from .base import ConfigError, MethodConfig


@dataclasses.dataclass
class FusionConfig(MethodConfig):
    """AdapterFusion config (AdapterHub's ``AdapterFusionConfig``; defaults are "dynamic"'s).

    Attributes:
        key: learn W_k (otherwise the identity).
        query: learn W_q (otherwise the identity).
        value: learn W_v (otherwise the identity).
        query_before_ln: the query is the sub-layer output before the layer's norm.
        regularization: add ``0.01 * ||W_v - I||^2`` to the loss (``get_fusion_regularization_loss``).
        residual_before: add the residual to each member's output before the attention.
        temperature: start the softmax temperature at 50 and lower it by 0.05 per training step to 1.
        value_before_softmax: apply W_v to each member (else to the weighted sum).
        value_initialized: W_v starts as the identity (else N(0, 0.02)).
        dropout_prob: dropout on the scores (None: the model's attention dropout).
    """

    family: ClassVar[str] = "fusion"

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = spec(None, ge=0, lt=1)


FUSION_PRESETS: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "static": {"value": False, "regularization": False, "value_initialized": False},
}


def resolve_fusion_config(config: str | dict | FusionConfig | None) -> FusionConfig:
    """``"dynamic"`` (default), ``"static"``, a dict (AdapterHub's ``adapter_fusion_config.json``
    ``config``) or a config object."""
    if config is None:
        config = "dynamic"
    if isinstance(config, FusionConfig):
        return config
    if isinstance(config, str):
        if config not in FUSION_PRESETS:
            raise ConfigError(f"unknown fusion config '{config}'; known: {', '.join(FUSION_PRESETS)} (or a dict)")
        return FusionConfig.from_dict(FUSION_PRESETS[config], method="fusion")
    if isinstance(config, dict):
        return FusionConfig.from_dict(dict(config), method="fusion")
    raise ConfigError(f"a fusion config must be 'dynamic', 'static', a dict or a FusionConfig, not {type(config).__name__}")


class FusionLayer(nn.Module):
    """One AdapterFusion layer (one per fused place in one transformer layer)."""

    def __init__(self, config: FusionConfig, hidden_size: int, dropout: float):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(dropout)
        if not (config.query or config.key or config.value):
            self.dense = nn.Linear(hidden_size, 1)  # unused; AdapterHub's files carry it
        for part in ("query", "key"):
            if getattr(config, part):
                self.add_module(part, nn.Linear(hidden_size, hidden_size))
        if config.value:
            self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.reset_parameters()
        self.temperature = 50.0 if config.temperature else 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.children():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
        if self.config.value and self.config.value_initialized:
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, query: torch.Tensor, ups: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query, residual [B, T, H]; ups [B, T, N, H]. Returns the fused output [B, T, H] and
        the attention [B, T, N]."""
        cfg = self.config
        if cfg.residual_before:
            ups = ups + residual.unsqueeze(2)
        q = self.query(query) if cfg.query else query
        k = self.key(ups) if cfg.key else ups
        v = self.value(ups) if cfg.value and cfg.value_before_softmax else ups
        scores = self.dropout(torch.einsum("bth,btnh->btn", q, k))
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.training and cfg.temperature:
            self.temperature = max(self.temperature - 0.05, 1.0)
        out = torch.einsum("btn,btnh->bth", probs, v)
        if cfg.value and not cfg.value_before_softmax:
            out = self.value(out)
        if not cfg.residual_before:
            out = out + residual
        return out, probs


@dataclasses.dataclass
class FusionAttention:
    """What one fusion attended to: ``weights[i, j]`` is the mean softmax weight that place
    ``places[i]`` (a ``(layer, "attention" | "output")`` pair) gave member ``members[j]``, averaged
    over the non-padded tokens of every recorded forward pass (NaN where a member has no adapter)."""

    fusion: str
    members: list[str]
    places: list[tuple[int, str]]
    weights: torch.Tensor
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "members": self.members, "tokens": self.tokens,
                "places": [{"layer": layer, "site": site, "weights": dict(zip(self.members, row.tolist(), strict=True))}
                           for (layer, site), row in zip(self.places, self.weights, strict=True)]}


class FusionRecorder:
    """Accumulates fusion attention while it is installed on a model (see
    ``record_fusion_attention``); ``result()`` gives one :class:`FusionAttention` per fusion."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, int, str], torch.Tensor] = {}
        self._tokens: dict[tuple[str, int, str], int] = {}
        self._members: dict[str, list[str]] = {}

    @torch.no_grad()
    def add(self, fusion: str, members: list[str], present: list[str], layer: int, site: str,
            probs: torch.Tensor, mask: torch.Tensor | None) -> None:
        """probs [B, T, n present]; mask [B, T] (1 = real token) or None."""
        self._members[fusion] = members
        probs = probs.detach().float()
        if mask is None:
            total, count = probs.sum(dim=(0, 1)), probs.shape[0] * probs.shape[1]
        else:
            keep = mask.to(probs.device).bool()
            total, count = probs[keep].sum(dim=0), int(keep.sum())
        full = torch.zeros(len(members))
        full[[members.index(m) for m in present]] = total.cpu()
        key = (fusion, layer, site)
        self._sums[key] = self._sums.get(key, torch.zeros(len(members))) + full
        self._tokens[key] = self._tokens.get(key, 0) + count
        if len(present) < len(members):
            self._sums[key][[members.index(m) for m in members if m not in present]] = float("nan")

    def result(self) -> dict[str, FusionAttention]:
        out = {}
        for fusion, members in self._members.items():
            places = sorted((layer, site) for name, layer, site in self._sums if name == fusion)
            rows = [self._sums[(fusion, *p)] / max(self._tokens[(fusion, *p)], 1) for p in places]
            tokens = max((self._tokens[(fusion, *p)] for p in places), default=0)
            out[fusion] = FusionAttention(fusion, list(members), places, torch.stack(rows), tokens)
        return out
