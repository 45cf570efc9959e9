"""ReFT: representation fine-tuning (Wu et al., 2024): ``loreft``, ``noreft``, ``direft``.

An intervention edits the output of a transformer layer at a few positions only: the first
``prefix_positions`` real tokens and the last ``suffix_positions`` real tokens of each row. With
h [..., H] the hidden state there, R [r, H] a projection (orthonormal rows for LoReFT, kept so by
torch's orthogonal parametrisation) and W, b a learned source [r, H], [r]:

    LoReFT / NoReFT:  h' = h + (act(W h + b) - R h) R        DiReFT: h' = h + act(W h + b) R

then dropout on h' (AdapterHub applies it to the whole edited state). Prefix and suffix positions
have their own unit unless ``tied_weights``. Parameter names follow AdapterHub's files:
``<layer>.reft_layer.refts.<name>.units.<i>.learned_source.*`` and ``.projection.weight`` (or
``.projection.parametrizations.weight.original`` and ``...weight.0.base`` when orthogonal).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..architectures import transformer_layers
from ..composition import BatchSplit, CompositionBlock, is_plain_stack, row_groups
from ..schema import spec
from .base import ConfigError, MethodConfig
from .bottleneck import ACTIVATIONS, _activation
from .family import AdapterState, MethodFamily


@dataclasses.dataclass
class ReftConfig(MethodConfig):
    """ReFT config (AdapterHub's ``ReftConfig``; defaults are ``loreft``'s).

    Attributes:
        layers: "all" or the layer indices that get an intervention.
        prefix_positions: how many first real tokens are edited.
        suffix_positions: how many last real tokens are edited.
        r: rank of the edit.
        orthogonality: keep R's rows orthonormal (LoReFT).
        tied_weights: one unit for prefix and suffix positions.
        subtract_projection: edit towards ``act(W h + b)`` in R's subspace (False: DiReFT, add it).
        dropout: dropout on the edited states.
        non_linearity: the source's activation (None: identity).
        init_weights_seed: seed the random generator with this before initialising the weights
            (None or 0: the global random state).
    """

    family: ClassVar[str] = "reft"
    foreign_defaults: ClassVar[dict[str, Any]] = {"dtype": None, "output_reft": True}

    layers: str | list[int] = spec("all", choices=("all",), ge=0)
    prefix_positions: int = spec(3, ge=0)
    suffix_positions: int = spec(0, ge=0)
    r: int = spec(1, ge=1)
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = spec(0.05, ge=0, lt=1)
    non_linearity: str | None = spec(None, choices=ACTIVATIONS)
    init_weights_seed: int | None = None

    def validate(self) -> None:
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise ConfigError("prefix_positions: a ReFT intervention needs prefix_positions or suffix_positions > 0")


PRESETS: dict[str, dict[str, Any]] = {
    "loreft": {},
    "noreft": {"orthogonality": False},
    "direft": {"orthogonality": False, "subtract_projection": False},
}


def identify(config: ReftConfig) -> str:
    if not config.subtract_projection:
        return "direft"
    return "loreft" if config.orthogonality else "noreft"


class ReftUnit(nn.Module):
    """One intervention h -> h + (act(W h + b) [- R h]) R on [..., H] states."""

    def __init__(self, hidden_size: int, config: ReftConfig):
        super().__init__()
        self.learned_source = nn.Linear(hidden_size, config.r)
        projection = nn.Linear(hidden_size, config.r, bias=False)
        if config.orthogonality:
            projection = nn.utils.parametrizations.orthogonal(projection)
            # The parametrisation's `base` is a buffer; make it a frozen parameter so that it is
            # saved, loaded and moved with the adapter's other tensors (it is in AdapterHub's files).
            orthogonal = projection.parametrizations.weight[0]
            base = orthogonal._buffers.pop("base")
            if base is None:  # its init needs aten::geqrf, which has no meta kernel (torch skips it silently)
                side = max(hidden_size, config.r)
                base = torch.empty(side, side, device=projection.parametrizations.weight.original.device)
            orthogonal.base = nn.Parameter(base, requires_grad=False)
            projection.keep_float32 = True  # householder_product has no bf16/fp16 kernel: stays fp32 on any layer
        self.projection = projection
        self.subtract_projection = config.subtract_projection
        self.non_linearity = _activation(config.non_linearity) if config.non_linearity else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        source = self.non_linearity(self.learned_source(h))
        weight = self.projection.weight.to(source.dtype)  # [r, H]; LoReFT's is kept in fp32
        if self.subtract_projection:
            source = source - h.to(source.dtype) @ weight.t()
        return self.dropout(h + (source @ weight).to(h.dtype))


class ReftModule(nn.Module):
    """The intervention of one adapter at one layer: units for the prefix and suffix positions."""

    def __init__(self, hidden_size: int, config: ReftConfig):
        super().__init__()
        if config.init_weights_seed:
            torch.manual_seed(config.init_weights_seed)
        self.prefix_positions, self.suffix_positions = config.prefix_positions, config.suffix_positions
        self.tied = config.tied_weights
        self.units = nn.ModuleList(ReftUnit(hidden_size, config) for _ in range(1 if config.tied_weights else 2))

    def forward(self, hidden: torch.Tensor, positions: _Positions) -> torch.Tensor:
        """``hidden`` [B, T, H] with the edit applied at this adapter's positions."""
        B, T, H = hidden.shape
        prefix_idx = positions.prefix(min(self.prefix_positions, T), H) if self.prefix_positions else None
        suffix_idx = positions.suffix(min(self.suffix_positions, T), H) if self.suffix_positions else None
        parts = [hidden.gather(1, idx) if idx is not None else hidden.new_zeros(B, 0, H)
                 for idx in (prefix_idx, suffix_idx)]
        if self.tied:
            edited = self.units[0](torch.cat(parts, dim=1))
        else:
            edited = torch.cat([self.units[0](parts[0]), self.units[1](parts[1])], dim=1)
        edited = edited.to(hidden.dtype)
        if prefix_idx is not None:
            hidden = hidden.scatter(1, prefix_idx, edited[:, : self.prefix_positions])
        if suffix_idx is not None:
            hidden = hidden.scatter(1, suffix_idx, edited[:, edited.shape[1] - self.suffix_positions:])
        return hidden


