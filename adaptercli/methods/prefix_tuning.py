"""Prefix tuning: trainable key/value prefixes joined to every self-attention layer.

A shared pool computes, from a learned embedding of ``prefix_length`` positions, the keys and
values of every layer: ``kv = W2 tanh(W1 wte + b1) + b2`` with kv [P, n_layers * 2 * kv_heads *
head_dim] (AdapterHub's ``PrefixTuning``; ``flat=True`` learns kv directly). Layer i uses rows
``[2i, 2i+1]`` of the layer axis. The prefixes of all layers are computed once per forward pass,
by a pre-hook on the backbone (outside the layers, which gradient checkpointing runs twice).

The prefix joins attention through the model's own attention-function interface: while a prefix
is active the model runs ``adaptercli_eager`` / ``adaptercli_sdpa``, which prepend the prefix to the
(already rotated) keys and values and widen the attention mask so every token sees the prefix,
then call the model's eager or SDPA function. Eager and SDPA therefore give the same result, with
or without a padding mask, for encoders and decoders (AdapterHub 1.3.0 drops the prefix under
SDPA when a mask is given).

DeBERTa computes its own (disentangled) attention scores; there, while a prefix is active, the
attention module runs :func:`_disentangled_attention` instead of its forward: the same projections
and relative-position terms, with the prefix joined as AdapterHub joins it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle
from transformers import PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..architectures import get_module, layers_with_parts, transformer_layers
from ..composition import CompositionBlock, is_plain_stack, run
from ..schema import spec
from .base import ConfigError, MethodConfig, family_config
from .bottleneck import ACTIVATIONS, _activation
from .family import AdapterState, MethodFamily
from .kept import kept


@dataclasses.dataclass
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning config (AdapterHub's ``PrefixTuningConfig``).

    Attributes:
        prefix_length: number of prefix positions.
        bottleneck_size: width of the MLP that reparametrises the prefixes.
        non_linearity: that MLP's activation.
        dropout: dropout on the prefix keys and values.
        flat: learn the keys and values directly (no MLP).
        leave_out: layer indices without a prefix.
        init_weights_seed: seed the random generator with this before initialising the weights
            (None or 0: the global random state).
        use_gating: a learned gate per layer (UniPELT): the mean over tokens of sigmoid(linear(x)),
            x the attention's input, scales each row's prefix keys and values.
        shared_gating: one gate for keys and values (else one each).
        encoder_prefix: in an encoder-decoder, also prefix the encoder's self-attention (the
            decoder's self-attention always gets one).
        cross_prefix: in an encoder-decoder, also prefix the decoder's cross-attention.
    """

    family: ClassVar[str] = "prefix_tuning"

    prefix_length: int = spec(30, ge=1)
    bottleneck_size: int = spec(512, ge=1)
    non_linearity: str = spec("tanh", choices=ACTIVATIONS)
    dropout: float = spec(0.0, ge=0, lt=1)
    flat: bool = False
    leave_out: list[int] = spec(factory=list, ge=0)
    init_weights_seed: int | None = None
    use_gating: bool = False
    shared_gating: bool = True
    encoder_prefix: bool = True
    cross_prefix: bool = True


class PrefixPool(nn.Module):
    """The keys/values of one prefix for the layers it reaches. Parameter names match AdapterHub's.

    ``layers`` are the indices of those layers (in the model, or in one place of an
    encoder-decoder): the layers ``leave_out`` does not name. As in AdapterHub, the pool holds a
    slice per such layer only, in their order, so the MLP's output is that many layers wide."""

    def __init__(self, layers: Sequence[int], kv_heads: int, head_dim: int, hidden_size: int,
                 config: PrefixTuningConfig):
        super().__init__()
        if not layers:
            raise ConfigError(f"leave_out {config.leave_out} leaves prefix tuning no layer to reach")
        if config.init_weights_seed:
            torch.manual_seed(config.init_weights_seed)
        self.slots = {layer: k for k, layer in enumerate(layers)}
        n_layers = len(layers)
        self.shape = (config.prefix_length, n_layers * 2, kv_heads, head_dim)
        self.flat = config.flat
        width = n_layers * 2 * kv_heads * head_dim
        if config.flat:
            self.control_trans = nn.Parameter(torch.randn(config.prefix_length * width))
        else:
            self.wte = nn.Embedding(config.prefix_length, hidden_size)
            self.control_trans = nn.Sequential(
                nn.Linear(hidden_size, config.bottleneck_size),
                _activation(config.non_linearity),
                nn.Linear(config.bottleneck_size, width),
            )
        self.dropout = nn.Dropout(config.dropout)
        self._per_layer: list[torch.Tensor] | None = None

    def clear(self) -> None:
        self._per_layer = None

    def ready(self) -> None:
        """Compute this forward pass's keys and values for every layer now (see ``layer_kv``)."""
        if self._per_layer is None:
            self._per_layer = kept(self, "prefixes", list(self.parameters()), self._compute)

    def _compute(self) -> list[torch.Tensor]:
        kv = self.control_trans if self.flat else self.control_trans(self.wte.weight)
        kv = self.dropout(kv.view(self.shape))  # [P, n_layers * 2, heads, dim]
        # One split for all layers: its backward concatenates, instead of zero-filling a
        # full-size gradient per layer as separate slices would.
        return [t.permute(1, 2, 0, 3) for t in kv.split(2, dim=1)]  # [2, heads, P, dim]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prefix of one layer, each [kv_heads, P, head_dim]. Computed once per
        forward pass; at inference once until a weight changes (the reparametrisation MLP is
        batch-independent work that a server would otherwise repeat for every batch)."""
        self.ready()
        kv = self._per_layer[self.slots[layer]]  # type: ignore[index]
        return kv[0], kv[1]


Gated = tuple[PrefixPool, nn.Linear | None]  # a pool and its gate at one layer (None: not gated)


class _RowPrefixes:
    """Composer (see ``composition.run``) whose state is (start, stop, groups): which prefixes each
    run of rows ``[a, b)`` joins, as ``(a, b, pools)``. A Stack joins prefixes; Parallel and
    BatchSplit give rows their own."""

    def __init__(self, pools: dict[str, Gated]):
        self.pools = pools

    def has(self, name: str) -> bool:
        return name in self.pools

    def single(self, name: str, state):
        start, stop, groups = state
        return start, stop, [(a, b, [*pools, self.pools[name]]) for a, b, pools in groups]

    def size(self, state, dim: int) -> int:
        return state[1] - state[0]

    def take(self, state, dim: int, index: slice):
        start, _, groups = state
        lo, hi = start + index.start, start + index.stop
        return lo, hi, [(max(a, lo), min(b, hi), pools) for a, b, pools in groups if max(a, lo) < min(b, hi)]

    def join(self, states, dim: int):
        return states[0][0], states[-1][1], [g for s in states for g in s[2]]

    def average(self, base, states, weights):
        raise AssertionError("Average is refused for prefix tuning before any forward pass")  # check_support

    fuse = average


class _LayerPrefix:
    """What an attention module needs to join its prefixes (plain object, not a submodule):
    the same pools for every row (a Stack), or a composition that gives groups of rows their own."""

    def __init__(self, layer: int, pools: list[Gated], setup: CompositionBlock | None = None,
                 by_name: dict[str, Gated] | None = None):
        # Each pool with its gate at this layer (None: ungated), held together: looking a gate up
        # by the pool's id() made torch.compile guard on that id and recompile for each adapter.
        self.layer, self.pools, self.setup, self.by_name = layer, pools, setup, by_name
        # T5: the widened position bias of each bias tensor seen in this forward pass (shared by layers)
        self.bias_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self.bias_stack: _BiasStack | None = None  # T5 stacks with a prefix in some layers (see _BiasStack)
        self.hidden: torch.Tensor | None = None  # the attention's input in this forward pass (for gates)

    def _kv(self, pools: list[Gated], dtype: torch.dtype, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The joined key/value prefix of ``pools`` (the first one first) for batch ``rows``, each
        [1, heads, P, dim], or [rows, heads, P, dim] when a gate scales them per row."""
        keys, values = [], []
        for pool, gate in pools:
            k, v = (t.unsqueeze(0) for t in pool.layer_kv(self.layer))
            if gate is not None:
                g = torch.sigmoid(gate(self.hidden[rows].to(gate.weight.dtype))).mean(dim=1)  # [rows, 1 or 2]
                k, v = k * g[:, 0].view(-1, 1, 1, 1), v * g[:, -1].view(-1, 1, 1, 1)
            keys.append(k)
            values.append(v)
        if len(pools) > 1:
            batch = max(k.shape[0] for k in keys)
            keys, values = [k.expand(batch, -1, -1, -1) for k in keys], [v.expand(batch, -1, -1, -1) for v in values]
        return torch.cat(keys, dim=2).to(dtype), torch.cat(values, dim=2).to(dtype)

    def row_groups(self, batch: int) -> list[tuple[int, int, list[Gated]]]:
        """Which prefixes each run of rows ``[a, b)`` of the batch joins, as ``(a, b, pools)``."""
        if self.setup is None:
            return [(0, batch, self.pools)]
        return run(self.setup, (0, batch, [(0, batch, [])]), _RowPrefixes(self.by_name or {}))[2]

    def join(self, query, key, value, mask, causal: bool, groups: list[tuple[int, int, list[Gated]]] | None = None):
        """Keys and values with the prefixes in front, and the mask widened to match, for the
        rows of ``groups`` (default: every row of the batch, as ``row_groups`` splits them)."""
        batch = key.shape[0]
        groups = self.row_groups(batch) if groups is None else groups
        if len(groups) == 1 and not groups[0][2]:
            return key, value, mask
        q_len, k_len = query.shape[2], key.shape[2]
        if mask is None and causal and q_len > 1:
            # SDPA would have used is_causal, which aligns the triangle top-left: wrong once the
            # prefix widens the keys. Build the causal mask explicitly (bool, True = attend).
            positions = torch.arange(k_len, device=key.device)
            mask = (positions[None, :] <= positions[-q_len:, None])[None, None]
        if mask is not None and mask.shape[-1] > k_len:
            mask = mask[..., -k_len:]
        if len(groups) == 1:  # every row joins the same prefixes
            pk, pv = self._kv(groups[0][2], key.dtype, slice(groups[0][0], groups[0][1]))
            n_prefix = pk.shape[2]
            pk, pv = (t.expand(batch, -1, -1, -1) for t in (pk, pv))
            if mask is not None:
                pad = (mask.new_ones if mask.dtype == torch.bool else mask.new_zeros)((*mask.shape[:-1], n_prefix))
                mask = torch.cat([pad, mask], dim=-1)
            return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask
        # Rows join different prefixes: each group's is left-padded to the longest (the padding
        # masked), written straight into the widened keys and values.
        kvs = [self._kv(pools, key.dtype, slice(a, b)) if pools else None for a, b, pools in groups]
        n_prefix = max(kv[0].shape[2] if kv else 0 for kv in kvs)
        keys, values = (t.new_empty(*t.shape[:2], n_prefix + k_len, t.shape[3]) for t in (key, value))
        keys[:, :, n_prefix:], values[:, :, n_prefix:] = key, value
        lengths = []
        for (a, b, _), kv in zip(groups, kvs, strict=True):
            length = kv[0].shape[2] if kv else 0
            keys[a:b, :, : n_prefix - length] = 0
            values[a:b, :, : n_prefix - length] = 0
            if kv:
                keys[a:b, :, n_prefix - length : n_prefix] = kv[0]
                values[a:b, :, n_prefix - length : n_prefix] = kv[1]
            lengths += [length] * (b - a)
        # valid[row, p]: prefix position p holds one of the row's own prefixes
        valid = torch.arange(n_prefix, device=key.device) >= n_prefix - torch.tensor(lengths, device=key.device)[:, None]
        if mask is None:
            mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=key.device)
        mask = mask.expand(batch, -1, -1, -1)
        shape = (batch, mask.shape[1], mask.shape[2], n_prefix)
        pad = valid[:, None, None, :].expand(shape)
        if mask.dtype != torch.bool:
            pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device).masked_fill(~pad, torch.finfo(mask.dtype).min)
        return keys, values, torch.cat([pad, mask], dim=-1)


