"""Bottleneck adapters: ``seq_bn`` (Pfeiffer), ``double_seq_bn`` (Houlsby), ``par_bn`` (parallel),
``scaled_par_bn`` (a learned scaling), ``seq_bn_inv`` / ``double_seq_bn_inv`` (with an invertible
NICE adapter on the embeddings) and ``compacter`` / ``compacter++`` (Houlsby / Pfeiffer placement
with PHM projections, see ``phm.py``).

A bottleneck adapter is ``f(x) = scaling * W_up act(W_down x + b_down) + b_up`` (shapes: x [B,T,H],
W_down [d,H], W_up [H,d], d = H // reduction_factor), placed around a residual sub-layer of every
transformer layer. With ``h`` the sub-layer output, ``r`` the residual stream and ``LN`` the layer's
own norm (``None`` in pre-LN models, where it becomes a plain sum), the defaults compute:

* seq_bn (FFN only):             ``LN(f(LN(h + r)) + h + r)``
* double_seq_bn (attn and FFN):  ``LN(f(h) + h + r)``
* par_bn (FFN only):             ``LN(h + 4 * f(r) + r)``

which is AdapterHub's ``bottleneck_layer_forward`` with its ``original_ln_before``,
``residual_before_ln`` and ``original_ln_after`` flags. We reach ``h`` and ``r`` with forward hooks
on the unmodified model, at the places the architecture table names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle
from transformers.activations import ACT2FN, get_activation

from ..architectures import Site, get_module, layers_with_parts
from ..composition import (
    BatchSplit,
    CompositionBlock,
    CompositionError,
    Fuse,
    Parallel,
    blocks_in,
    is_plain_stack,
    row_groups,
    run,
    split_rows,
    touches,
)
from ..schema import spec
from .base import ConfigError, MethodConfig
from .family import AdapterState, MethodFamily
from .fusion import FusionConfig, FusionLayer
from .phm import PHMLayer, shared_parameters

# Activation names a bottleneck (or prefix MLP) accepts: transformers' table plus AdapterHub's leakyrelu.
ACTIVATIONS: tuple[str, ...] = tuple(sorted({*ACT2FN, "leakyrelu"}))

# Fields AdapterHub writes whose only value we support is the default.
_FOREIGN_DEFAULTS: dict[str, Any] = {"stochastic_depth": 0.0}


@dataclasses.dataclass
class BnConfig(MethodConfig):
    """Bottleneck adapter config (AdapterHub's ``BnConfig``; defaults here are ``seq_bn``'s).

    The flags ``original_ln_before``, ``residual_before_ln`` and ``original_ln_after`` place the
    adapter relative to the layer's own norm and residual (see the module docstring).

    Attributes:
        mh_adapter: put an adapter after the attention sub-layer.
        output_adapter: put an adapter after the FFN sub-layer.
        cross_adapter: put an adapter after an encoder-decoder's cross-attention.
        reduction_factor: H // reduction_factor is the bottleneck width; a dict maps layer indices
            (as strings) or "default" to a factor.
        non_linearity: the activation between the down- and up-projection (relu, swish, gelu,
            tanh, leakyrelu, ...).
        original_ln_before: the adapter reads the sub-layer output after the residual is added and
            the layer's norm applied.
        original_ln_after: add the residual and apply the layer's norm after the adapter.
        ln_before: an extra LayerNorm on the adapter's input.
        ln_after: an extra LayerNorm on the adapter's output.
        init_weights: "bert" (N(0, 0.02)), "mam_adapter" (zero up-projection) or "houlsby"
            (truncated normal, std 0.01).
        init_weights_seed: seed the random generator with this before initialising the weights
            (None or 0: the global random state).
        is_parallel: the adapter reads the sub-layer input and its output is added (``par_bn``).
        scaling: multiplies the adapter's output: a float, "learned" (one scalar) or "channel"
            (one per hidden unit).
        use_gating: a learned gate, the mean over tokens of sigmoid(linear(x)), scales the output
            (UniPELT).
        residual_before_ln: the residual the adapter adds to its output: True the sub-layer
            output h, False the adapter's input, "post_add" h plus the residual stream, before the
            norm.
        adapter_residual_before_ln: add the residual before the adapter's own ``ln_after`` norm
            (else after it).
        inv_adapter: "nice" adds an invertible adapter on the token embeddings (MAD-X).
        inv_adapter_reduction_factor: the invertible adapter's reduction factor.
        leave_out: layer indices that get no adapter.
        dropout: dropout on the adapter's output.
        phm_layer: PHM projections instead of linear ones (Compacter).
        phm_dim: n of the hypercomplex product (divides the hidden size and the bottleneck width).
        factorized_phm_W: the PHM weights are products W_left_i W_right_i of rank ``phm_rank``.
        shared_W_phm: one set of PHM weights for every layer of the adapter.
        shared_phm_rule: one set of PHM rules for every layer of the adapter.
        factorized_phm_rule: the PHM rules are rank-1 products.
        phm_c_init: initialisation of the rules: "normal" (std ``phm_init_range``) or "uniform".
        phm_init_range: the std of "normal" initialisations of the rules and weights.
        learn_phm: train the PHM rules (else they keep their initial values).
        hypercomplex_nonlinearity: initialisation of the PHM weights: "glorot-uniform",
            "glorot-normal" (also "phm") or "normal".
        phm_rank: rank of the factorised PHM weights.
        phm_bias: the PHM layers have a bias.
    """

    family: ClassVar[str] = "bottleneck"
    foreign_defaults: ClassVar[dict[str, Any]] = _FOREIGN_DEFAULTS

    mh_adapter: bool = False
    output_adapter: bool = True
    cross_adapter: bool = False
    reduction_factor: float | dict = spec(16, gt=0)
    non_linearity: str = spec("relu", choices=ACTIVATIONS)
    original_ln_before: bool = True
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = spec("bert", choices=("bert", "mam_adapter", "houlsby"))
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = spec(1.0, choices=("learned", "channel"))
    use_gating: bool = False
    residual_before_ln: bool | str = spec(True, choices=("post_add",))
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = spec(None, choices=("nice",))
    inv_adapter_reduction_factor: float | None = spec(None, gt=0)
    leave_out: list[int] = spec(factory=list, ge=0)
    dropout: float = spec(0.0, ge=0, lt=1)
    phm_layer: bool = False
    phm_dim: int = spec(4, ge=1)
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = spec("normal", choices=("normal", "uniform"))
    phm_init_range: float = spec(0.0001, gt=0)
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = spec("glorot-uniform", choices=("phm", "glorot-normal", "glorot-uniform", "normal"))
    phm_rank: int = spec(1, ge=1)
    phm_bias: bool = True

    def validate(self) -> None:
        if not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            raise ConfigError("output_adapter: a bottleneck adapter needs mh_adapter or output_adapter set")
        if isinstance(self.reduction_factor, dict):
            problems = [f"reduction_factor.{layer}: must be a number > 0, got {factor!r}"
                        for layer, factor in self.reduction_factor.items()
                        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 0]
            if problems:
                raise ConfigError(problems)

    def width(self, hidden_size: int, layer: int) -> int:
        factor = self.reduction_factor
        if isinstance(factor, dict):
            factor = factor.get(str(layer), factor.get("default"))
            if factor is None:
                raise ConfigError(f"reduction_factor has no entry for layer {layer} and no 'default'")
        return max(int(hidden_size // factor), 1)


def _activation(name: str) -> nn.Module:
    name = name.lower()
    if name == "leakyrelu":
        return nn.LeakyReLU(0.01)
    return get_activation(name)


class BottleneckAdapter(nn.Module):
    """One bottleneck module: ``adapter_down`` = [LayerNorm?, Linear(H, d), act], ``adapter_up`` =
    Linear(d, H). Parameter names match AdapterHub's files."""

    def __init__(self, hidden_size: int, width: int, config: BnConfig, shared: nn.ParameterDict | None = None):
        super().__init__()
        self.config = config
        down: list[nn.Module] = [nn.LayerNorm(hidden_size)] if config.ln_before else []
        if config.phm_layer:  # Compacter: the projections are PHM layers (``shared``: the adapter's shared tensors)
            down += [PHMLayer(hidden_size, width, "down", config, shared), _activation(config.non_linearity)]
            self.adapter_down = nn.Sequential(*down)
            self.adapter_up: nn.Module = PHMLayer(width, hidden_size, "up", config, shared)
        else:
            down += [nn.Linear(hidden_size, width), _activation(config.non_linearity)]
            self.adapter_down = nn.Sequential(*down)
            self.adapter_up = nn.Linear(width, hidden_size)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        self.adapter_norm_after = nn.LayerNorm(hidden_size) if config.ln_after else None
        self.gate = nn.Linear(hidden_size, 1) if config.use_gating else None
        self.dropout = nn.Dropout(config.dropout)
        self.hooked = False  # set at a "hooked" site: the model adds the residual and norm after us
        self.reset_parameters()

    @property
    def weight_dtype(self) -> torch.dtype:
        up = self.adapter_up
        return up.weight.dtype if isinstance(up, nn.Linear) else next(up.parameters()).dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        down, up = self.adapter_down[-2], self.adapter_up
        init = self.config.init_weights
        if self.config.init_weights_seed:
            torch.manual_seed(self.config.init_weights_seed)
        if init == "bert":
            for linear in (down, up, self.gate):
                if isinstance(linear, nn.Linear):  # PHM layers keep their own initialisation
                    linear.weight.normal_(0.0, 0.02)
                    linear.bias.zero_()
        elif isinstance(down, PHMLayer):
            pass
        elif init == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            down.bias.zero_()
            up.weight.zero_()
            up.bias.zero_()
        elif init == "houlsby":
            for linear in (down, up):
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-0.02, b=0.02)
                linear.bias.zero_()

    def _delta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's contribution and its scaled up-projection (what AdapterFusion attends over)."""
        up = self.adapter_up(self.adapter_down(x))
        if not (isinstance(self.scaling, float) and self.scaling == 1.0):
            up = up * self.scaling
        out = self.dropout(up) if self.training else up
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)  # [B, 1, 1]
            out = out * gate
        return out, up

    # The three steps below mirror AdapterHub's pre_forward / forward / post_forward.
    def pre_forward(self, h: torch.Tensor, r: torch.Tensor, norm: Callable | None,
                    normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``normed``, when given, is ``norm(h + r)`` as the model already computed it."""
        cfg = self.config
        if cfg.is_parallel:
            return r, r
        residual = h if cfg.residual_before_ln is True else None
        if cfg.original_ln_before:
            if normed is not None and norm is not None and residual is not None:
                h = normed  # the model's own norm(h + r): the sum itself is not needed
            else:
                summed = h if r is None else h + r  # no residual: Phi's FFN, which shares the attention's
                if cfg.residual_before_ln == "post_add":
                    residual = summed
                h = summed if norm is None else normed if normed is not None else norm(summed)
        if residual is None:
            residual = h
        return h, residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor, return_up: bool = False):
        out, up = self._delta(x)
        if self.config.is_parallel:
            out = self.adapter_norm_after(out) if self.adapter_norm_after is not None else out
        else:
            if self.config.adapter_residual_before_ln:
                out = out + residual
            if self.adapter_norm_after is not None:
                out = self.adapter_norm_after(out)
            if not self.config.adapter_residual_before_ln:
                out = out + residual
        return (out, up) if return_up else out

    def fusion_query(self, h: torch.Tensor, x: torch.Tensor, r: torch.Tensor, before_ln: bool) -> torch.Tensor:
        """What a fusion layer queries with when this adapter is the fusion's last member: the
        adapter input (or the sub-layer output before the norm); a parallel adapter's residual."""
        if self.config.is_parallel:
            return r
        return h if before_ln else x

    def post_forward(self, out: torch.Tensor, h_in: torch.Tensor, r: torch.Tensor, norm: Callable | None) -> torch.Tensor:
        if self.config.is_parallel:
            out = out + h_in
        if self.config.original_ln_after and not self.hooked:
            out = out + r
            if norm is not None:
                out = norm(out)
        return out


def run_site(adapters: list[BottleneckAdapter], h: torch.Tensor, r: torch.Tensor, norm: Callable | None,
             normed: torch.Tensor | None = None) -> torch.Tensor:
    """The output of one sub-layer with ``adapters`` stacked on it (what the layer's own
    ``norm(h + r)`` or ``h + r`` becomes). ``normed`` is the model's own ``norm(h + r)``, reused
    by the first adapter instead of normalising again."""
    dtype = h.dtype
    weight_dtype = adapters[0].weight_dtype
    if dtype != weight_dtype:  # e.g. a bf16 backbone with fp32 adapters
        h, r = h.to(weight_dtype), None if r is None else r.to(weight_dtype)
    h_in = h
    if normed is not None and normed.dtype != h.dtype:
        normed = None
    for i, adapter in enumerate(adapters):
        x, residual = adapter.pre_forward(h, r, norm, normed if i == 0 else None)
        h = adapter(x, residual)
    return adapters[-1].post_forward(h, h_in, r, norm).to(dtype)


@dataclasses.dataclass
class _SiteState:
    """What a composition passes between adapters at one site (AdapterHub's BottleneckState).

    h: the sub-layer output as the next adapter sees it [B, T, H]; r: the residual stream;
    h_in: the unadapted sub-layer output (parallel adapters add to it); normed: the model's own
    ``norm(h + r)`` while h is untouched; up: the last adapter's up-projection (for Fuse);
    last: per row, the adapter whose post_forward finishes it (None: the layer's own residual/norm).
    """

    h: torch.Tensor
    r: torch.Tensor
    h_in: torch.Tensor
    normed: torch.Tensor | None
    up: torch.Tensor | None
    last: list[BottleneckAdapter | None]


def _cat(parts: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(parts, dim=dim)  # type: ignore[arg-type]


def _last_per_row(states: list[_SiteState]) -> list[BottleneckAdapter | None]:
    """Per row, the last adapter any of ``states`` applied."""
    rows = zip(*(s.last for s in states), strict=True)
    return [next((a for a in reversed(row) if a is not None), None) for row in rows]


class SiteComposer:
    """Runs any composition block at one bottleneck site (see ``composition.run``)."""

    def __init__(self, adapters: nn.ModuleDict, fusions: nn.ModuleDict | None, norm: Callable | None,
                 on_attention: Callable[[str, list[str], torch.Tensor], None] | None = None):
        self.adapters, self.fusions, self.norm, self.on_attention = adapters, fusions, norm, on_attention

    def has(self, name: str) -> bool:
        return name in self.adapters

    def single(self, name: str, s: _SiteState) -> _SiteState:
        adapter = self.adapters[name]
        x, residual = adapter.pre_forward(s.h, s.r, self.norm, s.normed)
        out, up = adapter(x, residual, return_up=True)
        return _SiteState(out, s.r, s.h_in, None, up, [adapter] * out.shape[0])

    def size(self, s: _SiteState, dim: int) -> int:
        return s.h.shape[dim]

    def take(self, s: _SiteState, dim: int, index: slice) -> _SiteState:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index] if dim == 0 else t[:, index]

        return _SiteState(cut(s.h), cut(s.r), cut(s.h_in), cut(s.normed), cut(s.up),  # type: ignore[arg-type]
                          s.last[index] if dim == 0 else s.last)

    def join(self, states: list[_SiteState], dim: int) -> _SiteState:
        last = [a for s in states for a in s.last] if dim == 0 else _last_per_row(states)
        return _SiteState(*(_cat([getattr(s, f) for s in states], dim) for f in ("h", "r", "h_in", "normed", "up")),
                          last)  # type: ignore[arg-type]

    def average(self, base: _SiteState, states: list[_SiteState], weights: list[float]) -> _SiteState:
        h = sum(w * s.h for w, s in zip(weights, states, strict=True))
        return _SiteState(h, base.r, base.h_in, None, None, _last_per_row(states))  # type: ignore[arg-type]

    def fuse(self, block: Fuse, s: _SiteState, members: list[_SiteState]) -> _SiteState:
        fusion = self.fusions[block.name] if self.fusions is not None and block.name in self.fusions else None
        present = [n for n in block.flatten() if n in self.adapters]
        if fusion is None:
            raise CompositionError(f"no fusion layer '{block.name}' where its members sit; add it with "
                                   f"add_adapter_fusion(Fuse({', '.join(map(repr, block.flatten()))}))")
        last = self.adapters[present[-1]]  # AdapterHub: the last member's config shapes the query
        x, residual = last.pre_forward(s.h, s.r, self.norm, s.normed)
        query = last.fusion_query(s.h, x, s.r, fusion.config.query_before_ln)
        ups = torch.stack([m.up for m in members], dim=2)  # type: ignore[misc]
        out, probs = fusion(query, ups, residual)
        if self.on_attention is not None:  # the members that took part, named as in the fusion
            took_part = [c if isinstance(c, str) else c.last() for c in block.children
                         if any(n in self.adapters for n in ([c] if isinstance(c, str) else c.flatten()))]
            self.on_attention(block.name, took_part, probs)
        return _SiteState(out, s.r, s.h_in, None, None, [last] * out.shape[0])


def compose_site(block: CompositionBlock, composer: SiteComposer, h: torch.Tensor, r: torch.Tensor,
                 norm: Callable | None, normed: torch.Tensor | None = None) -> torch.Tensor:
    """``run_site`` for any composition block: run it, then finish each run of rows with the
    post_forward of the adapter that acted last on them (rows no adapter touched get the
    layer's own ``norm(h + r)``)."""
    groups = split_rows(block, h.shape[0])
    if groups is not None:  # rows split at the top (mixed adapters in one batch): each group end to end
        return _compose_rows(groups, composer, h, r, norm, normed)
    dtype = h.dtype
    some_adapter = next(iter(composer.adapters.values()))
    weight_dtype = some_adapter.weight_dtype
    if dtype != weight_dtype:
        h, r = h.to(weight_dtype), None if r is None else r.to(weight_dtype)
    if normed is not None and normed.dtype != h.dtype:
        normed = None
    if r is None:  # a site without its own residual: compose as if it were zero
        r = torch.zeros_like(h)
    s = run(block, _SiteState(h, r, h, normed, None, [None] * h.shape[0]), composer)
    parts, start = [], 0
    for end in range(1, len(s.last) + 1):
        if end == len(s.last) or s.last[end] is not s.last[start]:
            rows = slice(start, end)
            adapter, out, h_in, r_rows = s.last[start], s.h[rows], s.h_in[rows], s.r[rows]
            if adapter is not None:
                parts.append(adapter.post_forward(out, h_in, r_rows, norm))
            elif some_adapter.hooked:  # the model adds the residual itself
                parts.append(out)
            else:
                parts.append(out + r_rows if norm is None else norm(out + r_rows))
            start = end
    return torch.cat(parts).to(dtype) if len(parts) > 1 else parts[0].to(dtype)


def _compose_rows(groups: list[tuple[slice, str | CompositionBlock]], composer: SiteComposer, h: torch.Tensor,
                  r: torch.Tensor | None, norm: Callable | None, normed: torch.Tensor | None) -> torch.Tensor:
    """``compose_site`` for a batch split at the top: each group of rows end to end. Rows whose
    adapters have none at this site keep what the layer computes without adapters (the model's own
    ``norm(h + r)``, or ``h`` where the model adds the residual itself); without autograd the
    other groups are written into that tensor instead of joining fresh pieces."""
    def rows_of(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if t is None else t[rows]

    hooked = next(iter(composer.adapters.values())).hooked
    unadapted = h if hooked else normed if normed is not None and normed.dtype == h.dtype else None

    def group(rows: slice, child: str | CompositionBlock) -> torch.Tensor:
        if isinstance(child, str) or is_plain_stack(child):  # what the adapters alone run (run_site)
            present = [composer.adapters[n] for n in ([child] if isinstance(child, str) else child.children)
                       if n in composer.adapters]
            if present:
                return run_site(present, h[rows], rows_of(r, rows), norm, rows_of(normed, rows))
        return compose_site(child, composer, h[rows], rows_of(r, rows), norm, rows_of(normed, rows))

    if unadapted is None:
        return torch.cat([group(rows, child) for rows, child in groups])
    if not torch.is_grad_enabled():
        for rows, child in groups:
            if touches(child, composer):
                unadapted[rows] = group(rows, child)
        return unadapted
    return torch.cat([group(rows, child) if touches(child, composer) else unadapted[rows] for rows, child in groups])


class NICECoupling(nn.Module):
    """Invertible adapter (NICE additive coupling) on the embeddings: with x = [x1, x2] split on the
    hidden axis, ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; ``inverse`` undoes it exactly."""

    def __init__(self, hidden_size: int, reduction_factor: float, non_linearity: str):
        super().__init__()
        self.split = hidden_size // 2
        s1, s2 = self.split, hidden_size - self.split

        def subnet(n_in: int, n_out: int) -> nn.Sequential:
            mid = int(n_in // reduction_factor)
            return nn.Sequential(nn.Linear(n_in, mid), _activation(non_linearity), nn.Linear(mid, n_out))

        self.F = subnet(s2, s1)
        self.G = subnet(s1, s2)
        with torch.no_grad():
            for linear in (self.F[0], self.F[2], self.G[0], self.G[2]):
                linear.weight.normal_(0.0, 0.02)
                linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split :]
        y1 = x1 + self.F(x2)
        return torch.cat([y1, x2 + self.G(y1)], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[..., : self.split], y[..., self.split :]
        x2 = y2 - self.G(y1)
        return torch.cat([y1 - self.F(x2), x2], dim=-1)


def _call_arg(args: tuple, kwargs: dict, index: int | str) -> torch.Tensor:
    if isinstance(index, int) and len(args) > index:
        return args[index]
    for key in ((index,) if isinstance(index, str) else ()) + ("hidden_states", "input_tensor", "x"):
        if key in kwargs:
            return kwargs[key]
    raise RuntimeError(f"could not find the residual input (argument {index!r}) of a hooked module")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


class _Capture:
    """Carries ``r`` (and ``h``) from the hook that sees it to the hook that uses it, within one
    forward call of one layer. ``r`` is kept after use: gradient checkpointing runs a layer's
    forward again without its own hooks, so a residual grabbed by a hook on the layer itself
    (DistilBERT's attention input) must still be there."""

    __slots__ = ("r", "h")

    def __init__(self) -> None:
        self.r = self.h = None


def _hook_site(layer: nn.Module, site: Site, compute: Callable[..., torch.Tensor]) -> list[RemovableHandle]:
    """Hooks that replace the sub-layer's ``norm(h + r)`` (or ``h + r``) by ``compute(h, r, norm,
    normed)``: ``run_site`` for a stack of adapters, ``compose_site`` for any block."""
    capture = _Capture()

    def grab_residual(module, args, kwargs):
        capture.r = _call_arg(args, kwargs, site.residual_arg)

    handles = []
    if site.residual is not None:
        handles.append(get_module(layer, site.residual).register_forward_pre_hook(grab_residual, with_kwargs=True))
    output_module = get_module(layer, site.output)
    if site.hooked:
        # The adapters' result replaces the projection's output; the model adds its residual and
        # norms afterwards. ``norm`` only serves the adapters' own ``original_ln_before``.
        norm = get_module(layer, site.norm).forward if site.norm else None

        def adapt_hooked(module, args, output):
            r = capture.r
            return _replace_first(output, compute(_first(output), r, norm))

        handles.append(output_module.register_forward_hook(adapt_hooked))
    elif site.norm is None:
        # Pre-LN: the layer computes ``h + r`` itself, so hand it ``y - r``.
        def adapt_output(module, args, output):
            r = capture.r
            y = compute(_first(output), r, None)
            return _replace_first(output, y - r)

        handles.append(output_module.register_forward_hook(adapt_output))
    else:
        # Post-LN: keep ``h`` and replace what the layer's norm returns for ``h + r``. The norm is
        # called through ``.forward`` inside the hook so that the hook does not run again.
        norm_module = get_module(layer, site.norm)

        def grab_output(module, args, output):
            capture.h = _first(output)

        def adapt_norm(module, args, output):
            h, r = capture.h, capture.r
            capture.h = None
            if site.swap:
                h, r = r, h
            return compute(h, r, norm_module.forward, output)

        handles.append(output_module.register_forward_hook(grab_output))
        handles.append(norm_module.register_forward_hook(adapt_norm))
    return handles


class BottleneckFamily(MethodFamily):
    name = "bottleneck"
    blocks = ("Stack", "Fuse", "Parallel", "BatchSplit", "Average", "Split")
    config_class = BnConfig
    containers = ("adapters", "invertible_adapters", "shared_parameters")

    def per_position(self, config: BnConfig) -> bool:
        return not config.use_gating  # a gate averages over the sequence

    @staticmethod
    def _layer_sites(part) -> tuple[tuple[str, str, Site | None], ...]:
        """(site name, config flag, site) of one layer (the cross-attention in a decoder layer)."""
        return (("attention", "mh_adapter", part.attn_site), ("output", "output_adapter", part.ffn_site),
                ("cross", "cross_adapter", part.cross_site))

    def _sites(self, state: AdapterState, config: BnConfig) -> list[tuple[int, nn.Module, Site]]:
        return [(i, layer, site) for i, (layer, part) in enumerate(layers_with_parts(state.backbone, state.arch))
                if i not in config.leave_out
                for _, flag, site in self._layer_sites(part) if site is not None and getattr(config, flag)]

    @staticmethod
    def _container(layer: nn.Module, site: Site) -> nn.ModuleDict:
        try:
            host = get_module(layer, site.host)
        except AttributeError:
            host = nn.Module()
            parent, _, attr = site.host.rpartition(".")
            get_module(layer, parent).add_module(attr, host)
        if not hasattr(host, "adapters"):
            host.add_module("adapters", nn.ModuleDict())
        return host.adapters

    def add(self, state: AdapterState, name: str, config: BnConfig) -> None:
        state.require_architecture("bottleneck adapters")
        if config.is_parallel and any(site.residual is None for _, _, site in self._sites(state, config)):
            raise ConfigError(f"a parallel adapter reads the sub-layer's input, and {state.model_type}'s FFN has no "
                              "residual input of its own (it shares the attention's); use a sequential adapter")
        if config.inv_adapter:
            embed = state.backbone.get_input_embeddings()
            width = embed.weight.shape[1] if isinstance(embed, nn.Embedding) else None
            if width != state.hidden_size:
                what = f"{width} wide" if width else f"not token embeddings ({type(embed).__name__})"
                raise ConfigError(f"inv_adapter: the invertible adapter works on token embeddings as wide as the "
                                  f"hidden states; {state.model_type}'s are {what}, its hidden states {state.hidden_size}")
        shared = None
        if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm):
            if not hasattr(state.root, "shared_parameters"):
                state.root.add_module("shared_parameters", nn.ModuleDict())
            shared = shared_parameters(config, state.hidden_size, config.width(state.hidden_size, 0))
            state.root.shared_parameters[name] = shared
        for i, layer, site in self._sites(state, config):
            adapter = BottleneckAdapter(state.hidden_size, config.width(state.hidden_size, i), config, shared)
            adapter.hooked = site.hooked
            self._container(layer, site)[name] = adapter
        if config.inv_adapter:
            holder = state.invertible_root
            if not hasattr(holder, "invertible_adapters"):
                holder.add_module("invertible_adapters", nn.ModuleDict())
            factor = config.inv_adapter_reduction_factor or 2
            holder.invertible_adapters[name] = NICECoupling(state.hidden_size, factor, config.non_linearity)

    def _places(self, state: AdapterState):
        """(layer index, layer, site name, site, host module) for every site that hosts adapters."""
        for i, (layer, part) in enumerate(layers_with_parts(state.backbone, state.arch)):
            for site_name, _, site in self._layer_sites(part):
                if site is None:
                    continue
                try:
                    host = get_module(layer, site.host)
                except AttributeError:
                    continue
                yield i, layer, site_name, site, host

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        names = self.active_names(state, setup)
        if not names:
            return []
        handles: list[RemovableHandle] = []
        for i, layer, site_name, site, host in self._places(state):
            container = getattr(host, "adapters", None)
            if container is None or not any(n in container for n in names):
                continue
            if is_plain_stack(setup):
                compute = functools.partial(run_site, [container[n] for n in names if n in container])
            else:
                record = functools.partial(state.on_fusion_attention, layer=i, site=site_name)
                fusions = getattr(host, "adapter_fusion_layer", None)
                compute = functools.partial(_compose, setup, container, fusions, record)
            handles += _hook_site(layer, site, compute)
        inv = getattr(state.invertible_root, "invertible_adapters", {})
        if any(n in inv for n in names):
            embeddings = get_module(state.backbone, state.arch.embeddings)
            apply = functools.partial(_invertible, setup, inv)
            if not any(isinstance(b, Parallel | BatchSplit) for b in blocks_in(setup)):
                # One group of rows: bind its adapter now, so that no adapter name is read in the
                # forward pass (torch.compile would guard on it and recompile for each adapter).
                apply = functools.partial(_invertible_one, inv[setup.first()] if setup.first() in inv else None)
            if state.arch.embeddings_input:  # they act on what the named module receives (T5's first block)
                hook = functools.partial(_invertible_input, apply)
                handles.append(embeddings.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(embeddings.register_forward_hook(apply))
        return handles

    # -- AdapterFusion layers ------------------------------------------------------------------------
    def fusion_sites(self, state: AdapterState, members: list[BnConfig], member_names: list[str]) -> list[str]:
        """The config flags of the sites every member sits at (AdapterHub places a fusion layer
        where all agree)."""
        wanted = []
        for flag in ("mh_adapter", "output_adapter", "cross_adapter"):
            values = [getattr(c, flag) for c in members]
            if any(values) and not all(values):
                which = ", ".join(f"'{n}'" for n, v in zip(member_names, values, strict=True) if v)
                raise CompositionError(
                    f"Fuse needs its members at the same places: only {which} of {member_names} set {flag}")
            if all(values):
                wanted.append(flag)
        return wanted

    def add_fusion(self, state: AdapterState, name: str, members: list[str], config: FusionConfig) -> None:
        configs = [state.adapters[n].config for n in members]
        dropout = config.dropout_prob
        if dropout is None:
            dropout = float(getattr(state.model.config, "attention_probs_dropout_prob", 0.0) or 0.0)
        flags = self.fusion_sites(state, configs, members)  # type: ignore[arg-type]
        for layer, part in layers_with_parts(state.backbone, state.arch):
            for site in [site for _, flag, site in self._layer_sites(part) if flag in flags and site is not None]:
                self._container(layer, site)  # creates the host where no member has an adapter (leave_out)
                host = get_module(layer, site.host)
                if not hasattr(host, "adapter_fusion_layer"):
                    host.add_module("adapter_fusion_layer", nn.ModuleDict())
                host.adapter_fusion_layer[name] = FusionLayer(config, state.hidden_size, dropout)

    def delete_fusion(self, state: AdapterState, name: str) -> None:
        for module in list(state.backbone.modules()):
            holder = getattr(module, "adapter_fusion_layer", None)
            if isinstance(holder, nn.ModuleDict) and name in holder:
                del holder[name]

    def fusion_layers(self, state: AdapterState, name: str | None = None) -> list[FusionLayer]:
        return [layer for module in state.backbone.modules()
                for key, layer in getattr(module, "adapter_fusion_layer", {}).items() if name in (None, key)]


def _compose(setup: CompositionBlock, adapters: nn.ModuleDict, fusions: nn.ModuleDict | None, record: Callable,
             h: torch.Tensor, r: torch.Tensor, norm: Callable | None, normed: torch.Tensor | None = None) -> torch.Tensor:
    return compose_site(setup, SiteComposer(adapters, fusions, norm, record), h, r, norm, normed)


def _invertible_input(apply: Callable, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A pre-hook form of ``_invertible``: edit the module's first input instead of its output."""
    if args:
        return (apply(module, (), args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": apply(module, (), kwargs["hidden_states"])}


def _invertible_one(adapter: nn.Module | None, module: nn.Module, args: Any, output: Any) -> Any:
    """``_invertible`` when every row runs the same first adapter (None: one without an invertible adapter)."""
    return output if adapter is None else _replace_first(output, adapter(_first(output)))


def _invertible(setup: CompositionBlock, inv: nn.ModuleDict, module: nn.Module, args: Any, output: Any) -> Any:
    """The invertible adapter of the first adapter of each group of rows (AdapterHub: of the
    first active adapter; a Parallel/BatchSplit at the start gives each group its own)."""
    hidden = _first(output)
    parts = []
    for rows, node in row_groups(setup, hidden.shape[0], end="first"):
        first = node if isinstance(node, str) else node.first()
        parts.append(inv[first](hidden[rows]) if first in inv else hidden[rows])
    return _replace_first(output, parts[0] if len(parts) == 1 else torch.cat(parts))


_DOUBLE = {"mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}
_PARALLEL = {"original_ln_before": False, "reduction_factor": 2, "init_weights": "mam_adapter", "is_parallel": True,
             "scaling": 4.0}
_INV = {"inv_adapter": "nice", "inv_adapter_reduction_factor": 2}
_PHM = {"phm_layer": True, "reduction_factor": 32, "non_linearity": "gelu"}

PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {},
    "double_seq_bn": _DOUBLE,
    "par_bn": _PARALLEL,
    "scaled_par_bn": {**_PARALLEL, "scaling": "learned"},
    "seq_bn_inv": _INV,
    "double_seq_bn_inv": {**_DOUBLE, **_INV},
    "compacter": {**_DOUBLE, **_PHM},
    "compacter++": _PHM,
}


def identify(config: BnConfig) -> str:
    """The preset name a bottleneck config is closest to (for display and native files)."""
    if config.phm_layer:
        return "compacter" if config.mh_adapter else "compacter++"
    if config.inv_adapter:
        return "double_seq_bn_inv" if config.mh_adapter else "seq_bn_inv"
    if config.is_parallel:
        return "scaled_par_bn" if config.scaling == "learned" else "par_bn"
    if config.mh_adapter:
        return "double_seq_bn"
    return "seq_bn"