class _Positions:
    """Where each row's real tokens start and end in the current forward pass (from the
    attention mask the backbone was called with; all positions without one)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def _bounds(self, T: int, B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != B:
            return torch.zeros(B, dtype=torch.long, device=device), torch.full((B,), T, device=device)
        first = mask.argmax(1) + max(T - mask.shape[1], 0)  # positions prompt tuning put in front
        return first, first + (mask == 1).sum(dim=-1)

    def prefix(self, n: int, H: int) -> torch.Tensor:
        first, _ = self._bounds(self.T, self.B, self.device)
        return (first.view(-1, 1, 1) + torch.arange(n, device=self.device).view(1, -1, 1)).expand(-1, -1, H)

    def suffix(self, n: int, H: int) -> torch.Tensor:
        _, end = self._bounds(self.T, self.B, self.device)
        return (end.view(-1, 1, 1) + torch.arange(-n, 0, device=self.device).view(1, -1, 1)).expand(-1, -1, H)

    def at(self, hidden: torch.Tensor) -> _Positions:
        self.B, self.T, self.device = hidden.shape[0], hidden.shape[1], hidden.device
        return self

    def rows(self, rows: slice) -> _Positions:
        """The positions of some rows only (a BatchSplit group)."""
        part = _Positions()
        part.mask = self.mask[rows] if self.mask is not None and self.mask.dim() == 2 else self.mask
        return part


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ReftFamily(MethodFamily):
    name = "reft"
    config_class = ReftConfig
    containers = ("refts",)
    # A BatchSplit of names or plain stacks (per-row adapters, `forward_rows`): each group of rows
    # is edited by its own interventions.
    blocks = ("Stack", "BatchSplit")

    def _layers(self, state: AdapterState, config: ReftConfig) -> list[tuple[int, nn.Module]]:
        arch = state.require_architecture("ReFT")
        layers = list(enumerate(transformer_layers(state.backbone, arch)))
        return layers if config.layers == "all" else [(i, layer) for i, layer in layers if i in config.layers]

    def add(self, state: AdapterState, name: str, config: ReftConfig) -> None:
        for _, layer in self._layers(state, config):
            if not hasattr(layer, "reft_layer"):
                layer.add_module("reft_layer", nn.Module())
            if not hasattr(layer.reft_layer, "refts"):
                layer.reft_layer.add_module("refts", nn.ModuleDict())
            layer.reft_layer.refts[name] = ReftModule(state.hidden_size, config)

    def frozen_parameters(self, state: AdapterState, name: str) -> set[str]:
        return {k for k in state.adapter_parameters(name) if k.endswith(".parametrizations.weight.0.base")}

    def activate(self, state: AdapterState, setup: CompositionBlock | None) -> list[RemovableHandle]:
        names = self.active_names(state, setup)
        if not names:
            return []
        if not is_plain_stack(setup) and not (isinstance(setup, BatchSplit) and all(
                isinstance(c, str) or is_plain_stack(c) for c in setup.children
                if set(names) & set([c] if isinstance(c, str) else c.flatten()))):  # other rows: a fusion, ...
            raise ConfigError(f"ReFT adapters run in a Stack or a BatchSplit of adapters, not {setup!r}")
        positions = _Positions()

        def grab_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            positions.mask = mask if isinstance(mask, torch.Tensor) else None

        handles = [state.backbone.register_forward_pre_hook(grab_mask, with_kwargs=True)]
        for layer in transformer_layers(state.backbone, state.require_architecture("ReFT")):
            refts = getattr(getattr(layer, "reft_layer", None), "refts", {})
            here = [refts[n] for n in names if n in refts]
            if here and is_plain_stack(setup):
                handles.append(layer.register_forward_hook(_edit(here, positions)))
            elif here:
                handles.append(layer.register_forward_hook(_edit_rows(setup, refts, positions)))
        return handles


def _edit_rows(setup: BatchSplit, refts: nn.ModuleDict, positions: _Positions):
    """Each BatchSplit group of rows through its own interventions (in stack order)."""
    def hook(module, args, output):
        hidden = _first(output)
        parts = []
        for rows, child in row_groups(setup, hidden.shape[0]):
            part, where = hidden[rows], positions.rows(rows)
            for name in [child] if isinstance(child, str) else child.flatten():
                if name in refts:
                    part = refts[name](part, where.at(part))
            parts.append(part)
        hidden = torch.cat(parts)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _edit(modules: list[ReftModule], positions: _Positions):
    def hook(module, args, output):
        hidden = _first(output)
        for reft in modules:
            hidden = reft(hidden, positions.at(hidden))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook
