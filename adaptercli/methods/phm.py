"""Parameterized hypercomplex multiplication (PHM) layers: the projections of Compacter adapters.

A PHM layer replaces a bottleneck adapter's ``Linear(in, out)`` by ``y = x H + b`` with

    H = sum_{i<n} kron(R_i, W_i)        R: [n, n, n] "rules", W: [n, in/n, out/n], H: [in, out]

where ``n = phm_dim``. ``W_i`` may be factorised as ``W_left_i @ W_right_i`` (rank ``phm_rank``)
and the rules as ``R_left_i @ R_right_i``; the rules (``shared_phm_rule``) and the weights
(``shared_W_phm``) may be shared by every layer of one adapter, as Compacter and Compacter++ do.
Shared tensors live once per adapter in ``shared_parameters.<name>`` on the backbone, where
AdapterHub's files put them (``phm_rule``, ``W_down_left``, ``W_up_right``, ...); the rest under
the layer (``...adapter_down.0.W_left``, ``...adapter_up.b``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# ``config`` below is a bottleneck config (BnConfig, its phm_* fields), typed by its base class:
# bottleneck.py imports this module.
from .base import ConfigError, MethodConfig
from .kept import kept


def _init_weight(tensor: torch.Tensor, config: MethodConfig) -> None:
    """Each of the ``n`` slices: Glorot (normal or uniform) or N(0, phm_init_range)."""
    for piece in tensor:
        if config.hypercomplex_nonlinearity == "glorot-uniform":
            nn.init.xavier_uniform_(piece)
        elif config.hypercomplex_nonlinearity == "normal":
            nn.init.normal_(piece, std=config.phm_init_range)
        else:  # "glorot-normal", "phm"
            nn.init.xavier_normal_(piece)


def _init_rule(tensor: torch.Tensor, config: MethodConfig, scale: float) -> None:
    if config.phm_c_init == "uniform":
        nn.init.uniform_(tensor, -scale, scale)
    else:
        nn.init.normal_(tensor, std=scale)


def _weight_shapes(n: int, rows: int, cols: int, rank: int, factorized: bool) -> dict[str, tuple[int, ...]]:
    if factorized:
        return {"W_left": (n, rows // n, rank), "W_right": (n, rank, cols // n)}
    return {"W": (n, rows // n, cols // n)}


def _rule_shapes(n: int, factorized: bool) -> dict[str, tuple[int, ...]]:
    return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if factorized else {"phm_rule": (n, n, n)}


def shared_parameters(config: MethodConfig, hidden_size: int, width: int) -> nn.ParameterDict:
    """The tensors one adapter's PHM layers share (empty when they share nothing)."""
    shared = nn.ParameterDict()
    n = config.phm_dim
    if config.shared_W_phm:
        for position, (rows, cols) in (("down", (hidden_size, width)), ("up", (width, hidden_size))):
            for key, shape in _weight_shapes(n, rows, cols, config.phm_rank, config.factorized_phm_W).items():
                tensor = torch.empty(shape)
                _init_weight(tensor, config)
                shared[key.replace("W", f"W_{position}", 1)] = nn.Parameter(tensor)
    if config.shared_phm_rule:
        for key, shape in _rule_shapes(n, config.factorized_phm_rule).items():
            tensor = torch.empty(shape)
            _init_rule(tensor, config, config.phm_init_range if config.phm_c_init == "normal" else 1.0)
            shared[key] = nn.Parameter(tensor, requires_grad=config.learn_phm)
    return shared


class PHMLayer(nn.Module):
    """``y = x H + b`` (x [..., in], H [in, out]); see the module docstring.

    ``shared`` is the adapter's ParameterDict of shared tensors (held, not registered: it is
    registered once on the backbone); ``position`` ("down" or "up") picks its shared weights.
    """

    def __init__(self, in_features: int, out_features: int, position: str, config: MethodConfig,
                 shared: nn.ParameterDict | None):
        super().__init__()
        n = config.phm_dim
        for size, what in ((in_features, "input"), (out_features, "output")):
            if size % n:
                raise ConfigError(f"phm_dim: the PHM layer's {what} size {size} is not divisible by phm_dim {n} "
                                  "(change reduction_factor or phm_dim)")
        self.in_features, self.out_features, self.position = in_features, out_features, position
        self.factorized_W, self.factorized_rule = config.factorized_phm_W, config.factorized_phm_rule
        self.shared_W, self.shared_rule = config.shared_W_phm, config.shared_phm_rule
        self.__dict__["_shared"] = shared  # a plain reference: the backbone owns these parameters
        if not self.shared_W:
            for key, shape in _weight_shapes(n, in_features, out_features, config.phm_rank, self.factorized_W).items():
                tensor = torch.empty(shape)
                _init_weight(tensor, config)
                self.register_parameter(key, nn.Parameter(tensor))
        if not self.shared_rule:
            for key, shape in _rule_shapes(n, self.factorized_rule).items():
                tensor = torch.empty(shape)
                _init_rule(tensor, config, 0.01)
                self.register_parameter(key, nn.Parameter(tensor, requires_grad=config.learn_phm))
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None

    def _tensor(self, key: str, shared: bool) -> torch.Tensor:
        if not shared:
            return getattr(self, key)
        if key.startswith("W"):
            key = key.replace("W", f"W_{self.position}", 1)
        return self._shared[key]

    def hypercomplex_weight(self) -> torch.Tensor:
        """H, [in, out]."""
        if self.factorized_W:
            W = torch.bmm(self._tensor("W_left", self.shared_W), self._tensor("W_right", self.shared_W))
        else:
            W = self._tensor("W", self.shared_W)
        if self.factorized_rule:
            rule = torch.bmm(self._tensor("phm_rule_left", self.shared_rule),
                             self._tensor("phm_rule_right", self.shared_rule))
        else:
            rule = self._tensor("phm_rule", self.shared_rule)
        # kron(R_i, W_i)[a*p + c, b*q + d] = R_i[a, b] W_i[c, d], summed over i.
        return torch.einsum("iab,icd->acbd", rule, W).reshape(self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training or (self.b is not None and self.b.dtype != x.dtype):
            y = x @ self.hypercomplex_weight().to(x.dtype)
            return y if self.b is None else y + self.b
        # At inference H (batch-independent) is kept, as ``linear``'s [out, in] operand, until a
        # weight changes: one GEMM with the bias, no Kronecker sum per call.
        shared = tuple(self._shared.values()) if self._shared is not None else ()
        own = tuple(p for p in self._parameters.values() if p is not None)  # no submodules: parameters()
        weight = kept(self, f"H{x.dtype}", (*own, *shared),
                      lambda: self.hypercomplex_weight().to(x.dtype).t().contiguous())
        return nn.functional.linear(x, weight, self.b)
