"""The adapter API added to a Hugging Face model: add, activate, train, save, load, merge.

``init(model)`` gives any ``transformers`` model these methods in place (its class becomes a
subclass with :class:`ModelAdaptersMixin` first), without touching its modules or weights.
:class:`AdapterModel` (via ``AutoAdapterModel.from_pretrained``) is a backbone with flexible heads.
All per-model state lives in one :class:`AdapterState` object.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from . import composition
from .architectures import Architecture, architecture_for
from .errors import AdapterCliError
from .heads import HeadConfig, PredictionHead
from .methods import FAMILIES, MethodConfig, family_of, method_name, resolve_config


class AdapterError(AdapterCliError):
    """Misuse of the adapter API: unknown names, collisions, wrong state."""


@dataclasses.dataclass
class AdapterRecord:
    name: str
    config: MethodConfig

    @property
    def method(self) -> str:
        return method_name(self.config)


_ADAPTER_KEY = r"(^|\.)(adapters|loras|prefix_tunings|invertible_adapters)\.{name}\."


class AdapterState:
    """Everything adaptercli keeps about one model: its adapters, what is active, the hooks."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.backbone: nn.Module = model.base_model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model_type: str = config.model_type
        self.arch: Architecture | None = architecture_for(self.model_type, required=False)
        self.hidden_size: int = getattr(config, "hidden_size", None) or config.dim
        self.num_layers: int = getattr(config, "num_hidden_layers", None) or config.n_layers
        heads = getattr(config, "num_attention_heads", None) or config.n_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim: int = getattr(config, "head_dim", None) or self.hidden_size // heads
        self.adapters: dict[str, AdapterRecord] = {}
        self.active: composition.CompositionBlock | None = None
        self.handles: list = []
        self.merged: set[str] = set()

    def require_architecture(self, what: str) -> Architecture:
        """The table entry, or an error saying that ``what`` needs one (and which types have one)."""
        return self.arch or architecture_for(self.model_type, what=what)

    def record(self, name: str) -> AdapterRecord:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise AdapterError(f"no adapter named '{name}' (adapters on this model: {known})")
        return self.adapters[name]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters, keyed by their path inside the backbone."""
        pattern = re.compile(_ADAPTER_KEY.format(name=re.escape(name)))
        return {k: p for k, p in self.backbone.named_parameters(remove_duplicate=False) if pattern.search(k)}

    def activate(self, setup: composition.CompositionBlock | None) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        names: list[str] = []
        if setup is not None:
            if type(setup) is not composition.Stack:
                raise AdapterError(
                    f"{type(setup).__name__} composition is not executable yet; use a single adapter or Stack"
                )
            names = setup.flatten()
            for name in names:
                self.record(name)
        for family in FAMILIES.values():
            mine = [n for n in names if family_of(self.adapters[n].config) is family]
            self.handles += family.activate(self, mine)
        self.active = setup


class ModelAdaptersMixin:
    """Adapter methods for a transformers model. Use :func:`init` rather than inheriting."""

    _adapter_state: AdapterState

    # -- adding and removing ---------------------------------------------------------------
    def add_adapter(self, name: str, config: str | dict | MethodConfig | None = None, *,
                    overwrite_ok: bool = False, set_active: bool = False) -> None:
        """Add a new adapter ``name`` with a method config (``"lora"``, ``"seq_bn[reduction_factor=8]"``,
        a dict or a config object). Its parameters are created inside the model."""
        state = self._adapter_state
        if name in state.adapters:
            if not overwrite_ok:
                raise AdapterError(f"an adapter named '{name}' already exists (use overwrite_ok=True to replace it)")
            self.delete_adapter(name)
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise AdapterError(f"adapter name '{name}' may only use letters, digits, '_' and '-'")
        method_config = resolve_config(config)
        with torch.device(next(self.parameters()).device):  # adapters live beside the weights they change
            family_of(method_config).add(state, name, method_config)
        state.adapters[name] = AdapterRecord(name, method_config)
        if set_active:
            self.set_active_adapters(name)

    def delete_adapter(self, name: str) -> None:
        state = self._adapter_state
        record = state.record(name)
        if name in state.merged:
            self.unmerge_adapter(name)
        active = state.active.flatten() if state.active else []
        if name in active:
            state.activate(None)
        family_of(record.config).delete(state, name)
        del state.adapters[name]
        heads = getattr(self, "heads", None)
        if heads is not None and name in heads:
            del heads[name]

    # -- activation --------------------------------------------------------------------------
    def set_active_adapters(self, setup: str | list | composition.CompositionBlock | None) -> None:
        """Run these adapters in every forward pass (None: none). A list means Stack."""
        self._adapter_state.activate(composition.parse(setup))

    @property
    def active_adapters(self) -> composition.CompositionBlock | None:
        return self._adapter_state.active

    @property
    def adapters_config(self) -> dict[str, MethodConfig]:
        return {n: r.config for n, r in self._adapter_state.adapters.items()}

    # -- training ------------------------------------------------------------------------------
    def freeze_model(self, freeze: bool = True) -> None:
        for p in self.parameters():
            p.requires_grad_(not freeze)

    def train_adapter(self, setup: str | list | composition.CompositionBlock) -> None:
        """Freeze everything except the named adapters and their heads, and activate them."""
        block = composition.parse(setup)
        self.set_active_adapters(block)
        self.freeze_model(True)
        state = self._adapter_state
        for name in block.flatten():
            for p in state.adapter_parameters(name).values():
                p.requires_grad_(True)
            for p in self._head_parameters(name).values():
                p.requires_grad_(True)
        self.train()

    # -- heads -------------------------------------------------------------------------------------
    def _head_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Head weights saved with adapter ``name``: its flexible head, or the static head (e.g.
        ``classifier``) of a transformers task model: every parameter outside the backbone that is
        not tied to a backbone weight."""
        heads = getattr(self, "heads", None)
        if heads is not None:
            if name not in heads:
                return {}
            shared = {id(p) for p in self._adapter_state.backbone.parameters()}
            return {k: p for k, p in heads[name].named_parameters(prefix=f"heads.{name}") if id(p) not in shared}
        backbone = self._adapter_state.backbone
        if backbone is self:
            return {}
        inside = {id(p) for p in backbone.parameters()}
        return {k: p for k, p in self.named_parameters() if id(p) not in inside}

    # -- merging -------------------------------------------------------------------------------------
    def merge_adapter(self, name: str) -> None:
        """Fold a LoRA/IA3 adapter into the model's weights: same outputs, no inference overhead."""
        state = self._adapter_state
        if name in state.merged:
            return
        family_of(state.record(name).config).merge(state, name)
        state.merged.add(name)
        state.activate(state.active)  # merged adapters get no hook

    def unmerge_adapter(self, name: str) -> None:
        state = self._adapter_state
        if name not in state.merged:
            raise AdapterError(f"adapter '{name}' is not merged")
        family_of(state.record(name).config).unmerge(state, name)
        state.merged.discard(name)
        state.activate(state.active)

    # -- saving and loading -----------------------------------------------------------------------
    def save_adapter(self, save_directory: str | Path, name: str, with_head: bool = True, format: str = "native") -> None:
        """Write adapter ``name`` (and its head) to ``save_directory`` (parents are created).
        ``format="peft"`` writes a LoRA folder that PEFT loads."""
        from .formats import save_adapter

        save_adapter(self, Path(save_directory), name, with_head=with_head, format=format)

    def load_adapter(self, path: str | Path, load_as: str | None = None, with_head: bool = True,
                     set_active: bool = False) -> str:
        """Load an adapter folder saved by adaptercli, AdapterHub ``adapters`` or PEFT; returns its name."""
        from .formats import load_adapter

        name = load_adapter(self, Path(path), load_as=load_as, with_head=with_head)
        if set_active:
            self.set_active_adapters(name)
        return name

    # -- reporting ------------------------------------------------------------------------------------
    def adapter_summary(self, as_table: bool = False) -> list[dict[str, Any]] | str:
        """One row per adapter: name, method, parameters, % of the backbone, active, trainable,
        merged; then the backbone. ``as_table=True`` returns the rows as a plain-text table
        (AdapterHub's layout), ready to print."""
        state = self._adapter_state
        is_adapter = re.compile(_ADAPTER_KEY.format(name=r"[^.]+"))
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


