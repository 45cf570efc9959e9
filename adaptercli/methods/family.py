"""The interface a method family implements, and the per-model adapter state it works on.

:class:`MethodFamily` is how one family of methods attaches to a model; :class:`AdapterState`
is everything adaptercli keeps about one model (its adapters and fusions, what is active, the
hooks). Families receive the state, never the model class: no method module imports ``model``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .. import composition
from ..architectures import (
    Architecture,
    UnsupportedArchitectureError,
    architecture_for,
    check_layout,
    fit_architecture,
    get_module,
    layout_from_dict,
    transformer_layers,
)
from ..errors import AdapterError
from .base import ConfigError, MethodConfig, family_config
from .fusion import FusionConfig, FusionRecorder


class MethodFamily:
    """How one family of methods attaches to a model. Subclasses implement these hooks; each
    receives the model's :class:`AdapterState` (backbone, architecture table
    entry, hidden size) and works on the unmodified Hugging Face modules."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def add(self, state: AdapterState, name: str, config: MethodConfig) -> None:
        """Create the adapter's modules (registered inside the model, so they move with .to())."""
        raise NotImplementedError

    def delete(self, state: AdapterState, name: str) -> None:
        """Remove the adapter's modules."""
        for module in list(state.backbone.modules()):
            for container in self.containers:
                holder = getattr(module, container, None)
                if isinstance(holder, nn.ModuleDict) and name in holder:
                    del holder[name]

    containers: ClassVar[tuple[str, ...]] = ()

    # The composition blocks this family can run (see composition.check_support).
    blocks: ClassVar[tuple[str, ...]] = ("Stack",)
    # In a mixed batch its sites run each group of rows that uses it on its own, and neighbouring
    # groups that do not, together (prefix tuning's attention); such groups go last in the batch.
    rows_apart: ClassVar[bool] = False

    def per_position(self, config: MethodConfig) -> bool:
        """Whether an adapter of this family changes each position from that position alone (and,
        in attention, from the keys and values of the positions before it), so that a decoder may
        keep those keys and values between steps (a KV cache) and write what it writes without
        one. False, the safe answer, for a family that does not say: a gate averaged over the
        sequence, or an intervention at positions counted from the end, reads the whole sequence."""
        return False

    def activate(self, state: AdapterState, setup: composition.CompositionBlock | None) -> list[RemovableHandle]:
        """Install the forward hooks that run this family's adapters in ``setup`` (None: none) and
        return their handles. Only places with an active adapter get a hook, so inactive adapters
        cost nothing per forward."""
        raise NotImplementedError

    def active_names(self, state: AdapterState, setup: composition.CompositionBlock | None) -> list[str]:
        """The adapters of this family (or with a part of it) in ``setup``, in order of first appearance."""
        if setup is None:
            return []
        return [n for n in setup.flatten()
                if n in state.adapters and family_config(state.adapters[n].config, self.name) is not None]

    def positions_before(self, state: AdapterState, setup: str | composition.CompositionBlock) -> int:
        """How many positions this family's adapters in ``setup`` put before each row's input (the
        backbone's output is that much longer for the rows running it): 0 but for prompt tuning."""
        return 0

    def frozen_parameters(self, state: AdapterState, name: str) -> set[str]:
        """Keys (as in ``adapter_parameters``) of the adapter's tensors that are saved but never
        trained (VeRA's shared random matrices, ReFT's orthogonal base)."""
        return set()

    def migrate(self, state: AdapterState, name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Saved weights of adapter ``name`` (already added) in the layout this version builds, where
        an earlier version of adaptercli saved them otherwise; by default as they are."""
        return weights

    def merge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")

    def unmerge(self, state: AdapterState, name: str) -> None:
        raise ConfigError(f"adapters of the '{self.name}' family cannot be merged into the weights")


@dataclasses.dataclass
class AdapterRecord:
    name: str
    config: MethodConfig
    method: str  # the registry's name for the config (``ia3`` for a LoRA config in scale mode)
    base_model: str | None = None  # the model a loaded adapter was trained on, as its file says


@dataclasses.dataclass
class FusionRecord:
    name: str
    members: list[str]
    config: FusionConfig


# Fusion layers live in this container of the places they fuse (AdapterHub's name, so keys match its files).
FUSION_CONTAINER = "adapter_fusion_layer"


def key_pattern(containers: Iterable[str], name: str | None = None) -> re.Pattern[str]:
    """Matches the weight keys of adapter (or fusion) ``name`` (None: any) held in one of
    ``containers``: ``...<container>.<name>.``."""
    named = r"[^.]+" if name is None else re.escape(name)
    return re.compile(rf"(^|\.)({'|'.join(map(re.escape, containers))})\.{named}\.")


# Inputs of a backbone forward that carry the batch on dim 0 (replicated for Parallel).
_BATCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "decoder_input_ids",
                 "decoder_attention_mask")


class AdapterState:
    """Everything adaptercli keeps about one model: its adapters, what is active, the hooks.
    ``families``: the method families it runs (the registry's, in activation order); ``layout``:
    the model's entry when the table has none (see ``architectures.layout_from_dict``)."""

    def __init__(self, model: nn.Module, families: Mapping[str, MethodFamily], layout: Architecture | dict | None = None):
        self.model = model
        self.families = dict(families)
        # Every container that holds adapter weights; fusion layers count as adapter weights (not
        # backbone) in summaries, and a fusion name never equals an adapter name.
        self.containers: tuple[str, ...] = tuple(dict.fromkeys(
            c for family in self.families.values() for c in family.containers)) + (FUSION_CONTAINER,)
        self.backbone: nn.Module = model.base_model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model_type: str = config.model_type
        self.arch: Architecture | None = architecture_for(self.model_type, required=False)
        self.unfit = ""  # why the table's entry for this model type does not fit this model
        if layout is not None:
            self.arch = layout if isinstance(layout, Architecture) else layout_from_dict(layout, self.model_type)
            check_layout(self.backbone, self.arch)
        elif self.arch is not None:
            self.arch, self.unfit = fit_architecture(self.backbone, self.arch)
        self.hidden_size: int = getattr(config, "hidden_size", None) or config.dim
        self.num_layers: int = getattr(config, "num_hidden_layers", None) or config.n_layers
        if self.arch is not None:  # the layers that hold adapters (ALBERT: its shared layers, once each)
            self.num_layers = len(transformer_layers(self.backbone, self.arch))
        heads = getattr(config, "num_attention_heads", None) or config.n_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim: int = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or self.hidden_size // heads
        self.adapters: dict[str, AdapterRecord] = {}
        self.fusions: dict[str, FusionRecord] = {}
        self.active: composition.CompositionBlock | None = None
        self.handles: list = []
        self.merged: set[str] = set()
        self.recorders: list[FusionRecorder] = []
        self.forward_mask: torch.Tensor | None = None  # the current forward's attention mask (when needed)
        self.on_activate: list[Callable[[], None]] = []  # called after every activation (the model's own plans)
        self._modules: list[nn.Module] | None = None
        self._derived: dict[str, Any] = {}

    def modules(self) -> list[nn.Module]:
        """The backbone's modules, walked once and kept for the next activations (which run per
        batch with per-row adapters); adding or deleting an adapter or a fusion clears the list."""
        if self._modules is None:
            self._modules = list(self.backbone.modules())
        return self._modules

    def forget_modules(self) -> None:
        self._modules = None
        self._derived: dict[str, Any] = {}

    def derived(self, key: str, compute: Callable[[list[nn.Module]], Any]) -> Any:
        """``compute(self.modules())``, kept with the module list (found again once an adapter or
        a fusion is added or deleted): what activation looks up in the modules per batch."""
        modules = self.modules()
        if key not in self._derived:
            self._derived[key] = compute(modules)
        return self._derived[key]

    @property
    def root(self) -> nn.Module:
        """Where adapter modules that belong to no layer live (invertible adapters, prefix pools,
        shared tensors): the backbone, or the part of it a layout names (AdapterHub's base_model)."""
        return get_module(self.backbone, self.arch.root) if self.arch is not None else self.backbone

    @property
    def invertible_root(self) -> nn.Module:
        """Where invertible adapters live (an encoder-decoder's encoder, as in AdapterHub's files)."""
        if self.arch is not None and self.arch.invertible_root:
            return get_module(self.backbone, self.arch.invertible_root)
        return self.root

    def require_architecture(self, what: str) -> Architecture:
        """The table entry, or an error saying that ``what`` needs one (and which types have one)."""
        if self.arch is None and self.unfit:
            raise UnsupportedArchitectureError(
                f"{what}: the architecture table's '{self.model_type}' entry does not fit this "
                f"{type(self.backbone).__name__} ({self.unfit}); LoRA and IA3 still work when you name the modules "
                "with `target_modules`, every method with `layout=`")
        return self.arch or architecture_for(self.model_type, what=what)

    def record(self, name: str) -> AdapterRecord:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise AdapterError(f"no adapter named '{name}' (adapters on this model: {known})")
        return self.adapters[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters, keyed by their path inside the backbone."""
        pattern = key_pattern(self.containers, name)
        return {k: p for k, p in self.backbone.named_parameters(remove_duplicate=False) if pattern.search(k)}

    def place_like_layers(self, name: str) -> None:
        """Move the modules of adapter (or fusion) ``name``, made with torch's default dtype, to
        the device and dtype of the layer each one is attached to (the nearest module holding it
        that has weights of its own): a bf16 layer gets a bf16 adapter, a layer on another GPU
        its adapter there. A layer without floating-point weights of its own (a 4-bit or 8-bit
        quantized linear layer) leaves its adapter in full precision."""
        pattern = key_pattern(self.containers)
        for path, module in self.backbone.named_modules():
            for container in self.containers:
                holder = getattr(module, container, None)
                if not isinstance(holder, nn.ModuleDict) or name not in holder:
                    continue
                own: list[nn.Parameter] = []
                parts = path.split(".") if path else []
                while not own:
                    layer = self.backbone.get_submodule(".".join(parts))
                    own = [p for k, p in layer.named_parameters() if not pattern.search(k)]
                    if not parts:
                        break
                    parts.pop()
                floating = [p for p in own if p.is_floating_point()]
                if own:
                    holder[name].to(own[0].device)
                if floating:
                    _cast_floating(holder[name], floating[0].dtype)

    def fusion(self, name: str) -> FusionRecord:
        if name not in self.fusions:
            known = ", ".join(self.fusions) or "none"
            raise composition.CompositionError(
                f"no AdapterFusion named '{name}' (fusions on this model: {known}); add it with "
                f"add_adapter_fusion or load_adapter_fusion")
        return self.fusions[name]

    def fusion_parameters(self, name: str) -> dict[str, nn.Parameter]:
        pattern = key_pattern((FUSION_CONTAINER,), name)
        return {k: p for k, p in self.backbone.named_parameters(remove_duplicate=False) if pattern.search(k)}

    def check_setup(self, setup: composition.CompositionBlock) -> None:
        """Every adapter and fusion exists (``composition.BASE``: no adapter), every block runs
        with its adapters' methods."""
        for name in setup.flatten():
            if name != composition.BASE:
                self.record(name)
        composition.check_support(
            setup, method_of=lambda n: self.adapters[n].method, family_of=lambda n: self.adapters[n].config.family,
            supported={f.name: f.blocks for f in self.families.values()})
        merged = [n for n in setup.flatten() if n in self.merged]
        if merged and not composition.is_plain_stack(setup):
            raise AdapterError(f"adapter(s) {', '.join(merged)} are merged into the weights and run for every row; "
                               f"unmerge_adapter them to use them in {type(setup).__name__}")
        for block in composition.blocks_in(setup):
            if isinstance(block, composition.Fuse):
                record = self.fusion(block.name)
                members = [c if isinstance(c, str) else c.last() for c in block.children]
                if members != record.members:
                    raise composition.CompositionError(
                        f"fusion '{block.name}' fuses {record.members}, not {members}")

    def activate(self, setup: composition.CompositionBlock | None) -> None:
        if setup is not None:
            self.check_setup(setup)  # before anything changes: a refused setup leaves the old one running
        for handle in self.handles:
            handle.remove()
        self.handles = []
        handles: list = []
        if setup is not None and (setup.parallel_channels > 1 or any(
                isinstance(b, composition.Fuse) for b in composition.blocks_in(setup))):
            prepare = _InputPreparer(self, setup.parallel_channels)
            handles.append(self.backbone.register_forward_pre_hook(prepare, with_kwargs=True))
        try:
            for family in self.families.values():
                handles += family.activate(self, setup)
        except Exception:
            for handle in handles:
                handle.remove()
            self.active = None
            for call in self.on_activate:
                call()
            raise
        self.handles = handles
        self.active = setup
        for call in self.on_activate:
            call()

    def on_fusion_attention(self, fusion: str, present: list[str], probs: torch.Tensor, *, layer: int,
                            site: str) -> None:
        """Called by every fusion layer with its softmax [B, T, members present]."""
        if not self.recorders:
            return
        mask = self.forward_mask
        if mask is not None:
            mask = mask[:, -probs.shape[1]:] if mask.dim() == 2 and mask.shape[0] == probs.shape[0] else None
        for recorder in self.recorders:
            recorder.add(fusion, self.fusions[fusion].members, present, layer, site, probs, mask)


def _cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``, except submodules marked ``keep_float32`` (torch computes them in
    float32 only: LoReFT's orthogonal parametrisation needs ``householder_product``)."""
    if getattr(module, "keep_float32", False):
        return
    for p in module.parameters(recurse=False):
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for key, buffer in module.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(module, key, buffer.to(dtype))
    for child in module.children():
        _cast_floating(child, dtype)


class _InputPreparer:
    """Backbone pre-hook: replicates the batch for Parallel (row ``i*B + b`` is a copy of row
    ``b``) and keeps the attention mask for fusion-attention recording."""

    def __init__(self, state: AdapterState, channels: int):
        self.state, self.channels = state, channels
        parameters = inspect.signature(state.backbone.forward).parameters.values()
        self.positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(self.positional, args, strict=False)), **kwargs}
        if self.channels > 1:
            reference = kwargs.get("input_ids")
            reference = kwargs.get("inputs_embeds") if reference is None else reference
            batch = reference.shape[0]
            for key in _BATCH_INPUTS:
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                    kwargs[key] = value.repeat(self.channels, *[1] * (value.dim() - 1))
        self.state.forward_mask = kwargs.get("attention_mask")
        return (), kwargs
