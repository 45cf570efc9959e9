"""LoRA variants: DoRA, VeRA (and both: DVoRA) and gated LoRA (UniPELT's), with AdapterHub's
config keys (``use_dora``, ``vera_d``, ``vera_b``, ``use_gating``) and weight names.

With x the layer input [..., in], y = W x + b the layer's output and s = alpha / r:

* LoRA delta:  d = s * B A x                      (A [r, in], B [out, r])
* VeRA:        d = s * Λ_b B0 Λ_d A0 x            A0 [r, in] and B0 [out, r] random and frozen, shared by
  every layer of the adapter (``shared_parameters.<name>.lora_A/B``); the trained ``vera_D`` [r, r]
  and ``vera_B`` [out, out] start as ``vera_d * I`` and ``vera_b * I``.
* gating:      d = g(x) * B A x                   g = mean over tokens of sigmoid(gate(x)), one per row;
  the gate replaces the scaling s. On a fused q/k/v layer (DeBERTa's ``in_proj``) the gate has one
  output per adapted third (q, k, v), as AdapterHub's merged layer has.
* DoRA:        y' = m / ||W + ΔW||_row * (y + d)  m [out] starts as ||W||_row; ΔW is the variant's
  unscaled delta matrix (B A, or Λ_b B0 Λ_d A0). As in AdapterHub the bias is inside the
  normalised term.

These classes extend ``lora.LoRA`` without changing its fast path; the family below picks them
only when a config asks for a variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .base import ConfigError
from .family import AdapterState
from .kept import kept
from .lora import LoRA, LoRAConfig, LoRAFamily, _features, _is_conv1d, module_ids, up_operand


def is_variant(config: LoRAConfig) -> bool:
    return config.use_dora or is_vera(config) or config.use_gating


def is_vera(config: LoRAConfig) -> bool:
    return config.vera_d is not None or config.vera_b is not None


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: str) -> None:
    if init == "lora":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif init == "bert":
        nn.init.normal_(a, std=0.02)
        nn.init.normal_(b, std=0.02)
    elif init == "ia3":
        nn.init.ones_(a)
        nn.init.ones_(b)
    else:  # "vera"
        nn.init.kaiming_uniform_(a)
        nn.init.kaiming_uniform_(b)


def shared_vera_matrices(in_features: int, out_features: int, config: LoRAConfig) -> nn.ParameterDict:
    """VeRA's frozen random A0 [r, in] and B0 [out, r], one pair per adapter."""
    if config.init_weights_seed:
        torch.manual_seed(config.init_weights_seed)
    a, b = torch.zeros(config.r, in_features), torch.zeros(out_features, config.r)
    _init_pair(a, b, config.init_weights)
    return nn.ParameterDict({"lora_A": nn.Parameter(a, requires_grad=False),
                             "lora_B": nn.Parameter(b, requires_grad=False)})