def init(model: nn.Module) -> nn.Module:
    """Add the adapter API to a transformers model in place (and return it). Idempotent."""
    if isinstance(model, ModelAdaptersMixin):
        return model
    if not isinstance(model, PreTrainedModel) and not isinstance(model, AdapterModel):
        raise AdapterError(f"adaptercli.init expects a transformers model, not {type(model).__name__}")
    cls = type(model)
    if cls not in _INITIALISED:
        _INITIALISED[cls] = type(f"{cls.__name__}WithAdapters", (ModelAdaptersMixin, cls), {})
    model.__class__ = _INITIALISED[cls]
    model._adapter_state = AdapterState(model)
    return model


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

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.base_model_prefix = backbone.base_model_prefix or "model"
        self.add_module(self.base_model_prefix, backbone)
        self.config = backbone.config
        self.heads = nn.ModuleDict()
        self.active_head: str | None = None
        self._adapter_state = AdapterState(self)

    @property
    def base_model(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_causal(self) -> bool:
        return self._adapter_state.model_type in ("gpt2", "llama", "mistral", "qwen2") or bool(
            getattr(self.config, "is_decoder", False))

    def add_head(self, name: str, config: HeadConfig, overwrite_ok: bool = False, set_active: bool = True) -> None:
        if name in self.heads and not overwrite_ok:
            raise AdapterError(f"a head named '{name}' already exists (use overwrite_ok=True to replace it)")
        embeddings = self.base_model.get_input_embeddings()
        dropout = float(getattr(self.config, "hidden_dropout_prob", 0.1) or 0.0)
        head = PredictionHead(config, self._adapter_state.hidden_size, dropout, self.is_causal, embeddings)
        self.heads[name] = head.to(self.device)
        if set_active:
            self.active_head = name

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

    def _current_head(self, head: str | None) -> str | None:
        if head is not None:
            return head
        if self.active_head in self.heads:
            return self.active_head
        active = self._adapter_state.active
        first = active.flatten()[0] if active else None
        return first if first in self.heads else None

    def forward(self, input_ids=None, attention_mask=None, labels=None, head: str | None = None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs[0]
        name = self._current_head(head)
        if name is None:
            return AdapterModelOutput(hidden_states=hidden)
        inverse = None
        inv = getattr(self.base_model, "invertible_adapters", None)
        active = self._adapter_state.active
        if inv is not None and active is not None and active.flatten()[0] in inv:
            inverse = inv[active.flatten()[0]]
        loss, logits = self.heads[name].predict(hidden, attention_mask, labels, inverse)
        return AdapterModelOutput(loss=loss, logits=logits, hidden_states=hidden)


class AutoAdapterModel:
    """``AutoAdapterModel.from_pretrained(name_or_path, **kwargs)``: an :class:`AdapterModel` around
    ``AutoModel.from_pretrained`` (same arguments: revision, attn_implementation, dtype, ...)."""

    @staticmethod
    def from_pretrained(name_or_path: str | Path, **kwargs: Any) -> AdapterModel:
        return AdapterModel(AutoModel.from_pretrained(str(name_or_path), **kwargs))

    @staticmethod
    def from_config(config: Any, **kwargs: Any) -> AdapterModel:
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        return AdapterModel(AutoModel.from_config(config, **kwargs))


__all__ = ["AdapterError", "AdapterModel", "AutoAdapterModel", "ModelAdaptersMixin", "init"]
