"""LoRA and IA3: deltas on the linear layers of the unmodified model.

* LoRA ("add"): ``y = W x + b + scaling * B A dropout(x)`` with A [r, in], B [out, r] and
  ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
* IA3 ("scale"): ``y = (W x + b) * alpha * l`` with l = ``lora_B`` [out, 1] (r must be 1).

The modules live under the wrapped layer (``...query.loras.<name>.lora_A``, AdapterHub's key
layout) and run from a forward hook, so the model's own weights and state-dict keys never change.
Both merge into the weights (``W += scaling B A``, or ``W, b *= alpha l``) and unmerge exactly.

Where they go: the architecture table's q/k/v/o and FFN projections, selected by
``attn_matrices`` / ``intermediate_lora`` / ``output_lora`` as in AdapterHub; or, on any model,
the modules named by ``target_modules`` (PEFT-style: a module matches when its dotted name equals
an entry or ends with ``.entry``). GPT-2's fused ``c_attn`` gets one grouped delta for the enabled
q/k/v slices, matching AdapterHub's ``LoRAMergedLinear``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .. import merging
from ..architectures import get_module, layers_with_parts
from ..composition import CompositionBlock, is_plain_stack, run, split_rows, touches
from ..schema import spec
from .base import ConfigError, MethodConfig
from .family import AdapterState, MethodFamily
from .kept import kept


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """LoRA / IA3 config (AdapterHub's ``LoRAConfig``; defaults are ``lora``'s).

    The DoRA, VeRA and gated (UniPELT) variants are set by ``use_dora``, ``vera_d`` / ``vera_b``
    and ``use_gating``; see ``lora_variants.py``.

    Attributes:
        selfattn_lora: adapt the attention projections named in ``attn_matrices``.
        intermediate_lora: also adapt the FFN's up projection.
        output_lora: also adapt the FFN's down projection.
        leave_out: layer indices to skip.
        r: rank of the delta (IA3: 1).
        alpha: scaling numerator: the delta is scaled by alpha / r (alpha / sqrt(r) with
            ``use_rslora``).
        dropout: dropout on the LoRA input.
        attn_matrices: which of q, k, v, o get a delta (when ``selfattn_lora``).
        composition_mode: "add" (LoRA: W x + s B A x) or "scale" (IA3: the output scaled per
            channel).
        init_weights: "lora" (A Kaiming, B zero), "bert" (both N(0, 0.02)), "ia3" (ones) or
            "vera" (Kaiming-uniform shared matrices).
        init_weights_seed: seed the random generator with this before initialising the weights
            (None or 0: the global random state).
        target_modules: module names to adapt on any model (replaces the placement flags above).
        use_rslora: scale by alpha / sqrt(r) (rank-stabilised LoRA, as in PEFT).
        use_dora: DoRA: the adapted weight's rows are renormalised to a learned magnitude.
        vera_d: VeRA: the trained diagonal ``vera_D`` starts as vera_d times the identity (None:
            not VeRA).
        vera_b: VeRA: the trained ``vera_B`` starts as vera_b times the identity.
        use_gating: a learned gate, the mean over tokens of sigmoid(linear(x)), replaces the
            scaling (UniPELT).
        dora_norm: how DoRA renormalises the adapted layer: "adapterhub" (AdapterHub's: its
            output, bias included, times m / ||W + B A||) or "peft" (PEFT's ``use_dora``: the
            output less the bias times m / ||W + scaling B A||, the bias added back).
        rank_pattern: r for the layers whose names a key matches (PEFT's rule: the key, a regular
            expression, ends the name after a dot); the others get ``r``.
        alpha_pattern: alpha the same way.
        feedforward_modules: IA3 only: of the adapted layers, those whose *input* is scaled per
            channel instead of their output (PEFT's ``feedforward_modules``; its IA3 default for
            BERT is ``output.dense``, for Llama ``down_proj``), named as ``target_modules`` are.
    """

    family: ClassVar[str] = "lora"
    foreign_defaults: ClassVar[dict] = {"dtype": None}

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = spec(factory=list, ge=0)
    r: int = spec(8, ge=1)
    alpha: float = spec(8, gt=0)
    dropout: float = spec(0.0, ge=0, lt=1)
    attn_matrices: list[str] = spec(factory=lambda: ["q", "v"], choices=("q", "k", "v", "o"))
    composition_mode: str = spec("add", choices=("add", "scale"))
    init_weights: str = spec("lora", choices=("lora", "bert", "ia3", "vera"))
    init_weights_seed: int | None = None
    target_modules: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    use_gating: bool = False
    feedforward_modules: list[str] = spec(factory=list)
    dora_norm: str = spec("adapterhub", choices=("adapterhub", "peft"))
    rank_pattern: dict[str, int] = spec(factory=dict)
    alpha_pattern: dict[str, float] = spec(factory=dict)

    def validate(self) -> None:
        problems = []
        for field, low, kind in (("rank_pattern", 1, int), ("alpha_pattern", 0, float)):
            for key, value in getattr(self, field).items():
                try:
                    re.compile(key)
                except re.error as exc:
                    problems.append(f"{field}: key '{key}' is not a regular expression ({exc})")
                if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)) \
                        or (value < low if kind is int else value <= low):
                    bound = f">= {low}" if kind is int else f"> {low}"
                    problems.append(f"{field}: '{key}' needs {'an integer' if kind is int else 'a number'} {bound}, "
                                    f"got {value!r}")
        if self.feedforward_modules and self.composition_mode != "scale":
            problems.append("feedforward_modules: only IA3 (composition_mode 'scale') scales a layer's input")
        if self.composition_mode == "scale" and self.r != 1:
            problems.append(f"r: composition_mode 'scale' (IA3) needs r=1, got {self.r}")
        if self.composition_mode == "scale" and self.dropout > 0:
            problems.append(f"dropout: composition_mode 'scale' (IA3) does not support dropout, got {self.dropout}")
        if self.composition_mode == "scale" and (self.use_dora or self.vera_d is not None or self.vera_b is not None):
            problems.append("composition_mode: DoRA and VeRA need 'add', not 'scale' (IA3)")
        if problems:
            raise ConfigError(problems)

    def for_module(self, name: str) -> LoRAConfig:
        """This config with the ``r`` and ``alpha`` that ``rank_pattern`` / ``alpha_pattern`` give the
        layer named ``name`` (PEFT's rule: the first key that, as a regex, ends the name after a dot)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self

        def pick(pattern: dict, default: Any) -> Any:
            key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
            return default if key is None else pattern[key]

        return dataclasses.replace(self, r=int(pick(self.rank_pattern, self.r)),
                                   alpha=float(pick(self.alpha_pattern, self.alpha)))

    @property
    def scaling(self) -> float:
        if self.composition_mode == "scale":
            return float(self.alpha)
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


IA3_PRESET = {
    "r": 1, "alpha": 1, "attn_matrices": ["k", "v"], "intermediate_lora": True,
    "composition_mode": "scale", "init_weights": "ia3",
}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as [in, out]."""
    return type(module).__name__ == "Conv1D"


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise ConfigError(f"LoRA can adapt nn.Linear and Conv1D layers, not {type(module).__name__}")


class LoRA(nn.Module):
    """One low-rank (or IA3 scaling) delta on one linear layer.

    ``slots`` is set on fused q/k/v layers: a bool per third of the output (q, k, v) saying which
    get a delta; then A is [r * n, in] and B is [out / 3 * n, r] with n enabled slots.
    ``scales_input`` (IA3 on a ``feedforward_modules`` layer, held, not registered): the layer
    whose input the [in, 1] scale multiplies; the output becomes ``layer(x * l)``.
    """

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, slots: list[bool] | None = None,
                 scales_input: nn.Module | None = None):
        super().__init__()
        self.scale_mode = config.composition_mode == "scale"
        self.scaling = config.scaling
        self.slots = slots
        self.__dict__["scales_input"] = scales_input
        n = sum(slots) if slots else 1
        out = in_features if scales_input is not None else out_features // 3 * n if slots else out_features
        self.out_features = out_features
        if not self.scale_mode:
            self.lora_A = nn.Parameter(torch.zeros(config.r * n, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters(config)

    @torch.no_grad()
    def reset_parameters(self, config: LoRAConfig) -> None:
        if config.init_weights_seed:
            torch.manual_seed(config.init_weights_seed)
        A = None if self.scale_mode else self.lora_A
        if config.init_weights == "lora":
            if A is not None:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif config.init_weights == "bert":
            for p in (A, self.lora_B):
                if p is not None:
                    nn.init.normal_(p, std=0.02)
        else:
            for p in (A, self.lora_B):
                if p is not None:
                    nn.init.ones_(p)

    def _fill(self, delta: torch.Tensor, fill: float) -> torch.Tensor:
        """Spread a delta over the enabled q/k/v thirds of a fused output; others get ``fill``."""
        if not self.slots:
            return delta
        third = self.out_features // 3
        parts, i = [], 0
        for on in self.slots:
            if on:
                parts.append(delta[..., i * third : (i + 1) * third])
                i += 1
            else:
                parts.append(delta.new_full((*delta.shape[:-1], third), fill))
        return torch.cat(parts, dim=-1)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output for layer input ``x`` and unadapted output ``out``."""
        if self.scales_input is not None:
            # layer(x * l) = out + W (x * (l - 1)): one more product with the layer's weight (bias
            # untouched), which composes with the other adapters on the layer as a delta does.
            layer = self.scales_input
            weight = layer.weight
            scaled = x.to(weight.dtype) * (self._scale_vector().to(weight.dtype) - 1)
            delta = scaled @ weight if _is_conv1d(layer) else nn.functional.linear(scaled, weight)
            return out + delta.to(out.dtype)
        if self.scale_mode:
            return out * self._scale_vector().to(out.dtype)
        after_a = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()  # [..., r * n]
        if self.slots:
            # The scaling goes on B (out x r), not on the full-width output: one multiply fewer per token.
            scaled_b = self.lora_B * self.scaling
            n, r = sum(self.slots), scaled_b.shape[1]
            groups = after_a.unflatten(-1, (n, r))  # [..., n, r]
            delta = self._fill(torch.einsum("...nr,ndr->...nd", groups, scaled_b.view(n, -1, r)).flatten(-2), 0.0)
        elif out.dtype == after_a.dtype:
            # One GEMM that also adds the base output (no separate full-width add).
            width = out.shape[-1]
            return torch.addmm(out.reshape(-1, width), after_a.reshape(-1, after_a.shape[-1]),
                               self._scaled_up()).view(out.shape)
        else:
            delta = after_a @ self._scaled_up()
        return out + delta.to(out.dtype)

    def _scale_vector(self) -> torch.Tensor:
        """IA3's per-channel factor (kept across forward passes at inference, see ``kept``)."""
        return kept(self, "scale", (self.lora_B,), lambda: self._fill(self.lora_B.view(-1), 1.0) * self.scaling)

    def _scaled_up(self) -> torch.Tensor:
        """``scaling * B`` as the right operand of ``after_a @ ...`` (see ``up_operand``), kept at inference."""
        return kept(self, "up", (self.lora_B,), lambda: up_operand(self.lora_B * self.scaling))

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``apply`` written into ``out`` itself, without autograd (a mixed batch writing its rows
        into the layer's output): one in-place kernel, no new tensor. False where that does not
        apply (a subclass's own ``apply``, fused q/k/v slots, another dtype); then call ``apply``."""
        if (type(self).apply is not LoRA.apply or self.slots or self.scales_input is not None
                or out.dtype != self.lora_B.dtype or not out.is_contiguous()):
            return False
        if self.scale_mode:
            out.mul_(self._scale_vector())
        else:
            x = x.to(self.lora_A.dtype)
            after_a = (self.dropout(x) if self.training else x) @ self.lora_A.t()
            out.view(-1, out.shape[-1]).addmm_(after_a.reshape(-1, after_a.shape[-1]), self._scaled_up())
        return True

    def weight_delta(self) -> torch.Tensor:
        """``B A`` as an [out, in] matrix (add mode), or the [out] scale vector (scale mode)."""
        if self.scale_mode:
            return self._fill(self.lora_B.view(-1), 1.0) * self.scaling
        if self.slots:
            n, r = sum(self.slots), self.lora_B.shape[1]
            b = self.lora_B.view(n, -1, r)
            a = self.lora_A.view(n, r, -1)
            delta = torch.bmm(b, a).flatten(0, 1)  # [n * out/3, in]
            return self._fill(delta.t(), 0.0).t() * self.scaling
        return self.lora_B @ self.lora_A * self.scaling


def up_operand(b: torch.Tensor) -> torch.Tensor:
    """``b.t()`` ([r, out]) copied row-major, as the right operand of ``x_r @ b.t()``.

    Autograd computes a matrix operand's gradient in that operand's memory layout. For the
    transposed view it is ``grad.t() @ x_r`` ([out, tokens] @ [tokens, r]): a GEMM with r output
    columns, ~10x slower on CPU than the same product as ``x_r.t() @ grad`` ([r, tokens] @
    [tokens, out]), which a row-major operand gets. The copy is r * out numbers; the forward
    result is the same."""
    return b.t().contiguous()


def _hook(loras: list[LoRA]):
    def hook(module, args, out):
        x = args[0]
        for lora in loras:
            out = lora.apply(x, out)
        return out

    return hook


class LayerComposer:
    """Runs any composition block on one adapted linear layer (see ``composition.run``). The state
    is the pair (layer input x, current output y); an adapter maps y to ``lora.apply(x, y)``, so a
    Stack adds LoRA deltas (and multiplies IA3 scales) one after the other."""

    def __init__(self, loras: nn.ModuleDict, skip: set[str]):
        self.loras, self.skip = loras, skip

    def has(self, name: str) -> bool:
        return name in self.loras and name not in self.skip

    def single(self, name: str, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = state
        return x, self.loras[name].apply(x, y)

    def size(self, state: tuple[torch.Tensor, torch.Tensor], dim: int) -> int:
        return state[1].shape[dim]

    def take(self, state, dim: int, index: slice):
        return tuple(t[index] if dim == 0 else t[:, index] for t in state)

    def join(self, states, dim: int):
        return tuple(torch.cat(parts, dim=dim) for parts in zip(*states, strict=True))

    def average(self, base, states, weights: list[float]):
        """``y + sum_i w_i (y_i - y)``: the weighted sum of the children's deltas (with weights
        summing to 1, the weighted average of the adapted outputs; for IA3, of the scales)."""
        x, y = base
        return x, y + sum(w * (s[1] - y) for w, s in zip(weights, states, strict=True))

    def fuse(self, block, state, members):
        raise AssertionError("Fuse is refused for LoRA before any forward pass")  # check_support


def _compose_hook(setup: CompositionBlock, loras: nn.ModuleDict, skip: set[str]):
    composer = LayerComposer(loras, skip)

    plans: dict[int, list] = {}  # batch size -> [(rows, child, its LoRAs here or None: a block)]

    def plan(groups: list) -> list:
        return [(rows, child, [composer.loras[n] for n in ([child] if isinstance(child, str) else child.children)
                               if composer.has(n)] if isinstance(child, str) or is_plain_stack(child) else None)
                for rows, child in groups if touches(child, composer)]

    def hook(module, args, out):
        x = args[0]
        grad = torch.is_grad_enabled()
        steps = None if grad else plans.get(out.shape[0])
        if steps is None:
            groups = split_rows(setup, out.shape[0])
            if groups is None:
                return run(setup, (x, out), composer)[1]
            # Rows split at the top (mixed adapters in one batch): each group end to end on its rows.
            if grad:
                return torch.cat([run(child, (x[rows], out[rows]), composer)[1] for rows, child in groups])
            steps = plans[out.shape[0]] = plan(groups)
        for rows, child, loras in steps:  # no autograd: write the adapted rows into the fresh output
            part, x_rows = out[rows], x[rows]
            if loras is None:
                part.copy_(run(child, (x_rows, part), composer)[1])
                continue
            for lora in loras:
                if not lora.apply_into(x_rows, part):
                    part.copy_(lora.apply(x_rows, part))
        return out

    return hook


def module_ids(state: AdapterState, config: LoRAConfig) -> dict[int, str]:
    """Each module's name by its id, where ``rank_pattern`` / ``alpha_pattern`` need them."""
    if not config.rank_pattern and not config.alpha_pattern:
        return {}
    return {id(m): n for n, m in state.backbone.named_modules()}


def _input_scaled(state: AdapterState, config: LoRAConfig, targets: list[nn.Module]) -> set[int]:
    """The ids of the ``targets`` named by ``feedforward_modules``; refuses a name that matches
    no adapted layer, or a fused q/k/v layer."""
    if not config.feedforward_modules:
        return set()
    adapted = {id(m) for m in targets}
    named = {n: m for n, m in state.backbone.named_modules() if names_module(n, config.feedforward_modules)}
    found = {id(m) for m in named.values() if id(m) in adapted}
    if not found:
        raise ConfigError(f"feedforward_modules {config.feedforward_modules} names none of the layers this IA3 "
                          f"adapter scales (they are named by target_modules {config.target_modules})")
    return found


def module_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can adapt, for error messages."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def names_module(name: str, targets: list[str]) -> bool:
    """Whether a ``target_modules``-style list names module ``name``: an entry equal to the path
    or ending it after a dot (PEFT's rule for a list, also for ``feedforward_modules``)."""
    return any(name == t or name.endswith("." + t) for t in targets)


class LoRAFamily(MethodFamily):
    name = "lora"
    blocks = ("Stack", "Parallel", "BatchSplit", "Average", "Split")
    config_class = LoRAConfig
    containers = ("loras",)

    def per_position(self, config: LoRAConfig) -> bool:
        return not config.use_gating  # a gate averages over the sequence

    def targets(self, state: AdapterState, config: LoRAConfig) -> list[tuple[nn.Module, list[bool] | None]]:
        if config.target_modules:
            found = [m for n, m in state.backbone.named_modules() if names_module(n, config.target_modules)]
            if not found:
                names = sorted({n.rsplit(".", 1)[-1] for n in module_names(state.backbone)})
                raise ConfigError(
                    f"target_modules {config.target_modules} matched no layer of this "
                    f"{state.model_type} model; its linear layers are named: {', '.join(names)}"
                )
            return [(m, None) for m in found]
        found: list[tuple[nn.Module, list[bool] | None]] = []
        layers = layers_with_parts(state.backbone, state.require_architecture("LoRA without target_modules"))
        for i, (layer, arch) in enumerate(layers):  # `arch`: the entry of this layer's stack
            if i in config.leave_out:
                continue
            if config.selfattn_lora and arch.cross_q:  # AdapterHub adapts cross-attention with self-attention
                found += [(get_module(layer, getattr(arch, f"cross_{m}")), None) for m in config.attn_matrices if m != "o"]
            if config.selfattn_lora:
                if arch.fused_qkv:
                    slots = [m in config.attn_matrices for m in ("q", "k", "v")]
                    if any(slots):
                        found.append((get_module(layer, arch.q), slots))
                    if "o" in config.attn_matrices:
                        found.append((get_module(layer, arch.o), None))
                else:
                    found += [(get_module(layer, getattr(arch, m)), None) for m in config.attn_matrices]
            if config.intermediate_lora:
                found.append((get_module(layer, arch.lora_intermediate), None))
            if config.output_lora:
                found.append((get_module(layer, arch.lora_output), None))
        return found

    def add(self, state: AdapterState, name: str, config: LoRAConfig) -> None:
        targets = self.targets(state, config)
        inputs = _input_scaled(state, config, [m for m, _ in targets])
        names = module_ids(state, config)
        for module, slots in targets:
            if id(module) in inputs and (slots or not module.weight.is_floating_point()):
                raise ConfigError("feedforward_modules: IA3 scales the input of a separate projection with weights "
                                  "in floating point; this one is a fused q/k/v layer or quantized")
            if not hasattr(module, "loras"):
                module.add_module("loras", nn.ModuleDict())
            module.loras[name] = LoRA(*_features(module), config.for_module(names.get(id(module), "")), slots,
                                      scales_input=module if id(module) in inputs else None)

    @staticmethod
    def _layers_with(state: AdapterState, name: str | None = None):
        for module in state.modules():
            loras = module._modules.get("loras")  # a dict look-up: nn.Module's getattr is slow when missing
            if isinstance(loras, nn.ModuleDict) and (name is None or name in loras):
                yield module, loras

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        names = [n for n in self.active_names(state, setup) if n not in state.merged]  # merged: in the weights
        handles = []
        for module, loras in state.derived("loras", lambda modules: list(self._layers_with(state))):
            active = [n for n in names if n in loras]
            if not active:
                continue
            if is_plain_stack(setup):
                handles.append(module.register_forward_hook(_hook([loras[n] for n in active])))
            else:
                handles.append(module.register_forward_hook(_compose_hook(setup, loras, set(state.merged))))
        return handles

    @torch.no_grad()
    def average_svd(self, state: AdapterState, name: str, sources: list[str], weights: list[float], rank: int) -> None:
        """Set LoRA ``name`` (rank ``rank``) to the best rank-``rank`` approximation of the weighted
        sum of the sources' deltas ``scaling * B A`` (its own scaling included, so an adapter with
        a different r or alpha gets the same delta)."""
        for _, loras in self._layers_with(state, name):
            target = loras[name]
            if target.slots or target.scale_mode:
                kind = "IA3" if target.scale_mode else "fused q/k/v (GPT-2 c_attn)"
                raise ConfigError(f"lora_delta_w_svd cannot factor {kind} adapters; use combine_strategy='linear'")
            delta = sum(w * loras[s].weight_delta().float() for s, w in zip(sources, weights, strict=True))
            u, singular, vh = torch.linalg.svd(delta, full_matrices=False)
            k = min(rank, singular.shape[0])
            target.lora_A.zero_()
            target.lora_B.zero_()
            target.lora_A[:k] = vh[:k].to(target.lora_A.dtype)
            target.lora_B[:, :k] = (u[:, :k] * singular[:k] / target.scaling).to(target.lora_B.dtype)

    @torch.no_grad()
    def combine_into(self, state: AdapterState, name: str, sources: list[str], weights: list[float], strategy: str,
                     *, density: float = 1.0, sign_method: str = "total", generator: torch.Generator | None = None,
                     ) -> None:
        """Set LoRA ``name`` from the sources as PEFT's ``add_weighted_adapter`` does, layer by layer in
        the model's module order: ``cat`` stacks the ranks (A_i scaled by w_i * scaling_i); ``svd``
        and ``<strategy>_svd`` combine the deltas ``scaling_i B_i A_i`` and keep the top singular
        directions (``name``'s rank); the other strategies combine the A's and the B's apart, with
        weights ``±sqrt(|w_i * scaling_i|)`` (the sign on A). ``name``'s own scaling is divided out."""
        for _, loras in self._layers_with(state, name):
            target, parts = loras[name], [loras[s] for s in sources]
            if any(p.slots or p.scale_mode for p in (target, *parts)):
                kind = "IA3" if target.scale_mode else "fused q/k/v (GPT-2 c_attn)"
                raise ConfigError(f"combine strategy '{strategy}' works on LoRA's A and B, not on {kind} adapters")
            if strategy == "cat":
                a = torch.cat([p.lora_A * w * p.scaling for p, w in zip(parts, weights, strict=True)])
                b = torch.cat([p.lora_B for p in parts], dim=1)
            elif strategy == "svd" or strategy.endswith("_svd"):
                rule = "task_arithmetic" if strategy == "svd" else strategy.removesuffix("_svd")
                delta = merging.combine([p.weight_delta() for p in parts], weights, rule, density=density,
                                        sign_method=sign_method, generator=generator)
                u, singular, vh = torch.linalg.svd(delta, full_matrices=True)
                rank = target.lora_A.shape[0]
                a, b = vh[:rank], u[:, :rank] @ torch.diag(singular[:rank])
            else:
                scaled = [w * p.scaling for p, w in zip(parts, weights, strict=True)]
                a = merging.combine([p.lora_A for p in parts], [math.copysign(math.sqrt(abs(x)), x) for x in scaled],
                                    strategy, density=density, sign_method=sign_method, generator=generator)
                b = merging.combine([p.lora_B for p in parts], [math.sqrt(abs(x)) for x in scaled],
                                    strategy, density=density, sign_method=sign_method, generator=generator)
            target.lora_A.copy_(a)
            target.lora_B.copy_(b / target.scaling)

    @torch.no_grad()
    def _apply_weight(self, state: AdapterState, name: str, undo: bool) -> None:
        for module, loras in self._layers_with(state, name):
            lora = loras[name]
            delta = lora.weight_delta().to(module.weight.dtype)
            if lora.scales_input is not None:  # W diag(l): the weight's input columns; the bias stays
                factor = 1.0 / delta if undo else delta
                module.weight.mul_(factor[:, None] if _is_conv1d(module) else factor)
            elif lora.scale_mode:
                factor = 1.0 / delta if undo else delta
                # Scale both weight and bias so the merged layer equals the hooked one exactly.
                module.weight.mul_(factor if _is_conv1d(module) else factor[:, None])
                if module.bias is not None:
                    module.bias.mul_(factor)
            else:
                delta = delta.t() if _is_conv1d(module) else delta
                module.weight.sub_(delta) if undo else module.weight.add_(delta)

    def merge(self, state: AdapterState, name: str) -> None:
        self._apply_weight(state, name, undo=False)

    def unmerge(self, state: AdapterState, name: str) -> None:
        self._apply_weight(state, name, undo=True)
