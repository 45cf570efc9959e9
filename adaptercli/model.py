"""The adapter API added to a Hugging Face model: add, activate, train, save, load, merge.

``init(model)`` gives any ``transformers`` model these methods in place (its class becomes a
subclass with ``ModelAdaptersMixin`` first), without touching its modules or weights.
``AdapterModel`` (via ``AutoAdapterModel.from_pretrained``) is a backbone with flexible heads.
All per-model state lives in one ``AdapterState`` object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from . import composition, merging
from .architectures import (
    Architecture,
    architecture_for,
)
from .errors import AdapterError
from .formats.setup import HeadSetup
from .heads import HeadConfig, PredictionHead
from .locate import locate
from .methods import FAMILIES, MethodConfig, family_of, method_name, resolve_config
from .methods.base import family_config
from .methods.family import AdapterRecord, AdapterState, FusionRecord, key_pattern
from .methods.fusion import FusionConfig, FusionRecorder, resolve_fusion_config
from .model_io import (
    load_adapter,
    load_adapter_fusion,
    load_adapter_setup,
    save_adapter,
    save_adapter_fusion,
    save_adapter_setup,
)


def _swap_name(key: str, old: str, new: str, containers: tuple[str, ...]) -> str:
    """The same weight of adapter ``new``: ``...loras.<old>.lora_A`` -> ``...loras.<new>.lora_A``."""
    return key_pattern(containers, old).sub(lambda m: m.group(0).replace(f".{old}.", f".{new}."), key, count=1)




class ModelAdaptersMixin:
    """Adapter methods for a transformers model. Use ``init`` rather than inheriting."""

    adapter_state: AdapterState

    # -- adding and removing ---------------------------------------------------------------
    def add_adapter(self, name: str, config: str | dict | MethodConfig | None = None, *,
                    overwrite_ok: bool = False, set_active: bool = False) -> None:
        """Add a new adapter ``name`` with a method config (``"lora"``, ``"seq_bn[reduction_factor=8]"``,
        a dict or a config object). Its parameters are created inside the model."""
        state = self.adapter_state
        if name in state.adapters:
            if not overwrite_ok:
                raise AdapterError(f"an adapter named '{name}' already exists (use overwrite_ok=True to replace it)")
            self.delete_adapter(name)
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise AdapterError(f"adapter name '{name}' may only use letters, digits, '_' and '-'")
        if name == composition.BASE:
            raise AdapterError(f"adapter name '{name}' is reserved: a row named so runs no adapter")
        method_config = resolve_config(config)
        state.forget_modules()
        with torch.device(next(self.parameters()).device):  # adapters live beside the weights they change
            family_of(method_config).add(state, name, method_config)
        state.place_like_layers(name)
        state.forget_modules()
        self.train(self.training)  # new modules start in training mode; follow the model's (dropout)
        state.adapters[name] = AdapterRecord(name, method_config, method_name(method_config))
        if set_active:
            self.set_active_adapters(name)

    def delete_adapter(self, name: str) -> None:
        state = self.adapter_state
        record = state.record(name)
        if name in state.merged:
            self.unmerge_adapter(name)
        active = state.active.flatten() if state.active else []
        if name in active:
            state.activate(None)
        for fusion in [f.name for f in state.fusions.values() if name in f.members]:
            self.delete_adapter_fusion(fusion)  # a fusion without one of its members cannot run
        family_of(record.config).delete(state, name)
        state.forget_modules()
        del state.adapters[name]
        heads = getattr(self, "heads", None)
        if heads is not None and name in heads:
            del heads[name]

    # -- activation --------------------------------------------------------------------------
    def set_active_adapters(self, setup: str | list | composition.CompositionBlock | None) -> None:
        """Run these adapters in every forward pass (None: none): a name, a composition block, or
        a list (a Stack; a list inside it is a Fuse: ``[["a", "b"], "c"]``)."""
        self.adapter_state.activate(composition.parse(setup))

    def setup_named(self, name: str | composition.CompositionBlock) -> composition.CompositionBlock:
        """What a row named ``name`` runs: an adapter (a one-adapter Stack), a fusion by its name
        (its Fuse), a composition block as given (checked against this model's adapters), or
        ``"__base__"`` (``composition.BASE``): no adapter, the backbone as it is (as in PEFT)."""
        state = self.adapter_state
        if name == composition.BASE:
            return composition.Stack(composition.BASE)
        if isinstance(name, composition.CompositionBlock):
            block = name
        elif name in state.fusions:
            members = state.fusions[name].members
            block = composition.Fuse(*members, name=name if name != ",".join(members) else None)
        elif name in state.adapters:
            block = composition.Stack(name)
        else:
            known = ", ".join([*state.adapters, *state.fusions]) or "none"
            raise AdapterError(f"adapter_names: no adapter or fusion named '{name}' (on this model: {known})")
        state.check_setup(block)
        return block

    def rows_setup(self, adapter_names: list, rows: int) -> tuple[list[int], composition.CompositionBlock]:
        """The row order and the setup that run row ``i`` through ``adapter_names[i]`` in one
        forward pass (see ``composition.rows_by_setup``); refuses a family that cannot share a batch."""
        if isinstance(adapter_names, str) or len(adapter_names) != rows:
            raise AdapterError(f"adapter_names needs one name per row: {rows} rows, got "
                               f"{'a string' if isinstance(adapter_names, str) else len(adapter_names)}")
        named: dict[str, composition.CompositionBlock] = {}  # each name looked up and checked once

        def setup_of(name: Any) -> composition.CompositionBlock:
            if not isinstance(name, str):
                splits = [b for b in composition.blocks_in(name) if isinstance(b, composition.Parallel | composition.BatchSplit)] \
                    if isinstance(name, composition.CompositionBlock) else []
                if splits:
                    raise AdapterError(f"adapter_names: a row cannot run {type(splits[0]).__name__} (it splits or copies "
                                       "rows); a row runs an adapter, a fusion, or a Stack, Fuse, Average or Split")
                return self.setup_named(name)
            if name not in named:
                named[name] = self.setup_named(name)
            return named[name]

        order, setup = composition.rows_by_setup([setup_of(n) for n in adapter_names], key=self._apart)
        if isinstance(setup, composition.BatchSplit):
            state = self.adapter_state
            for name in setup.flatten():
                if name != composition.BASE and not self.shares_batches(name):
                    mixable = [f.name for f in state.families.values() if "BatchSplit" in f.blocks]
                    raise AdapterError(
                        f"adapter_names: '{name}' is a {state.adapters[name].method} adapter, which cannot share a "
                        f"batch with other adapters (the {', '.join(mixable)} families can); give its rows a batch "
                        "of their own")
        return order, setup  # type: ignore[return-value]

    def _offsets(self, groups: list[tuple[slice, Any]]) -> list[int] | None:
        """Per group of rows, how many positions of the backbone's output come before the group's
        own (prompt tuning in a BatchSplit: the longest prompt less the group's); None: none."""
        state = self.adapter_state
        before = [sum(f.positions_before(state, node) for f in state.families.values()) for _, node in groups]
        return [max(before) - n for n in before] if any(before) else None

    def _apart(self, setup: composition.CompositionBlock) -> tuple[str, ...]:
        """The families in ``setup`` whose sites run its rows apart from the others (see
        ``MethodFamily.rows_apart``): a mixed batch puts the groups without one first, as one run."""
        state = self.adapter_state
        return tuple(sorted({f.name for n in setup.flatten() if n in state.adapters for f in state.families.values()
                             if f.rows_apart and family_config(state.adapters[n].config, f.name) is not None}))

    def shares_batches(self, setup: str | composition.CompositionBlock) -> bool:
        """Whether rows running ``setup`` can share a forward pass with rows running other adapters
        (every family in it runs a BatchSplit)."""
        state = self.adapter_state
        return all("BatchSplit" in state.families[state.adapters[n].config.family].blocks
                   for n in self.setup_named(setup).flatten() if n != composition.BASE)

    def per_position(self, setup: str | composition.CompositionBlock | None) -> bool:
        """Whether ``setup`` (None: the active one) changes each position from that position and the
        keys and values before it only, so that a decoder continuing a text may keep those keys
        and values between steps (a KV cache) and write what it writes without one: every adapter's
        family says so (``MethodFamily.per_position``), and its blocks are Stacks, Fuses and
        Averages (a Split cuts the sequence at a position; Parallel and BatchSplit split rows)."""
        state = self.adapter_state
        setup = state.active if setup is None else self.setup_named(setup)
        if setup is None:
            return True
        if any(not isinstance(b, composition.Stack | composition.Fuse | composition.Average)
               for b in composition.blocks_in(setup)):
            return False
        return all(state.families[state.adapters[n].config.family].per_position(state.adapters[n].config)
                   for n in setup.flatten() if n in state.adapters)

    @contextlib.contextmanager
    def running(self, setup: composition.CompositionBlock) -> Iterator[None]:
        """Run ``setup`` inside the ``with`` block, then the setup that was active before."""
        state = self.adapter_state
        previous = state.active
        state.activate(setup)
        try:
            yield
        finally:
            state.activate(previous)

    def generate(self, *args: Any, adapter_names: list | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate``; with ``adapter_names`` row ``i`` runs ``adapter_names[i]``
        at every step (rows grouped into one BatchSplit, outputs back in the rows' order). Greedy
        or sampled; beam search and several sequences per row are refused with per-row adapters
        (the encoder and the decoder would see different row counts)."""
        parent = getattr(super(), "generate", None)
        if parent is None:
            raise AdapterError(f"{type(self).__name__} has no transformers generate; an AdapterModel with a causal-LM "
                               "head generates with AdapterModel.generate")
        if adapter_names is None:
            return parent(*args, **kwargs)
        if kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1:
            raise AdapterError("generate with adapter_names: one sequence per row (num_beams=1, num_return_sequences=1)")
        inputs = args[0] if args else next((kwargs.pop(k) for k in MODEL_INPUTS if kwargs.get(k) is not None), None)
        if inputs is None:
            raise AdapterError(f"generate with adapter_names: no {', '.join(MODEL_INPUTS)} to split")
        order, setup = self.rows_setup(adapter_names, inputs.shape[0])
        rows = _RowOrder(order, inputs.device)
        with self.running(setup):
            output = parent(rows.take(inputs), *args[1:], **{k: rows.take(v) for k, v in kwargs.items()})
        back = rows.back
        if isinstance(output, torch.Tensor):
            return output.index_select(0, back.to(output.device))
        output.sequences = output.sequences.index_select(0, back.to(output.sequences.device))
        return output

    @property
    def active_adapters(self) -> composition.CompositionBlock | None:
        return self.adapter_state.active

    @property
    def adapters_config(self) -> dict[str, MethodConfig]:
        return {n: r.config for n, r in self.adapter_state.adapters.items()}

    # -- training ------------------------------------------------------------------------------
    def freeze_model(self, freeze: bool = True) -> None:
        for p in self.parameters():
            p.requires_grad_(not freeze)

    def train_adapter(self, setup: str | list | composition.CompositionBlock) -> None:
        """Freeze everything except the named adapters and their heads, and activate them."""
        block = composition.parse(setup)
        self.set_active_adapters(block)
        self.freeze_model(True)
        state = self.adapter_state
        for name in block.flatten():
            frozen = family_of(state.adapters[name].config).frozen_parameters(state, name)  # e.g. VeRA's shared matrices
            for key, p in state.adapter_parameters(name).items():
                p.requires_grad_(key not in frozen)
            for p in self._head_parameters(name).values():
                p.requires_grad_(True)
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer layer's activations, adapters included, in the backward pass
        instead of keeping them: less memory for ~30% more compute. Non-reentrant checkpointing,
        so gradients reach the adapters of a frozen model (no input needs ``requires_grad``)."""
        backbone = self.adapter_state.backbone
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise AdapterError(f"{type(backbone).__name__} does not support gradient checkpointing")
        enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5.23
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- AdapterFusion ----------------------------------------------------------------------------
    def add_adapter_fusion(self, adapter_names: composition.Fuse | list[str] | str,
                           config: str | dict | FusionConfig | None = "dynamic", name: str | None = None, *,
                           overwrite_ok: bool = False, set_active: bool = False) -> str:
        """Add an AdapterFusion layer over bottleneck adapters (a ``Fuse``, a list or ``"a,b"``) at
        every place they all sit; ``config`` is "dynamic", "static", a dict or a FusionConfig.
        Returns its name (default: the members joined by commas)."""
        state = self.adapter_state
        if isinstance(adapter_names, composition.Fuse):
            members = [c if isinstance(c, str) else c.last() for c in adapter_names.children]
            name = name or adapter_names.name
        else:
            members = adapter_names.split(",") if isinstance(adapter_names, str) else list(adapter_names)
        name = name or ",".join(members)
        fusion_config = resolve_fusion_config(config)
        missing = [m for m in members if m not in state.adapters]
        if missing:
            raise composition.CompositionError(
                f"Fuse '{name}' needs adapter(s) {', '.join(missing)}, which are not on this model "
                f"(adapters: {', '.join(state.adapters) or 'none'}); load them first")
        composition.check_support(composition.Fuse(*members), method_of=lambda n: state.adapters[n].method,
                                  family_of=lambda n: state.adapters[n].config.family,
                                  supported={f.name: f.blocks for f in FAMILIES.values()})
        trained_on = {m: state.adapters[m].base_model for m in members if state.adapters[m].base_model}
        if len({Path(b.rstrip("/")).name for b in trained_on.values()}) > 1:
            listed = ", ".join(f"'{m}' on {b}" for m, b in trained_on.items())
            raise composition.CompositionError(f"Fuse '{name}' mixes adapters trained on different base models: {listed}")
        if name in state.adapters:
            raise AdapterError(f"fusion name '{name}' is the name of an adapter; pick another")
        if name in state.fusions:
            if not overwrite_ok:
                raise AdapterError(f"a fusion named '{name}' already exists (use overwrite_ok=True to replace it)")
            self.delete_adapter_fusion(name)
        state.forget_modules()
        with torch.device(next(self.parameters()).device):
            FAMILIES["bottleneck"].add_fusion(state, name, members, fusion_config)
        state.place_like_layers(name)
        state.forget_modules()
        self.train(self.training)  # new modules start in training mode; follow the model's (dropout)
        state.fusions[name] = FusionRecord(name, members, fusion_config)
        if set_active:
            self.set_active_adapters(composition.Fuse(*members, name=name if name != ",".join(members) else None))
        return name

    def delete_adapter_fusion(self, adapter_names: composition.Fuse | list[str] | str) -> None:
        state = self.adapter_state
        name = self._fusion_name(adapter_names)
        state.fusion(name)
        if state.active is not None and any(isinstance(b, composition.Fuse) and b.name == name
                                            for b in composition.blocks_in(state.active)):
            state.activate(None)
        FAMILIES["bottleneck"].delete_fusion(state, name)
        state.forget_modules()
        del state.fusions[name]

    @staticmethod
    def _fusion_name(adapter_names: composition.Fuse | list[str] | str) -> str:
        if isinstance(adapter_names, composition.Fuse):
            return adapter_names.name
        return adapter_names if isinstance(adapter_names, str) else ",".join(adapter_names)

    def train_adapter_fusion(self, setup: composition.Fuse | list | str, unfreeze_adapters: bool = False) -> None:
        """Freeze everything but the fusion layers in ``setup`` and the head the forward pass uses
        (and, with ``unfreeze_adapters``, the members), and activate ``setup``."""
        block = composition.parse(setup if not isinstance(setup, list) else [setup])
        self.set_active_adapters(block)
        self.freeze_model(True)
        state = self.adapter_state
        fuses = [b for b in composition.blocks_in(block) if isinstance(b, composition.Fuse)]
        if not fuses:
            raise composition.CompositionError(f"train_adapter_fusion needs a Fuse block, got {block!r}")
        for fuse in fuses:
            for p in state.fusion_parameters(fuse.name).values():
                p.requires_grad_(True)
        if unfreeze_adapters:
            for name in block.flatten():
                for p in state.adapter_parameters(name).values():
                    p.requires_grad_(True)
        head = self._current_head(None) if hasattr(self, "heads") else ""  # "": a task model's own head
        for p in (self._head_parameters(head).values() if head is not None else ()):
            p.requires_grad_(True)
        self.train()

    def get_fusion_regularization_loss(self) -> torch.Tensor | None:
        """``0.01 * ||W_v - I||^2`` summed over the trainable value matrices of fusions whose config
        asks for regularisation (add it to the training loss); None when there is none."""
        state = self.adapter_state
        total = None
        for record in state.fusions.values():
            if not record.config.regularization or not record.config.value:
                continue
            for layer in FAMILIES["bottleneck"].fusion_layers(state, record.name):
                weight = layer.value.weight
                if weight.requires_grad:
                    eye = torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)
                    term = 0.01 * (eye - weight).pow(2).sum()
                    total = term if total is None else total + term
        return total

    @contextlib.contextmanager
    def record_fusion_attention(self) -> Iterator[FusionRecorder]:
        """Record what every active fusion layer attends to, over all forward passes inside the
        ``with`` block: ``recorder.result()[fusion].weights[i, j]`` is the mean softmax weight place
        ``i`` (layer, site) gave member ``j``, over non-padded tokens."""
        recorder = FusionRecorder()
        self.adapter_state.recorders.append(recorder)
        try:
            yield recorder
        finally:
            self.adapter_state.recorders.remove(recorder)

    def save_adapter_fusion(self, save_directory: str | Path, adapter_names: composition.Fuse | list[str] | str,
                            with_head: bool | str = False) -> None:
        """Write a fusion (``adapter_fusion_config.json`` + ``adapter_fusion.safetensors``) and,
        with ``with_head``, the head named like it (or the head named by the string)."""
        save_adapter_fusion(self, Path(save_directory), self._fusion_name(adapter_names), with_head)

    def load_adapter_fusion(self, path: str | Path, load_as: str | None = None, set_active: bool = False,
                            with_head: bool = True) -> str:
        """Load a fusion folder saved by adaptercli or AdapterHub 1.x (its members must be loaded
        already); returns its name."""
        name = load_adapter_fusion(self, locate(path), load_as, with_head)
        if set_active:
            members = self.adapter_state.fusions[name].members
            self.set_active_adapters(composition.Fuse(*members, name=name if name != ",".join(members) else None))
        return name

    # -- merging adapters into a new one ------------------------------------------------------------
    @torch.no_grad()
    def average_adapter(self, adapter_name: str, adapter_list: list[str] | dict[str, float],
                        weights: list[float] | None = None, normalize_weights: bool = True,
                        combine_strategy: str = "linear", svd_rank: int | None = None, *,
                        density: float | None = None, majority_sign_method: str = "total", seed: int = 0,
                        overwrite_ok: bool = False, set_active: bool = False) -> None:
        """Add ``adapter_name`` merged from ``adapter_list`` (same method and shapes) by ``combine_strategy``:

        * ``linear`` (AdapterHub's): the weighted average of every weight (LoRA: of A and B apart);
          ``lora_linear_only_negate_b``: the same, with negative weights applied to B only;
          ``lora_delta_w_svd``: the weighted sum of the LoRA deltas, truncated by SVD to ``svd_rank``.
        * ``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear``, ``dare_ties`` (with
          ``density`` in (0, 1], ``majority_sign_method`` "total" or "frequency", DARE masks seeded by
          ``seed``): on every weight of any method; on LoRA as PEFT's ``add_weighted_adapter`` does
          (A and B apart, weights ``±sqrt(|w * scaling|)``), and ``cat``, ``svd``, ``<strategy>_svd``
          (to ``svd_rank``, default the largest source rank) for LoRA only.

        Weights are normalised to sum to 1 unless ``normalize_weights=False`` (PEFT does not normalise)."""
        state = self.adapter_state
        names, weights = _merge_inputs(adapter_list, weights, normalize_weights)
        records = [state.record(n) for n in names]
        config = _merged_config(records, combine_strategy, svd_rank, density, majority_sign_method)
        self.add_adapter(adapter_name, config, overwrite_ok=overwrite_ok)
        try:
            _fill_merged(state, adapter_name, names, weights, combine_strategy, density=density or 1.0,
                         sign_method=majority_sign_method, seed=seed)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if set_active:
            self.set_active_adapters(adapter_name)

    # -- heads -------------------------------------------------------------------------------------
    def _head_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Head weights saved with adapter ``name``: its flexible head, or the static head (e.g.
        ``classifier``) of a transformers task model: every parameter outside the backbone that is
        not tied to a backbone weight."""
        heads = getattr(self, "heads", None)
        if heads is not None:
            if name not in heads:
                return {}
            shared = {id(p) for p in self.adapter_state.backbone.parameters()}
            return {k: p for k, p in heads[name].named_parameters(prefix=f"heads.{name}") if id(p) not in shared}
        backbone = self.adapter_state.backbone
        if backbone is self:
            return {}
        inside = {id(p) for p in backbone.parameters()}
        return {k: p for k, p in self.named_parameters() if id(p) not in inside}

    def get_labels_dict(self, head_name: str | None = None) -> dict[int, str] | None:
        """id -> label of a head (default: the one the forward pass uses); a transformers task
        model's from its config. None when the head has no labels."""
        heads = getattr(self, "heads", None)
        if heads is None:
            id2label = getattr(self.config, "id2label", None)
            return {int(i): label for i, label in id2label.items()} if id2label else None
        name = head_name or self._current_head(None)  # type: ignore[attr-defined]
        if name is None:
            raise AdapterError("no head name given and no active head")
        if name not in heads:
            raise AdapterError(f"no head named '{name}' (heads: {', '.join(heads) or 'none'})")
        id2label = heads[name].config.id2label
        return dict(sorted(id2label.items())) if id2label else None

    def get_labels(self, head_name: str | None = None) -> list[str] | None:
        """The labels of a head in id order (see ``get_labels_dict``)."""
        id2label = self.get_labels_dict(head_name)
        return None if id2label is None else list(id2label.values())

    # -- merging -------------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """Fold a LoRA/IA3 adapter into the model's weights: same outputs, no inference overhead."""
        state = self.adapter_state
        if name in state.merged:
            return
        family_of(state.record(name).config).merge(state, name)
        state.merged.add(name)
        state.activate(state.active)  # merged adapters get no hook

    def unmerge_adapter(self, name: str) -> None:
        state = self.adapter_state
        if name not in state.merged:
            raise AdapterError(f"adapter '{name}' is not merged")
        family_of(state.record(name).config).unmerge(state, name)
        state.merged.discard(name)
        state.activate(state.active)

    # -- saving and loading -----------------------------------------------------------------------
    def save_adapter(self, save_directory: str | Path, name: str, with_head: bool = True, format: str = "native") -> None:
        """Write adapter ``name`` (and its head) to ``save_directory`` (parents are created).
        ``format="peft"`` writes a LoRA folder that PEFT loads; ``format="adapterhub"`` one that
        AdapterHub ``adapters`` 1.x loads (what ``adapter export --to adapterhub`` writes)."""
        save_adapter(self, Path(save_directory), name, with_head=with_head, format=format)

    def load_adapter(self, path: str | Path, load_as: str | None = None, with_head: bool = True,
                     set_active: bool = False, revision: str | None = None, index: str | Path | None = None,
                     method: str | None = None) -> str:
        """Load an adapter saved by adaptercli, AdapterHub ``adapters`` or PEFT; returns its name.
        ``path``: a folder, a Hub id (``org/name``, ``org/name@revision``; or ``revision=``) or an
        AdapterHub-style id ``task/dataset@org`` found in the adapter ``index`` (or $ADAPTERCLI_INDEX);
        ``method`` picks among the index's adapters for that id and this model (``lora``, ``seq_bn``)."""
        state = self.adapter_state
        folder = locate(path, revision, index=index, model_type=state.model_type, hidden_size=state.hidden_size,
                        method=method)
        name = load_adapter(self, folder, load_as=load_as, with_head=with_head)
        if set_active:
            self.set_active_adapters(name)
        return name

    def save_adapter_setup(self, save_directory: str | Path, adapter_setup: str | list | composition.CompositionBlock,
                           head_setup: HeadSetup = None) -> None:
        """Write a whole composition as one folder that ``load_adapter_setup`` restores in one call:
        each member and each fusion in a subfolder named like it, the heads named by ``head_setup``
        (a head name, a list of names or a block of them) likewise, and ``adapter_setup.json``
        (AdapterHub 1.x's layout)."""
        block = composition.parse(adapter_setup)
        if block is None:
            raise AdapterError("save_adapter_setup needs a composition (an adapter name, a list or a block)")
        save_adapter_setup(self, Path(save_directory), block, head_setup)

    def load_adapter_setup(self, path: str | Path, set_active: bool = True, revision: str | None = None
                           ) -> tuple[composition.CompositionBlock, HeadSetup]:
        """Load a setup saved by ``save_adapter_setup`` (ours or AdapterHub 1.x's; a folder or a
        Hub id ``org/name[@revision]``): its members, fusions and heads; with ``set_active`` (the
        default, unlike AdapterHub) the composition becomes the active setup and a single named head
        the active head. Returns the composition and the head setup."""
        setup, head_setup = load_adapter_setup(self, locate(path, revision))
        if set_active:
            self.set_active_adapters(setup)
            if isinstance(head_setup, str) and hasattr(self, "heads"):
                self.active_head = head_setup
        return setup, head_setup

    # -- reporting ------------------------------------------------------------------------------------
    def adapter_summary(self, as_table: bool = False) -> list[dict[str, Any]] | str:
        """One row per adapter: name, method, parameters, % of the backbone, active, trainable,
        merged; then the backbone. ``as_table=True`` returns the rows as a plain-text table
        (AdapterHub's layout), ready to print."""
        state = self.adapter_state
        is_adapter = key_pattern(state.containers)
        backbone = [p for k, p in state.backbone.named_parameters() if not is_adapter.search(k)]
        total = sum(p.numel() for p in backbone)
        active = state.active.flatten() if state.active else []
        rows = []
        for name, record in state.adapters.items():
            params = list(state.adapter_parameters(name).values())
            count = sum(p.numel() for p in params)
            rows.append({
                "name": name, "method": record.method, "params": count,
                "percent": 100.0 * count / total if total else math.nan,
                "active": name in active, "trainable": any(p.requires_grad for p in params),
                "merged": name in state.merged,
            })
        for name, fusion in state.fusions.items():
            params = list(state.fusion_parameters(name).values())
            count = sum(p.numel() for p in params)
            rows.append({
                "name": name, "method": "fusion", "params": count,
                "percent": 100.0 * count / total if total else math.nan,
                "active": bool(active) and all(m in active for m in fusion.members) and any(
                    isinstance(b, composition.Fuse) and b.name == name
                    for b in composition.blocks_in(state.active)),
                "trainable": any(p.requires_grad for p in params), "merged": False,
            })
        rows.append({"name": "(backbone)", "method": "", "params": total, "percent": 100.0, "active": True,
                     "trainable": any(p.requires_grad for p in backbone), "merged": False})
        return summary_text(rows) if as_table else rows


def summary_text(rows: list[dict[str, Any]]) -> str:
    """`adapter_summary` rows as a fixed-width text table."""
    header = f"{'Name':<24}{'Method':<16}{'#Param':>14}{'%Param':>10}{'Active':>8}{'Train':>7}"
    lines = ["=" * len(header), header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['name'][:23]:<24}{row['method'][:15]:<16}{row['params']:>14,}{row['percent']:>10.3f}"
                     f"{'yes' if row['active'] else 'no':>8}{'yes' if row['trainable'] else 'no':>7}")
    lines.append("=" * len(header))
    return "\n".join(lines)


_INITIALISED: dict[type, type] = {}


def init(model: nn.Module, layout: Architecture | dict | None = None) -> nn.Module:
    """Add the adapter API to a transformers model in place (and return it). Idempotent.
    ``layout`` describes a model the architecture table does not know (or overrides its entry):
    a dict of module paths (``architectures.layout_from_dict``) or an Architecture."""
    if isinstance(model, ModelAdaptersMixin):
        if layout is not None:
            raise AdapterError("this model already has the adapter API; pass layout= on the first init")
        return model
    if not isinstance(model, PreTrainedModel):
        raise AdapterError(f"adaptercli.init expects a transformers model, not {type(model).__name__}")
    cls = type(model)
    if cls not in _INITIALISED:
        _INITIALISED[cls] = type(f"{cls.__name__}WithAdapters", (ModelAdaptersMixin, cls),
                                 {"forward": _forward_with_rows(cls.forward)})
    state = AdapterState(model, FAMILIES, layout)  # before changing the class: a bad layout leaves the model as it was
    model.__class__ = _INITIALISED[cls]
    model.adapter_state = state
    return model


class _RowOrder:
    """Rows reordered so that rows running one setup sit together (``rows_setup``'s order), and
    back: ``take`` puts a batch-shaped tensor in that order (anything else as it is), ``back``
    indexes the results back into the rows' order."""

    def __init__(self, order: list[int], device: torch.device):
        self.batch = len(order)
        self.index = torch.tensor(order, device=device)
        self.back = torch.empty_like(self.index)
        self.back[self.index] = torch.arange(self.batch, device=device)

    def take(self, t: Any) -> Any:
        return t.index_select(0, self.index) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == self.batch else t


# What a forward pass reads its rows from: token ids, embeddings, an image or audio features.
MODEL_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features")


def _given(**inputs: Any) -> dict[str, Any]:
    """The inputs that are not None: a model without ``input_ids`` (Whisper, ViT) passes an
    unknown keyword on to its parts, where it would collide."""
    return {k: v for k, v in inputs.items() if v is not None}


def _model_input(input_ids: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """The tensor whose first axis is the batch: ``input_ids``, else the first of the other inputs."""
    found = input_ids if input_ids is not None else next(
        (kwargs[k] for k in MODEL_INPUTS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if found is None:
        raise AdapterError(f"no {', '.join(MODEL_INPUTS)} given: nothing to run")
    return found


def _forward_with_rows(parent: Any) -> Any:
    """The model's own ``forward`` with ``adapter_names`` added (see ``_rows_forward``); its
    signature is the model's plus that keyword, as transformers' ``generate`` reads it."""
    def forward(self, *args: Any, adapter_names: list | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return parent(self, *args, **kwargs)
        return _rows_forward(self, parent, adapter_names, args, kwargs)

    signature = inspect.signature(parent)
    params = list(signature.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    added = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = signature.replace(parameters=[*params[:at], added, *params[at:]])  # type: ignore[attr-defined]
    forward.__doc__ = parent.__doc__
    return forward


def _rows_forward(model: Any, parent: Any, adapter_names: list, args: tuple, kwargs: dict) -> Any:
    """One forward pass of an ``init``-ed transformers model in which row ``i`` runs
    ``adapter_names[i]``: rows grouped by setup (a BatchSplit), every output with a batch axis put
    back in the rows' order (a KV cache too). The model's own head serves every row."""
    kwargs = {**dict(zip(list(inspect.signature(parent).parameters)[1:], args, strict=False)), **kwargs}
    inputs = _model_input(kwargs.get("input_ids"), kwargs)
    batch = inputs.shape[0]
    order, setup = model.rows_setup(adapter_names, batch)
    offsets = model._offsets(composition.row_groups(setup, batch))
    if offsets is not None and any(offsets):
        raise AdapterError("adapter_names: rows with prompts of different lengths (or none) need an AdapterModel, whose "
                           "heads read each row from where its own output starts; this model's own head reads every "
                           "row at the same positions")
    rows = _RowOrder(order, inputs.device)
    with model.running(setup):
        output = parent(model, **{k: rows.take(v) for k, v in kwargs.items()})
    back = rows.back

    def in_order(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.index_select(0, back.to(value.device)) if value.dim() and value.shape[0] == batch else value
        if isinstance(value, tuple):
            return tuple(in_order(v) for v in value)
        if hasattr(value, "reorder_cache"):  # transformers' Cache: its keys and values have a batch axis
            value.reorder_cache(back)
        return value

    if isinstance(output, ModelOutput):
        for key in list(output.keys()):
            output[key] = in_order(output[key])
        return output
    return in_order(output)


@dataclasses.dataclass
class AdapterModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class AdapterModel(ModelAdaptersMixin, nn.Module):
    """A transformers backbone with named, flexible prediction heads (AdapterHub's AdapterModel).

    The backbone sits under its usual prefix (``bert``, ``roberta``, ``transformer``, ``model``), so
    weight keys read as in AdapterHub's files; heads are ``heads.<name>``. ``forward`` runs the
    active head (the head named like the first active adapter, or ``active_head``).
    """

    def __init__(self, backbone: PreTrainedModel, layout: Architecture | dict | None = None):
        super().__init__()
        self.base_model_prefix = backbone.base_model_prefix or "model"
        self.add_module(self.base_model_prefix, backbone)
        self.config = backbone.config
        self.heads = nn.ModuleDict()
        self._active_head: str | None = None
        self.adapter_state = AdapterState(self, FAMILIES, layout)
        self.adapter_state.on_activate.append(self._plan_heads)
        self._plan_heads()

    @property
    def active_head(self) -> str | None:
        return self._active_head

    @active_head.setter
    def active_head(self, name: str | None) -> None:
        self._active_head = name
        self._plan_heads()

    def _plan_heads(self) -> None:
        """Pick the head and the invertible adapter of a forward pass with one group of rows now,
        on each change of the setup or the heads, not in the forward pass: read there by name,
        torch.compile would guard on the name and recompile for every adapter. None: the setup
        gives groups of rows their own heads (Parallel, BatchSplit), picked in the forward pass."""
        active = self.adapter_state.active
        if active is not None and isinstance(composition.end_node(active), composition.Parallel | composition.BatchSplit):
            self._head_plan = None
            return
        name = self._current_head(None)
        self._head_plan = (self.heads[name] if name is not None else None, self._inverse_for(active))

    @property
    def base_model(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's layer classes: what FSDP wraps (and shards) one by one."""
        return getattr(self.base_model, "_no_split_modules", None)

    @property
    def is_causal(self) -> bool:
        arch = self.adapter_state.arch
        return bool(arch is not None and arch.causal or getattr(self.config, "is_decoder", False))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                 adapter_names: list | None = None, max_new_tokens: int = 20, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = 0, **kwargs: Any) -> torch.Tensor:
        """Greedy continuation with causal-LM heads, each row through ``adapter_names[i]`` (None:
        the active setup); see ``generate_greedy``. Returns the new tokens [B, <= max_new_tokens].
        transformers' greedy settings (``do_sample=False``, ``num_beams=1``,
        ``num_return_sequences=1``) are accepted; any other setting is refused in one line."""
        greedy = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}
        other = {k: v for k, v in kwargs.items() if not (k in greedy and v in (greedy[k], None))}
        if other:
            raise AdapterError("AdapterModel.generate continues greedily (do_sample=False, num_beams=1, one sequence "
                               f"per row); not available here: {', '.join(f'{k}={v!r}' for k, v in other.items())}")
        stop = set(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
        return generate_greedy(self, input_ids, attention_mask, adapter_names, max_new_tokens, stop,
                               0 if pad_token_id is None else pad_token_id)

    def add_head(self, name: str, config: HeadConfig, overwrite_ok: bool = False, set_active: bool = True) -> None:
        if name in self.heads and not overwrite_ok:
            raise AdapterError(f"a head named '{name}' already exists (use overwrite_ok=True to replace it)")
        embeddings = self.base_model.get_input_embeddings()
        dropout = float(getattr(self.config, "hidden_dropout_prob", 0.1) or 0.0)
        head = PredictionHead(config, self.adapter_state.hidden_size, dropout, self.is_causal, embeddings)
        dtype = embeddings.weight.dtype if embeddings is not None else None  # the backbone's (a bf16 model: a bf16 head)
        self.heads[name] = head.to(self.device, dtype).train(self.training)  # an eval model gets an eval head (dropout)
        if set_active:
            self.active_head = name
        self._plan_heads()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._plan_heads()  # its head went with it

    def add_classification_head(self, name: str, num_labels: int = 2, layers: int = 2, activation_function: str = "tanh",
                                id2label: dict[int, str] | None = None, multilabel: bool = False, **kw: Any) -> None:
        label2id = {label: int(i) for i, label in id2label.items()} if id2label else None
        kind = "multilabel_classification" if multilabel else "classification"
        self.add_head(name, HeadConfig(kind, num_labels, layers, activation_function, label2id), **kw)

    def add_multilabel_classification_head(self, name: str, num_labels: int = 2, **kw: Any) -> None:
        self.add_classification_head(name, num_labels, multilabel=True, **kw)

    def add_regression_head(self, name: str, layers: int = 2, activation_function: str = "tanh", **kw: Any) -> None:
        self.add_head(name, HeadConfig("regression", 1, layers, activation_function), **kw)

    def add_tagging_head(self, name: str, num_labels: int = 2, layers: int = 1, id2label: dict[int, str] | None = None,
                         **kw: Any) -> None:
        label2id = {label: int(i) for i, label in id2label.items()} if id2label else None
        self.add_head(name, HeadConfig("tagging", num_labels, layers, "tanh", label2id), **kw)

    def add_qa_head(self, name: str, layers: int = 1, **kw: Any) -> None:
        self.add_head(name, HeadConfig("question_answering", 2, layers, "tanh"), **kw)

    def add_masked_lm_head(self, name: str, **kw: Any) -> None:
        self.add_head(name, HeadConfig("masked_lm", 0, 2, "gelu"), **kw)

    def add_causal_lm_head(self, name: str, **kw: Any) -> None:
        self.add_head(name, HeadConfig("causal_lm", 0, 1, None, bias=False), **kw)

    def set_active_adapters(self, setup: str | list | composition.CompositionBlock | None) -> None:
        """As for any model; also makes the head named like the setup's output (a Fuse's name,
        else its last adapter) the active head, when there is one (AdapterHub does the same)."""
        super().set_active_adapters(setup)
        active = self.adapter_state.active
        if active is not None and composition.head_name(active) in self.heads:
            self.active_head = composition.head_name(active)

    def _current_head(self, head: str | None) -> str | None:
        """The head the forward pass uses: ``head``, the active head, or the one named like the
        active setup's output (a Fuse's name, else its last adapter, as in AdapterHub)."""
        if head is not None:
            return head
        if self.active_head in self.heads:
            return self.active_head
        active = self.adapter_state.active
        name = composition.head_name(active) if active else None
        return name if name in self.heads else None

    def _inverse_for(self, node: str | composition.CompositionBlock | None) -> nn.Module | None:
        """The invertible adapter an LM head undoes: the one of the first adapter that ran."""
        inv = getattr(self.adapter_state.invertible_root, "invertible_adapters", None)
        first = node if isinstance(node, str) or node is None else node.first()
        return inv[first] if inv is not None and first in inv else None

    def forward(self, input_ids=None, attention_mask=None, labels=None, head: str | None = None,
                adapter_names: list | None = None, logits_to_keep: int = 0, **kwargs):
        """Backbone + head. With a Parallel or BatchSplit setup (and no ``head``) every group of
        rows goes to its own head (named like its adapter) and a ``MultiHeadOutput`` holds
        one output per group, in order; ``loss`` is the sum of theirs. With ``adapter_names``
        (one adapter, fusion or block per row) see ``forward_rows``. ``logits_to_keep`` > 0: LM
        heads write the logits of the last that many positions only (as in transformers)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if adapter_names is not None:
            return self.forward_rows(adapter_names, input_ids, attention_mask, labels, logits_to_keep, **kwargs)
        outputs = self.base_model(**_given(input_ids=input_ids, attention_mask=attention_mask), **kwargs)
        hidden = outputs[0]
        attention_mask, labels = _with_prompt_positions(hidden, attention_mask, labels)
        if head is None and self._head_plan is not None:  # one group of rows, its head picked on activation
            chosen, inverse = self._head_plan
            if chosen is None:
                return AdapterModelOutput(hidden_states=hidden)
            loss, logits = chosen.predict(hidden, attention_mask, labels, inverse, logits_to_keep)
            return AdapterModelOutput(loss=loss, logits=logits, hidden_states=hidden)
        active = self.adapter_state.active
        groups = composition.row_groups(active, hidden.shape[0]) if active is not None and head is None else []
        if len(groups) <= 1:
            name = self._current_head(head)
            if name is None:
                return AdapterModelOutput(hidden_states=hidden)
            loss, logits = self.heads[name].predict(hidden, attention_mask, labels, self._inverse_for(active),
                                                    logits_to_keep)
            return AdapterModelOutput(loss=loss, logits=logits, hidden_states=hidden)
        channels = hidden.shape[0] // _model_input(input_ids, kwargs).shape[0]
        if channels > 1:  # Parallel replicated the batch: replicate what goes with each row too
            attention_mask, labels = (t.repeat(channels, *[1] * (t.dim() - 1)) if t is not None else None
                                      for t in (attention_mask, labels))
        results = self._group_outputs(hidden, attention_mask, labels, groups, logits_to_keep, self._offsets(groups))
        losses = [r.loss for r in results]
        return MultiHeadOutput(results, sum(losses) if all(loss is not None for loss in losses) else None)

    def _group_outputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                       groups: list[tuple[slice, Any]], logits_to_keep: int = 0,
                       offsets: list[int] | None = None) -> list[AdapterModelOutput]:
        """Each group of rows through the head named like its setup (none: hidden states only),
        from ``offsets[i]`` on for group ``i`` (see ``_offsets``). Without labels, neighbouring
        groups whose heads compute the same function (``same_as``: the causal-LM heads of
        different adapters are one tied projection) and undo no invertible adapter run it once
        over their rows: an LM head reads the whole vocabulary matrix, once."""
        results: list[AdapterModelOutput] = []
        runs: list[tuple[int, int, Any, nn.Module | None, list[int], int]] = []  # + group sizes, offset
        for i, (rows, node) in enumerate(groups):
            offset = offsets[i] if offsets is not None else 0
            name = composition.head_name(node)
            if name not in self.heads:
                runs.append((rows.start, rows.stop, None, None, [rows.stop - rows.start], offset))
                continue
            head, inverse = self.heads[name], self._inverse_for(node)
            if (labels is None and runs and runs[-1][2] is not None and runs[-1][1] == rows.start and inverse is None
                    and runs[-1][3] is None and runs[-1][5] == offset and not self.training
                    and runs[-1][2].same_as(head)):
                start, _, first, _, sizes, _ = runs[-1]
                runs[-1] = (start, rows.stop, first, None, [*sizes, rows.stop - rows.start], offset)
            else:
                runs.append((rows.start, rows.stop, head, inverse, [rows.stop - rows.start], offset))
        width = hidden.shape[1]

        def cut(t: torch.Tensor | None, rows: slice, offset: int) -> torch.Tensor | None:
            if t is None:
                return None
            t = t[rows]
            return t[:, offset:] if offset and t.dim() > 1 and t.shape[1] == width else t

        for start, end, head, inverse, sizes, offset in runs:
            rows = slice(start, end)
            states = cut(hidden, rows, offset)
            if head is None:
                results.append(AdapterModelOutput(hidden_states=states))
                continue
            loss, logits = head.predict(states, cut(attention_mask, rows, offset), cut(labels, rows, offset),
                                        inverse, logits_to_keep)
            if len(sizes) == 1:
                results.append(AdapterModelOutput(loss=loss, logits=logits, hidden_states=states))
                continue
            for part, scores in zip(states.split(sizes), logits.split(sizes), strict=True):
                results.append(AdapterModelOutput(logits=scores, hidden_states=part))
        return results

    def forward_rows(self, adapter_names: list, input_ids=None, attention_mask=None, labels=None,
                     logits_to_keep: int = 0, **kwargs) -> AdapterModelOutput:
        """One forward pass in which row ``i`` runs ``adapter_names[i]`` (an adapter, a fusion's
        name or a composition block) and its head (named like it; none: no logits for the row).
        Rows naming the same setup are grouped (a BatchSplit over the groups), so the cost stays
        that of one batch; outputs come back in the rows' order. ``logits`` is one tensor when
        every row's logits have one shape, else a list of per-row tensors; ``loss`` (with
        ``labels``) is the sum of each group's loss. Rows of prompt-tuning adapters: their logits
        are what they are alone (a token head's have the prompt's positions first);
        ``hidden_states`` has the longest prompt's positions in front of every row, those before
        a row's own prompt (or input) masked."""
        inputs = _model_input(input_ids, kwargs)
        batch = inputs.shape[0]
        order, setup = self.rows_setup(adapter_names, batch)
        rows = _RowOrder(order, inputs.device)
        reorder = rows.take
        with self.running(setup):
            hidden = self.base_model(**_given(input_ids=reorder(input_ids), attention_mask=reorder(attention_mask)),
                                     **{k: reorder(v) for k, v in kwargs.items()})[0]
        mask, labels = _with_prompt_positions(hidden, reorder(attention_mask), reorder(labels))
        groups = composition.row_groups(setup, batch)
        results = self._group_outputs(hidden, mask, labels, groups, logits_to_keep, self._offsets(groups))
        back = rows.back
        parts = [r.logits for r in results]
        logits: Any
        if all(p is not None for p in parts) and len({tuple(p.shape[1:]) for p in parts}) == 1:
            logits = torch.cat(parts).index_select(0, back)  # one shape: one tensor, in the rows' order
        else:
            per_row = [row for r in results for row in (r.logits if r.logits is not None else [None] * len(r.hidden_states))]
            logits = [per_row[i] for i in back.tolist()]
        losses = [r.loss for r in results if r.loss is not None]
        return AdapterModelOutput(loss=sum(losses) if losses else None, logits=logits,
                                  hidden_states=hidden.index_select(0, back))


@torch.no_grad()
def generate_greedy(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    adapter_names: list | None = None, max_new_tokens: int = 20,
                    stop: set[int] | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """Greedy continuation with causal-LM heads (see ``next_tokens``): row ``i`` through
    ``adapter_names[i]`` (None: the active setup), prompts left-padded. Returns the new tokens
    [B, <= max_new_tokens], a finished row (one of ``stop`` written) padded with ``pad_token_id``
    after its stop token."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor(sorted(stop or ()), dtype=input_ids.dtype, device=input_ids.device)
    if max_new_tokens <= 0:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    new: list[torch.Tensor] = []
    steps = next_tokens(model, input_ids, attention_mask, adapter_names)
    logits = next(steps)
    while True:
        token = torch.where(done, torch.full_like(done, pad_token_id, dtype=input_ids.dtype), logits.argmax(-1))
        new.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or len(new) == max_new_tokens:
            break
        logits = steps.send(token)
    steps.close()
    return torch.stack(new, 1)


def _check_lm_heads(model: AdapterModel, adapter_names: list | None) -> None:
    """Every row's setup ends in a causal-LM head (else one line naming the row's setup)."""
    seen: set[str] = set()
    for name in adapter_names if adapter_names is not None else [None]:
        key = name if isinstance(name, str) else repr(name)
        if key in seen:
            continue
        seen.add(key)
        head = model._current_head(None) if name is None else composition.head_name(model.setup_named(name))
        if head not in model.heads or model.heads[head].config.head_type != "causal_lm":
            what = "the active setup" if name is None else f"'{name}'" if isinstance(name, str) else repr(name)
            raise AdapterError(f"generate: {what} has no causal-LM head to write with (add_causal_lm_head('{head}')"
                               + (", or run the bare model's rows through an init-ed transformers model)"
                                  if head == composition.BASE else ")"))


def next_tokens(model: AdapterModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapter_names: list | None = None, cache: bool = True) -> Generator[torch.Tensor, torch.Tensor, None]:
    """Continue left-padded prompts with causal-LM heads, one token per row per step, row ``i``
    through ``adapter_names[i]`` (None: the active setup): yields the logits for each row's next
    token [B, vocab] and is sent the tokens chosen [B]. Positions count real tokens only; without
    ``attention_mask`` (no padding) none is passed, the path training takes for one row.

    With a KV cache (each step reads only the tokens sent) wherever every row's setup changes each
    position from itself and the keys and values before it (``AdapterModel.per_position``); then it
    writes what reading the whole text at every step writes. Otherwise (ReFT, gated adapters, a
    Split; ``cache=False``: always) every step reads each whole text again, as training does."""
    _check_lm_heads(model, adapter_names)
    kv = kv_cache(model) if cache and all(model.per_position(name) for name in (adapter_names or [None])) else {}
    ids, mask = input_ids, attention_mask
    step, inputs = ids, {}
    if mask is not None:
        inputs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    while True:
        logits = model(input_ids=step, adapter_names=adapter_names, logits_to_keep=1, **inputs, **kv).logits
        token = yield torch.stack([row[-1] for row in logits]) if isinstance(logits, list) else logits[:, -1]
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            positions = inputs["position_ids"][:, -1:] + 1 if kv else (mask.cumsum(-1) - 1).clamp(min=0)
            inputs = {"attention_mask": mask, "position_ids": positions}
        ids = torch.cat([ids, token[:, None].to(ids.dtype)], 1)
        step = ids[:, -1:] if kv else ids


def kv_cache(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments that make ``model``'s backbone keep its keys and values in a fresh
    cache, which later calls with the same arguments extend (transformers renamed
    ``past_key_values`` to ``cache`` in 5.2x: passed by the name this backbone reads)."""
    from transformers import DynamicCache

    base = getattr(model, "base_model", model)
    argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {argument: DynamicCache(config=model.config), "use_cache": True}


def _with_prompt_positions(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Prompt tuning puts its positions before the input: widen the mask (attended) and the token
    labels (ignored) to the backbone's output, as AdapterHub's heads do."""
    extra = hidden.shape[1] - (attention_mask.shape[1] if attention_mask is not None else hidden.shape[1])
    if extra <= 0:
        return attention_mask, labels
    mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], dim=1)
    if labels is not None and labels.dim() == 2 and labels.shape[1] == attention_mask.shape[1]:
        labels = torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], dim=1)
    return mask, labels


@dataclasses.dataclass
class MultiHeadOutput:
    """One output per head of a Parallel / BatchSplit forward pass (iterate or index it)."""

    head_outputs: list[AdapterModelOutput]
    loss: torch.Tensor | None = None

    def __iter__(self) -> Iterator[AdapterModelOutput]:
        return iter(self.head_outputs)

    def __getitem__(self, index: int) -> AdapterModelOutput:
        return self.head_outputs[index]

    def __len__(self) -> int:
        return len(self.head_outputs)


class AutoAdapterModel:
    """``AutoAdapterModel.from_pretrained(name_or_path, **kwargs)``: an ``AdapterModel`` around
    ``AutoModel.from_pretrained`` (same arguments: revision, attn_implementation, dtype, ...)."""

    @staticmethod
    def from_pretrained(name_or_path: str | Path, layout: Architecture | dict | None = None,
                        **kwargs: Any) -> AdapterModel:
        """``layout``: see ``init``; without one, an AdapterHub ``adapter_interface.json`` in a
        local model folder is read as the layout when the table has no entry for the model."""
        interface = Path(name_or_path) / "adapter_interface.json"
        if layout is None and interface.is_file():
            saved = json.loads(interface.read_text())
            if architecture_for(saved.get("model_type", ""), required=False) is None:
                layout = saved.get("interface", saved)
        return AdapterModel(AutoModel.from_pretrained(str(name_or_path), **kwargs), layout)

    @staticmethod
    def from_config(config: Any, layout: Architecture | dict | None = None, **kwargs: Any) -> AdapterModel:
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        return AdapterModel(AutoModel.from_config(config, **kwargs), layout)


__all__ = ["AdapterError", "AdapterModel", "AutoAdapterModel", "ModelAdaptersMixin", "MultiHeadOutput", "generate_greedy", "next_tokens",
           "init"]


# -- merging adapters: the checks and the weights (see `average_adapter`) ---------------------------------

_ADAPTERHUB_STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
_LORA_ONLY = ("cat", "svd", *(f"{s}_svd" for s in merging.STRATEGIES))
COMBINE_STRATEGIES = (*_ADAPTERHUB_STRATEGIES, *merging.STRATEGIES, *_LORA_ONLY)


def _merge_inputs(adapter_list: list[str] | dict[str, float], weights: list[float] | None,
                  normalize: bool) -> tuple[list[str], list[float]]:
    if isinstance(adapter_list, dict):
        adapter_list, weights = list(adapter_list), list(adapter_list.values())
    if not adapter_list:
        raise AdapterError("average_adapter needs at least one adapter")
    weights = [1.0] * len(adapter_list) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapter_list):
        raise AdapterError(f"{len(adapter_list)} adapters but {len(weights)} weights")
    if normalize:
        if sum(weights) == 0:
            raise AdapterError("the weights sum to 0 and cannot be normalised; pass normalize_weights=False")
        weights = [w / sum(weights) for w in weights]
    return list(adapter_list), weights


def _merged_config(records: list[AdapterRecord], strategy: str, svd_rank: int | None, density: float | None,
                   sign_method: str) -> MethodConfig:
    """The merged adapter's config, after refusing what has no meaning (one line each)."""
    names = [r.name for r in records]
    if strategy not in COMBINE_STRATEGIES:
        raise AdapterError(f"combine_strategy must be one of {', '.join(COMBINE_STRATEGIES)}, not '{strategy}'")
    if len({r.method for r in records}) > 1 or len({type(r.config) for r in records}) > 1:
        raise AdapterError(f"average_adapter needs adapters with the same config; they mix methods: "
                           f"{', '.join(f'{r.name} ({r.method})' for r in records)}")
    trained_on = {Path(r.base_model.rstrip("/")).name for r in records if r.base_model}
    if len(trained_on) > 1:
        raise AdapterError(f"cannot merge adapters trained on different base models: {', '.join(sorted(trained_on))}")
    needs_density = strategy.removesuffix("_svd") in merging.NEEDS_DENSITY
    if needs_density and (density is None or not 0 < density <= 1):
        raise AdapterError(f"combine_strategy '{strategy}' needs a density in (0, 1], got {density}")
    if sign_method not in merging.SIGN_METHODS:
        raise AdapterError(f"majority_sign_method must be total or frequency, not '{sign_method}'")
    config = records[0].config
    is_lora = records[0].method == "lora"  # the registry's name: plain LoRA (not IA3, DoRA or VeRA)
    if strategy in _LORA_ONLY or strategy.startswith("lora_"):
        if not is_lora:
            raise AdapterError(f"combine_strategy '{strategy}' works with LoRA adapters, not {records[0].method}")
    ranks = [r.config.r for r in records] if is_lora else []
    ignore = {"dropout", "init_weights", "init_weights_seed"}
    if is_lora and strategy not in _ADAPTERHUB_STRATEGIES:  # PEFT's strategies fold each scaling in
        ignore |= {"alpha"} | ({"r"} if strategy in _LORA_ONLY else set())
    shapes = [{k: v for k, v in r.config.to_dict().items() if k not in ignore} for r in records]
    if any(shape != shapes[0] for shape in shapes):
        raise AdapterError(f"average_adapter needs adapters with the same config; {', '.join(names)} differ"
                           + (" (LoRA ranks may differ for cat and svd)" if is_lora else ""))
    if strategy == "lora_delta_w_svd":
        if not svd_rank or svd_rank < 1:
            raise AdapterError("combine_strategy 'lora_delta_w_svd' needs svd_rank >= 1")
        return config.replace(r=svd_rank)
    if is_lora and strategy not in _ADAPTERHUB_STRATEGIES:  # PEFT: the merged adapter has alpha = r
        rank = sum(ranks) if strategy == "cat" else (svd_rank or max(ranks)) if strategy in _LORA_ONLY else ranks[0]
        return config.replace(r=rank, alpha=rank)
    return config


def _fill_merged(state: AdapterState, name: str, sources: list[str], weights: list[float], strategy: str, *,
                 density: float, sign_method: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    lora = FAMILIES["lora"]
    if strategy == "lora_delta_w_svd":
        lora.average_svd(state, name, sources, weights, state.adapters[name].config.r)
        return
    if state.adapters[name].method == "lora" and strategy in (*merging.STRATEGIES, *_LORA_ONLY):  # as PEFT
        lora.combine_into(state, name, sources, weights, strategy, density=density, sign_method=sign_method,
                          generator=generator)
        return
    target = state.adapter_parameters(name)
    parts = [state.adapter_parameters(n) for n in sources]
    for key, param in target.items():
        values = [part[_swap_name(key, name, source, state.containers)] for part, source in zip(parts, sources, strict=True)]
        if strategy in merging.STRATEGIES:
            param.copy_(merging.combine(values, weights, strategy, density=density, sign_method=sign_method,
                                        generator=generator))
        else:  # AdapterHub's linear average (negating only A's weight for lora_linear_only_negate_b)
            negate_a_only = strategy == "lora_linear_only_negate_b" and key.endswith("lora_A")
            param.copy_(sum((abs(w) if negate_a_only else w) * v for w, v in zip(weights, values, strict=True)))