def _with_prefix(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        if inner == "sdpa":
            function = ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            function = sys.modules[type(module).__module__].eager_attention_forward
            kwargs.pop("is_causal", None)
        prefix = getattr(module, "_adaptercli_prefix", None)
        if prefix is None:
            return function(module, query, key, value, attention_mask, **kwargs)
        causal = bool(getattr(module, "is_causal", False))

        def joined(query, key, value, mask, groups, kwargs, stack):
            k_len = key.shape[2]
            key, value, mask = prefix.join(query, key, value, mask, causal, groups)
            if key.shape[2] > k_len:
                if inner == "sdpa":
                    kwargs["is_causal"] = False  # the mask is explicit once the prefix widens the keys
                if kwargs.get("position_bias") is not None:
                    bias = kwargs["position_bias"]
                    if stack is not None and stack.zeroed:
                        kwargs["position_bias"] = bias.new_zeros(*bias.shape[:-1], key.shape[2])
                    else:
                        kwargs["position_bias"], real = _widened_bias(module, prefix, bias, query.shape[2],
                                                                      key.shape[2] - k_len, k_len, stack)
                        if stack is not None:
                            stack.widened, stack.zeroed = real, not real
                # One group: every row sees a prefix, so no row of the widened mask is fully masked.
                if inner == "sdpa" and len(groups) == 1 and _math_attention_applies(module, query, key, kwargs):
                    return _math_attention(query, key, value, mask, kwargs["dropout"], kwargs.get("scaling"))
            elif stack is not None and kwargs.get("position_bias") is not None and (stack.widened or stack.zeroed):
                # A layer without a prefix after one with it (AdapterHub's T5: the bias it is passed is
                # the prefixed layer's, one prefix too wide for it, and it puts zeros in its place).
                kwargs["position_bias"] = torch.zeros_like(kwargs["position_bias"])
                stack.widened, stack.zeroed = False, True
            return function(module, query, key, value, mask, **kwargs)

        batch = key.shape[0]
        groups = prefix.row_groups(batch)
        bias = kwargs.get("position_bias")
        if len(groups) == 1 or (inner != "sdpa" and bias is None):
            return joined(query, key, value, attention_mask, groups, kwargs, prefix.bias_stack)
        if bias is not None:
            return _by_group(joined, prefix.bias_stack, query, key, value, attention_mask, groups, kwargs), None
        # Rows join different prefixes (mixed adapters in one batch): each run of neighbouring
        # groups whose prefixes have one length attends together (without prefixes: as they are;
        # with: each row its own group's, no padding), never padded to the longest.
        def rows(run: list[tuple[int, int, list[Gated]]]) -> torch.Tensor:
            a, b = run[0][0], run[-1][1]
            mask = attention_mask
            if mask is not None and mask.shape[0] == batch:
                mask = mask[a:b]
            if not run[0][2]:
                within = [(0, b - a, [])]
            elif len(run) == 1:  # by the batch's rows, which a gate reads the attention's input by
                within = run
            else:  # ungated (see _joins_with): by the run's rows
                within = [(x - a, y - a, pools) for x, y, pools in run]
            return joined(query[a:b], key[a:b], value[a:b], mask, within, dict(kwargs), prefix.bias_stack)[0]

        runs: list[list[tuple[int, int, list[Gated]]]] = []
        for a, b, pools in groups:
            if runs and runs[-1][-1][1] == a and _joins_with(runs[-1][-1][2], pools):
                runs[-1].append((a, b, pools))
            else:
                runs.append([(a, b, pools)])
        return torch.cat([rows(run) for run in runs]), None

    return attention


def _by_group(joined: Callable, stack: _BiasStack | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, groups: list[tuple[int, int, list[Gated]]], kwargs: dict) -> torch.Tensor:
    """T5 (a relative position bias) with rows of a mixed batch joining different prefixes:
    AdapterHub's bias depends on the prefix (its length moves the keys' positions; a layer left out
    after a prefixed one sees zeros), so each group of rows attends on its own, with its own bias
    and its own history along the stack (``joined`` as ``_with_prefix`` defines it)."""
    batch = key.shape[0]

    def rows_of(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
        return t[a:b] if t is not None and t.dim() and t.shape[0] == batch and batch > 1 else t

    parts = []
    for a, b, pools in groups:
        part_kwargs = {**kwargs, "position_bias": rows_of(kwargs["position_bias"], a, b)}
        parts.append(joined(query[a:b], key[a:b], value[a:b], rows_of(mask, a, b), [(a, b, pools)], part_kwargs,
                            stack.of_rows(a, b) if stack is not None else None)[0])
    return torch.cat(parts)


def _joins_with(pools: list[Gated], others: list[Gated]) -> bool:
    """Whether two neighbouring groups of rows can attend in one call: both without prefixes, or
    both with ungated prefixes of one total length (no padding between them)."""
    if not pools or not others:
        return not pools and not others
    return (all(gate is None for _, gate in (*pools, *others))
            and sum(p.shape[0] for p, _ in pools) == sum(p.shape[0] for p, _ in others))


def _math_attention_applies(module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """Whether SDPA would run its math fallback here, which :func:`_math_attention` reproduces:
    training with attention dropout, on the CPU, in float32 (the fused CPU kernel has no dropout);
    and nothing the plain formula leaves out (a position bias, grouped key/value heads, softcap,
    attention weights asked for, a negative scale), outside torch.compile."""
    scaling = kwargs.get("scaling")
    return (query.device.type == "cpu" and query.dtype == key.dtype == torch.float32
            and kwargs.get("dropout", 0.0) > 0 and kwargs.get("position_bias") is None
            and getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False) and (scaling is None or scaling > 0)
            and not torch.compiler.is_compiling())


def _math_attention(query, key, value, mask, dropout: float, scaling: float | None):
    """SDPA's math fallback, operation for operation (the same dropout draws, the same result to
    the bit), less its guard for rows whose every key is masked: with a prefix seen by every row
    there are none, and the guard (isneginf, all, where over [B, heads, Q, P + K]) cost more than
    the softmax itself. Shapes as SDPA's; returns ([B, Q, heads, dim], None) as transformers' SDPA
    attention does."""
    scale = math.sqrt(scaling if scaling is not None else 1 / math.sqrt(query.shape[-1]))
    scores = torch.matmul(query * scale, key.transpose(-2, -1) * scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = nn.functional.dropout(torch.softmax(scores, dim=-1), dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _widened_bias(module: nn.Module, prefix: _LayerPrefix, bias: torch.Tensor, q_len: int, n_prefix: int,
                  k_len: int, stack: _BiasStack | None = None) -> tuple[torch.Tensor, bool]:
    """T5's relative position bias over the prefix and the keys, as AdapterHub computes it: the
    prefix takes key positions 0..P-1 (the keys move to P..), the layer with the relative
    attention table computes it and the later layers of the stack reuse it; elsewhere zeros.
    Returns it and whether it is the real bias (not zeros). Reused along ``stack`` only (a group
    of rows of a mixed batch has its own: its first prefixed layer may come later)."""
    key = (id(bias), n_prefix, id(stack))
    cached = prefix.bias_cache.get(key)
    if cached is not None and cached[0] is bias:  # the entry keeps `bias` alive, so its id is not reused
        return cached[1], cached[2]
    real = bool(getattr(module, "has_relative_attention_bias", False))
    if real:
        widened = module.compute_bias(q_len, n_prefix + k_len, device=bias.device, past_seen_tokens=k_len - q_len)
    else:
        widened = bias.new_zeros(1, bias.shape[1], q_len, n_prefix + k_len)
    widened = widened.to(bias.dtype)
    prefix.bias_cache[key] = (bias, widened, real)
    return widened, real


class _BiasStack:
    """Where a stack of T5 attention layers (encoder, decoder or cross-attention) is in one forward
    pass, as AdapterHub's position bias goes: ``widened`` after a prefixed layer that used the
    real bias (the next prefixed layer reuses it), ``zeroed`` once a layer found the bias it was
    passed the wrong width and put zeros in its place (every later layer then has zeros)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.widened = self.zeroed = False
        self.rows: dict[tuple[int, int], _BiasStack] = {}  # a mixed batch: each group of rows' own

    def of_rows(self, start: int, stop: int) -> _BiasStack:
        """Where the stack is for the group of rows ``[start, stop)`` of a mixed batch."""
        if (start, stop) not in self.rows:
            self.rows[(start, stop)] = _BiasStack()
        return self.rows[(start, stop)]


def _disentangled_attention(module, hidden_states, attention_mask, output_attentions=False, query_states=None,
                            relative_pos=None, rel_embeddings=None):
    """DeBERTa's disentangled self-attention (v1 and v2) with the prefix joined, as AdapterHub
    joins it: the prefix keys get content scores only (their relative-position terms are zero)
    and every token sees them. The projections and the position terms are the module's own.
    Shapes: hidden_states [B, N, hidden], attention_mask [B, 1, N, N]; returns ([B, N, hidden], probs)."""
    heads, v1 = module.num_attention_heads, hasattr(module, "in_proj")

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, N, heads * d] -> [B, heads, N, d]
        return x.view(*x.shape[:-1], heads, -1).transpose(1, 2)

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, heads, N, d] -> [B * heads, N, d], v2's layout
        return x.reshape(-1, x.shape[-2], x.shape[-1])

    if v1:
        if query_states is not None:
            raise ConfigError("prefix tuning on DeBERTa does not support query_states (its enhanced mask decoder)")
        query, key, value = split(module.in_proj(hidden_states)).chunk(3, dim=-1)
        query = query + split(module.q_bias[None, None, :])
        value = value + split(module.v_bias[None, None, :])
        scale_factor = 1 + len(module.pos_att_type)
    else:
        query = split(module.query_proj(hidden_states if query_states is None else query_states))
        key, value = split(module.key_proj(hidden_states)), split(module.value_proj(hidden_states))
        scale_factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    batch, _, n_query, head_dim = query.shape
    joined_key, joined_value, mask = module._adaptercli_prefix.join(query, key, value, attention_mask.bool(), False)
    n_prefix = joined_key.shape[2] - key.shape[2]
    scale = math.sqrt(head_dim * scale_factor)
    relative = None
    if v1:  # v1 scales the query, also for its position terms
        query = query / scale
        scores = torch.matmul(query, joined_key.transpose(-1, -2))
        if module.relative_attention and rel_embeddings is not None and relative_pos is not None:
            relative = module.disentangled_att_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                    scale_factor)
    else:
        scores = torch.bmm(flat(query), flat(joined_key).transpose(-1, -2) / scale).view(batch, heads, n_query, -1)
        if module.relative_attention:
            relative = module.disentangled_attention_bias(flat(query), flat(key), relative_pos,
                                                          module.pos_dropout(rel_embeddings), scale_factor)
    if isinstance(relative, torch.Tensor):  # 0 when pos_att_type names no position terms
        scores = scores + nn.functional.pad(relative.view(batch, heads, n_query, -1), (n_prefix, 0))
    talking = v1 and module.head_logits_proj is not None
    if talking:
        scores = module.head_logits_proj(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = module.dropout(nn.functional.softmax(scores, dim=-1))
    if talking:
        probs = module.head_weights_proj(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    context = torch.matmul(probs, joined_value).transpose(1, 2).reshape(batch, n_query, -1)
    return context, (probs if output_attentions else None)


# Replacement forwards for attention modules that compute their own scores (Architecture.attention_forward).
OWN_ATTENTION = {"disentangled": _disentangled_attention}
PREFIXED = {"eager": "adaptercli_eager", "sdpa": "adaptercli_sdpa"}
ALL_ATTENTION_FUNCTIONS.register(PREFIXED["eager"], _with_prefix("eager"))
ALL_ATTENTION_FUNCTIONS.register(PREFIXED["sdpa"], _with_prefix("sdpa"))
ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIXED["eager"], eager_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIXED["sdpa"], sdpa_mask)


def _model_configs(state: AdapterState) -> list[PretrainedConfig]:
    """Every config the model's modules read (T5's encoder and decoder keep their own copies)."""
    return state.derived("model_configs", lambda modules: list({
        id(c): c for c in [state.model.config, *(vars(m).get("config") for m in modules)]
        if isinstance(c, PretrainedConfig)}.values()))


class PrefixTuningFamily(MethodFamily):
    name = "prefix_tuning"
    blocks = ("Stack", "Parallel", "BatchSplit")
    config_class = PrefixTuningConfig
    rows_apart = True
    containers = ("prefix_tunings", "prefix_gates")

    def per_position(self, config: PrefixTuningConfig) -> bool:
        return not config.use_gating  # a gate averages over the sequence (the prefixes sit in front of any cache)

    def add(self, state: AdapterState, name: str, config: PrefixTuningConfig) -> None:
        arch = state.require_architecture("prefix tuning")
        if arch.attention is None:
            raise ConfigError(f"prefix tuning is not available on {state.model_type}: its layout names no attention "
                              "module (`attention`), where prefixes join")
        if not hasattr(state.root, "prefix_tunings"):
            state.root.add_module("prefix_tunings", nn.ModuleDict())
        if arch.decoder is not None:  # one pool per place, as AdapterHub's files keep them
            if config.use_gating:
                raise ConfigError("use_gating: gated prefixes are not available on encoder-decoders")
            wanted = {"encoder_prefix": config.encoder_prefix, "self_prefix": True, "cross_prefix": config.cross_prefix}
            reached = {place: layers for place, layers in _place_layers(state, config.leave_out).items()
                       if wanted[place]}
            if not any(reached.values()):
                raise ConfigError(f"leave_out {config.leave_out} leaves prefix tuning no layer to reach")
            state.root.prefix_tunings[name] = nn.ModuleDict({
                place: PrefixPool(layers, state.num_kv_heads, state.head_dim, state.hidden_size, config)
                for place, layers in reached.items() if layers})
            return
        state.root.prefix_tunings[name] = PrefixPool(
            [i for i in range(state.num_layers) if i not in config.leave_out],
            state.num_kv_heads, state.head_dim, state.hidden_size, config
        )
        if config.use_gating:  # one gate per layer, where AdapterHub's files keep it
            for i, layer in enumerate(transformer_layers(state.backbone, arch)):
                if i in config.leave_out:
                    continue
                attention = get_module(layer, arch.attention)
                if not hasattr(attention, "prefix_tuning"):
                    attention.add_module("prefix_tuning", nn.Module())
                    attention.prefix_tuning.add_module("prefix_gates", nn.ModuleDict())
                gate = nn.Linear(state.hidden_size, 1 if config.shared_gating else 2)
                nn.init.normal_(gate.weight, std=0.02)
                attention.prefix_tuning.prefix_gates[name] = gate

    def migrate(self, state: AdapterState, name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before 2026-12-07 a pool was as wide as all the layers of its place even with
        ``leave_out``; such weights keep the slices of the layers the pool now reaches."""
        config = family_config(state.adapters[name].config, self.name)
        pools = getattr(state.root, "prefix_tunings", {})
        if config is None or not config.leave_out or name not in pools:
            return weights
        places = pools[name].items() if isinstance(pools[name], nn.ModuleDict) else [("", pools[name])]
        counts = ({place: len(layers) for place, layers in _place_layers(state, []).items()}
                  if state.arch.decoder is not None else {"": state.num_layers})
        weights = dict(weights)
        for place, pool in places:
            stem = f"prefix_tunings.{name}." + (f"{place}." if place else "")
            reached, total = list(pool.slots), counts[place]
            own = dict(pool.named_parameters())
            for suffix, rows_first in (("control_trans.2.weight", True), ("control_trans.2.bias", True),
                                       ("control_trans", False)):
                value, built = weights.get(stem + suffix), own.get(suffix)
                if value is None or built is None or value.shape == built.shape:
                    continue  # absent, or already the width this version builds
                if rows_first:
                    per_layer = built.shape[0] // len(reached)
                    old_width = value.shape[0] == per_layer * total
                else:  # the prefix length first, then the layers
                    per_layer = built.numel() // pool.shape[0] // len(reached)
                    old_width = value.numel() == pool.shape[0] * per_layer * total
                if not old_width:
                    continue  # not the old width either: left for the shape check to refuse
                if rows_first:  # [layers * per_layer, ...] -> the reached layers' rows
                    kept = value.reshape(total, per_layer, *value.shape[1:])[reached]
                    weights[stem + suffix] = kept.reshape(len(reached) * per_layer, *value.shape[1:])
                else:  # flat: [P * layers * per_layer]
                    kept = value.reshape(pool.shape[0], total, per_layer)[:, reached]
                    weights[stem + suffix] = kept.reshape(-1)
        return weights

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        pools_by_name = getattr(state.root, "prefix_tunings", {})
        active = [n for n in self.active_names(state, setup) if n in pools_by_name]
        configs = _model_configs(state)
        own = state.arch.attention_forward  # DeBERTa: its own attention, whose implementation stays
        base = getattr(state, "_base_attn", None) or state.model.config._attn_implementation
        joins_functions = bool(active) and not own
        if joins_functions and base not in PREFIXED:
            raise ConfigError(
                f"prefix tuning runs with eager or sdpa attention; this model uses '{base}'. "
                "Load it with attn_implementation='sdpa' (or 'eager')."
            )
        for config in configs:
            wanted = PREFIXED[base] if joins_functions else base
            if config._attn_implementation != wanted:
                config._attn_implementation = wanted
        if not active:
            return []
        state._base_attn = base
        active_pools = [pool for n in active for pool in _pools(pools_by_name[n])]
        bias_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, bool]] = {}
        stacks: dict[str, _BiasStack] = {}

        def fresh_prefixes(module, args):
            # Computed here, before the layers: under gradient checkpointing a layer's forward runs
            # again in the backward pass, and must find the prefixes, not compute them a second time.
            bias_cache.clear()
            for stack in stacks.values():
                stack.reset()
            for pool in active_pools:
                pool.clear()
                pool.ready()

        handles = [state.backbone.register_forward_pre_hook(fresh_prefixes)]
        if state.arch.decoder is not None:
            return handles + self._activate_encoder_decoder(state, setup, active, pools_by_name, bias_cache, stacks)
        for i, layer in enumerate(transformer_layers(state.backbone, state.arch)):
            attention = get_module(layer, state.arch.attention)
            gates_here = getattr(getattr(attention, "prefix_tuning", None), "prefix_gates", {})
            here = {n: (pools_by_name[n], gates_here[n] if n in gates_here else None) for n in active
                    if i not in family_config(state.adapters[n].config, self.name).leave_out}
            if here:
                if is_plain_stack(setup):
                    prefix = _LayerPrefix(i, list(here.values()))
                else:
                    prefix = _LayerPrefix(i, [], setup, here)
                attention._adaptercli_prefix = prefix
                if own:
                    attention.forward = types.MethodType(OWN_ATTENTION[own], attention)
                handles.append(_Unset(attention))
                if any(gate is not None for _, gate in here.values()):
                    handles.append(attention.register_forward_pre_hook(_keep_input(prefix), with_kwargs=True))
        return handles


    def _activate_encoder_decoder(self, state: AdapterState, setup: CompositionBlock | None, active: list[str],
                                  pools_by_name: nn.ModuleDict, bias_cache: dict, stacks: dict) -> list:
        """Encoder self-attention joins the ``encoder_prefix`` pool, the decoder's self- and
        cross-attention the ``self_prefix`` and ``cross_prefix`` pools; each pool numbers its own
        layers from 0 (AdapterHub's layout), ``leave_out`` counts encoder then decoder layers."""
        handles: list = []
        counters = {"encoder_prefix": 0, "self_prefix": 0, "cross_prefix": 0}
        for i, (layer, part) in enumerate(layers_with_parts(state.backbone, state.arch)):
            places = [(part.attention, "self_prefix" if part is state.arch.decoder else "encoder_prefix")]
            if part.cross_attention:
                places.append((part.cross_attention, "cross_prefix"))
            for path, place in places:
                index = counters[place]
                counters[place] += 1
                here = {n: (pools_by_name[n][place], None) for n in active if place in pools_by_name[n]
                        and i not in family_config(state.adapters[n].config, self.name).leave_out}
                attention = get_module(layer, path)
                # T5 (a relative position bias passed from layer to layer): a layer left out after a
                # prefixed one changes the bias the later layers see, so every layer of the stack runs
                # through here (a left-out one with no prefix of its own).
                t5 = hasattr(attention, "has_relative_attention_bias") and any(
                    place in pools_by_name[n] for n in active)
                if not here and not t5:
                    continue
                prefix = (_LayerPrefix(index, list(here.values())) if is_plain_stack(setup)
                          else _LayerPrefix(index, [], setup, here))
                prefix.bias_cache = bias_cache
                if t5:
                    prefix.bias_stack = stacks.setdefault(place, _BiasStack())
                attention._adaptercli_prefix = prefix
                handles.append(_Unset(attention))
        return handles


def _place_layers(state: AdapterState, leave_out: Sequence[int]) -> dict[str, list[int]]:
    """An encoder-decoder's attention places, each with the indices (counted within the place,
    as its pool numbers them) of its layers that ``leave_out`` (counting encoder, then decoder
    layers) does not name."""
    places: dict[str, list[int]] = {"encoder_prefix": [], "self_prefix": [], "cross_prefix": []}
    counters = dict.fromkeys(places, 0)
    for i, (_, part) in enumerate(layers_with_parts(state.backbone, state.arch)):
        here = ["self_prefix" if part is state.arch.decoder else "encoder_prefix"]
        if part.cross_attention:
            here.append("cross_prefix")
        for place in here:
            if i not in leave_out:
                places[place].append(counters[place])
            counters[place] += 1
    return places


def _pools(pool: nn.Module) -> list[PrefixPool]:
    """The pools of one adapter: one, or one per place in an encoder-decoder."""
    return list(pool.values()) if isinstance(pool, nn.ModuleDict) else [pool]


def _keep_input(prefix: _LayerPrefix):
    """Pre-hook: the attention's input, which the prefix gates read."""
    def hook(module, args, kwargs):
        prefix.hidden = args[0] if args else kwargs["hidden_states"]

    return hook


class _Unset:
    """A handle that removes the prefix from an attention module (same interface as a hook's)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("_adaptercli_prefix", None)
        self.module.__dict__.pop("forward", None)  # an own-attention forward (DeBERTa), if set