class LoRAVariant(LoRA):
    """One DoRA / VeRA / gated delta on one linear layer (see the module docstring). ``base`` is
    the adapted layer (held, not registered); ``shared`` VeRA's shared matrices; ``slots`` the
    adapted thirds of a fused q/k/v layer (gating only)."""

    def __init__(self, base: nn.Module, config: LoRAConfig, shared: nn.ParameterDict | None,
                 slots: list[bool] | None = None):
        in_features, out_features = _features(base)
        self.vera = shared is not None
        if self.vera:  # no A, B of its own: skip LoRA's constructor, keep its attributes
            nn.Module.__init__(self)
            self.scale_mode, self.scaling, self.slots, self.out_features = False, config.scaling, None, out_features
            self.__dict__["scales_input"] = None
            self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
            self.vera_D = nn.Parameter(torch.diag(torch.full((config.r,), float(config.vera_d or 0.0))))
            self.vera_B = nn.Parameter(torch.diag(torch.full((out_features,), float(config.vera_b or 0.0))))
        else:
            super().__init__(in_features, out_features, config, slots)
        self.__dict__["_shared"] = shared
        self.__dict__["_base"] = base
        self.dora = config.use_dora
        self.peft_dora = config.use_dora and config.dora_norm == "peft"
        if self.dora:
            if type(base).__name__ == "Conv1D":
                raise ConfigError("use_dora: DoRA needs nn.Linear layers (GPT-2's Conv1D is not supported)")
            self.m = nn.Linear(1, out_features, bias=False)
            with torch.no_grad():
                self.m.weight.copy_(torch.linalg.norm(base.weight.float(), dim=1, keepdim=True))
        self.gate = None
        if config.use_gating:
            self.gate = nn.Linear(in_features, sum(slots) if slots else 1)
            nn.init.normal_(self.gate.weight, std=0.02)

    def delta_matrix(self) -> torch.Tensor:
        """The unscaled delta ΔW, [out, in]."""
        if self.vera:
            return self.vera_B @ self._shared["lora_B"] @ self.vera_D @ self._shared["lora_A"]
        return self.lora_B @ self.lora_A

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dtype = self.vera_B.dtype if self.vera else self.lora_A.dtype
        x_in = self.dropout(x.to(dtype))
        if self.slots:  # gated, on a fused q/k/v layer: one gate per adapted third
            n, r = sum(self.slots), self.lora_B.shape[1]
            groups = (x_in @ self.lora_A.t()).unflatten(-1, (n, r))  # [..., n, r]
            delta = torch.einsum("...nr,ndr->...nd", groups, self.lora_B.view(n, -1, r))  # [..., n, out / 3]
            gate = torch.sigmoid(self.gate(x.to(dtype))).mean(dim=1, keepdim=True)  # [batch, 1, n]
            return out + self._fill((delta * gate.unsqueeze(-1)).flatten(-2), 0.0).to(out.dtype)
        after_a = self._after_a(x_in)
        if self.gate is not None:
            # The gate (one number per row) goes on the r-wide factor, not on the out-wide delta.
            after_a = after_a * torch.sigmoid(self.gate(x.to(dtype))).mean(dim=1, keepdim=True)
            up = up_operand(self._up())
        else:
            up = self._scaled_up()
        if not self.dora and out.dtype != dtype:
            return out + (after_a @ up).to(out.dtype)
        # One GEMM that also adds the layer's output: out + delta without a separate full-width add.
        width = out.shape[-1]
        adapted = torch.addmm(out.to(dtype).reshape(-1, width), after_a.reshape(-1, after_a.shape[-1]), up).view(out.shape)
        if self.dora:
            adapted = self._magnitude() * adapted
            if self.peft_dora and self._base.bias is not None:  # PEFT leaves the bias out: add back what it lost
                adapted = adapted + self._bias_back()
        return adapted.to(out.dtype)

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``apply`` written into ``out`` (see ``LoRA.apply_into``): ungated, unfused layers only."""
        dtype = self.vera_B.dtype if self.vera else self.lora_A.dtype
        if self.slots or self.gate is not None or out.dtype != dtype or not out.is_contiguous():
            return False
        x = x.to(dtype)
        after_a = self._after_a(self.dropout(x) if self.training else x)
        out.view(-1, out.shape[-1]).addmm_(after_a.reshape(-1, after_a.shape[-1]), self._scaled_up())
        if self.dora:
            out.mul_(self._magnitude())
            if self.peft_dora and self._base.bias is not None:
                out.add_(self._bias_back())
        return True

    def _after_a(self, x_in: torch.Tensor) -> torch.Tensor:
        """The input through the rank-r down side: ``A x`` (VeRA: ``Λ_d A0 x``; never the [out, in]
        matrix, ~5x fewer FLOPs on MiniLM)."""
        if self.vera:
            return (x_in @ self._shared["lora_A"].t()) @ self.vera_D.t()
        return x_in @ self.lora_A.t()

    def _up(self) -> torch.Tensor:
        """The up side, [out, r]: B (VeRA: ``Λ_b B0``)."""
        return self.vera_B @ self._shared["lora_B"] if self.vera else self.lora_B

    def _sources(self) -> tuple[torch.Tensor, ...]:
        """What the kept values are computed from: own weights, VeRA's shared ones, the layer's weight."""
        shared = tuple(self._shared.values()) if self.vera else ()
        return (*self.parameters(), *shared, self._base.weight)

    def _scaled_up(self) -> torch.Tensor:
        return kept(self, "up", self._sources(), lambda: up_operand(self._up() * self.scaling))

    def _magnitude(self) -> torch.Tensor:
        """DoRA's per-output factor ``m / ||W + ΔW||_row``, [out] (PEFT's: ``ΔW`` scaled); kept at
        inference (it does not depend on the batch, and costs a full [out, in] matrix per call)."""
        def compute() -> torch.Tensor:
            dtype = self.vera_B.dtype if self.vera else self.lora_A.dtype
            delta = self.delta_matrix() * self.scaling if self.peft_dora else self.delta_matrix()
            norm = torch.linalg.norm(self._base.weight.to(dtype) + delta, dim=1)
            return self.m.weight.view(-1) / (norm.detach() if self.peft_dora else norm)  # PEFT: no gradient through it
        return kept(self, "magnitude", self._sources(), compute)

    def _bias_back(self) -> torch.Tensor:
        """``(1 - m / ||...||) b``: what PEFT's DoRA adds to ``magnitude * (layer output + delta)``
        so that the bias is not renormalised."""
        return kept(self, "bias_back", (*self._sources(), self._base.bias),
                    lambda: (1 - self._magnitude()) * self._base.bias.to(self._magnitude().dtype))

    def weight_delta(self) -> torch.Tensor:
        if self.dora or self.gate is not None:
            raise ConfigError("DoRA and gated LoRA adapters cannot be merged into the weights "
                              "(their change depends on the weights and on the input)")
        return self.delta_matrix() * self.scaling


class LoRAVariantsFamily(LoRAFamily):
    """LoRA / IA3 plus the variants: the plain cases go through ``LoRAFamily`` unchanged."""

    containers = ("loras", "shared_parameters")

    def add(self, state: AdapterState, name: str, config: LoRAConfig) -> None:
        if not is_variant(config):
            return super().add(state, name, config)
        if config.composition_mode != "add":
            raise ConfigError("composition_mode: DoRA, VeRA and gating work with 'add' (LoRA), not 'scale' (IA3)")
        targets = self.targets(state, config)
        fused = [module for module, slots in targets if slots]
        if fused and (config.use_dora or is_vera(config) or _is_conv1d(fused[0])):
            # AdapterHub 1.3.0 fails on DoRA / VeRA there too; gated LoRA on a fused nn.Linear
            # (DeBERTa's in_proj) it runs, and so do we (GPT-2's Conv1D: no reference, refused).
            raise ConfigError("DoRA and VeRA (and gated LoRA on a Conv1D) need separate q/k/v projections; this "
                              "model fuses them (name the layers with target_modules, or use plain LoRA)")
        shared = None
        if is_vera(config):
            shapes = {_features(module) for module, _ in targets}
            if len(shapes) > 1:
                raise ConfigError(f"VeRA shares one pair of random matrices across layers, so every adapted layer "
                                  f"needs the same shape; these differ: {sorted(shapes)} (choose attn_matrices "
                                  "or target_modules of one shape)")
            shared = shared_vera_matrices(*shapes.pop(), config)
            if not hasattr(state.root, "shared_parameters"):
                state.root.add_module("shared_parameters", nn.ModuleDict())
            state.root.shared_parameters[name] = shared
        names = module_ids(state, config)
        for module, slots in targets:
            if not hasattr(module, "loras"):
                module.add_module("loras", nn.ModuleDict())
            module.loras[name] = LoRAVariant(module, config.for_module(names.get(id(module), "")), shared, slots)

    def frozen_parameters(self, state: AdapterState, name: str) -> set[str]:
        """VeRA's shared random matrices are saved with the adapter but never trained."""
        return {k for k in state.adapter_parameters(name) if f"shared_parameters.{name}.lora_" in k}
