"""A run from its recipe: the model built to train (backbone, adapter or composition, head), what a
finished run writes (`save_trained`), and a finished run folder opened again (`load_run`: recipe,
model with its trained adapter active, tokenizer). Also the recipe as the run folder keeps it
(`with_absolute_paths`) and the run-folder lock (`run_lock`) that keeps two trainings apart."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from .assets import resolve_model_path
from .composition import Fuse, Stack
from .data import LoadedData
from .errors import AdapterCliError
from .formats import read_adapter
from .formats.common import write_weights
from .heads import RECIPE_HEADS, HeadConfig
from .hub import hub_access, pinned
from .locate import locate
from .model import AdapterModel, AutoAdapterModel, ModelAdaptersMixin, init
from .recipe import FULL_FINETUNING, Recipe, load_recipe

# The recipe head type a task gets when the recipe names none (instruction tuning: a causal LM head).
_TASK_HEADS = {"instruct": "causal_lm"}


def load_model(recipe: Recipe) -> tuple[AdapterModel | ModelAdaptersMixin, Any]:
    """The recipe's backbone (frozen later by ``train_adapter``) and tokenizer: an `AdapterModel`
    (flexible heads), or for ``data.task: seq2seq`` the encoder-decoder with its own LM head
    (``AutoModelForSeq2SeqLM`` given the adapter API by `adaptercli.init`), which writes the text
    and computes the loss itself. With ``model.quantization`` the backbone's linear layers are
    loaded in 4 or 8 bits by bitsandbytes (QLoRA); everything else, adapters and heads included,
    stays in full precision."""
    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    kwargs: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    if m.gguf_file:
        kwargs["gguf_file"] = m.gguf_file
    try:
        with hub_access():  # a Hub id with the Hub unreachable fails in seconds
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            if m.attn_implementation:
                kwargs["attn_implementation"] = m.attn_implementation
            if m.dtype:
                kwargs["dtype"] = m.dtype if m.dtype == "auto" else getattr(torch, m.dtype)
            if m.quantization:
                kwargs["quantization_config"] = quantization_config(m.quantization)
                kwargs.setdefault("dtype", torch.float32)  # norms, embeddings: kept in full precision
                kwargs["device_map"] = {"": PartialState().device}  # this process's device
            if recipe.data.task == "seq2seq":
                model = init(AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs), layout=m.layout)
            else:
                model = AutoAdapterModel.from_pretrained(path, layout=m.layout, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        local = Path(path).exists()
        hint = "" if local else (" — it is not a local folder and the Hugging Face Hub could not be reached; "
                                 "set model.name_or_path to a downloaded model folder (or `minilm`, installed offline)")
        key = "model.quantization" if m.quantization and local else "model.name_or_path"
        raise AdapterCliError(f"{key}: cannot load '{m.name_or_path}'{hint} ({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def quantization_config(kind: str) -> Any:
    """bitsandbytes settings for ``model.quantization``: ``4bit`` is QLoRA's NF4 with double
    quantization, computing in bf16 on GPUs that have it (fp16 on older ones, fp32 on the CPU);
    ``8bit`` is LLM.int8()."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AdapterCliError("model.quantization: needs bitsandbytes; install it with "
                              "pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if torch.cuda.is_available():
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def attach_adapter(model: AdapterModel, recipe: Recipe) -> str:
    """Add the recipe's new adapter, or load its pretrained one; returns the adapter's name."""
    name = recipe.adapter.name
    if recipe.adapter.load:  # a frozen adapter gets a new head for this task; else its own is trained on
        with_head = not recipe.adapter.freeze and isinstance(model, AdapterModel)  # seq2seq: the model's own
        model.load_adapter(recipe.adapter.load, load_as=name, with_head=with_head)
    else:
        model.add_adapter(name, {"method": recipe.adapter.method, **recipe.adapter.config})
    return name


def member_sources(model: AdapterModel, recipe: Recipe) -> list[tuple[Path, str]]:
    """The composition's member adapters: each one's folder and the name it runs under (its saved
    name, or that name plus its position when two members share one, or the recipe's adapter has it).
    A fusion trained over them names them so: whoever loads the run must use the same names."""
    state = model.adapter_state
    members: list[tuple[Path, str]] = []
    for index, source in enumerate(recipe.composition.adapters if recipe.composition else []):
        folder = locate(source, model_type=state.model_type, hidden_size=state.hidden_size)
        saved = read_adapter(folder, with_head=False).saved_name
        taken = saved in [name for _, name in members] or saved == recipe.adapter.name
        members.append((folder, f"{saved}_{index}" if taken else saved))
    return members


def load_members(model: AdapterModel, recipe: Recipe) -> list[str]:
    """Load the composition's member adapters (frozen; heads left behind) under the names of
    ``member_sources``."""
    return [model.load_adapter(folder, load_as=name, with_head=False) for folder, name in member_sources(model, recipe)]


def setup_of(recipe: Recipe, members: list[str]) -> Stack | Fuse:
    """What runs in a forward pass: the fusion of the members (named like the recipe's adapter, whose
    head it feeds), or the members stacked under the recipe's adapter."""
    name = recipe.adapter.name
    if recipe.composition is not None and recipe.composition.type == "fuse":
        return Fuse(*members, name=name)
    return Stack(*members, name)


def prepare_model(recipe: Recipe, data: LoadedData) -> tuple[AdapterModel | ModelAdaptersMixin, Any]:
    """Backbone + what the recipe trains + its head, ready to train: a new or loaded adapter (over
    frozen stacked members), an adapter started from the weighted average of the members, or an
    AdapterFusion layer over frozen members. A seq2seq model gets no head: its own LM head stays
    frozen, like the rest of the backbone."""
    model, tokenizer = load_model(recipe)
    comp, name = recipe.composition, recipe.adapter.name
    members = load_members(model, recipe) if comp is not None and comp.type in ("stack", "fuse") else []
    if comp is not None and comp.type == "average":
        averaged = load_members(model, recipe)
        model.average_adapter(name, averaged, weights=comp.kwargs.get("weights"),
                              **{k: v for k, v in comp.kwargs.items() if k != "weights"})
        for member in averaged:
            model.delete_adapter(member)
    elif comp is not None and comp.type == "fuse":
        model.add_adapter_fusion(setup_of(recipe, members), comp.kwargs.get("config", "dynamic"))
    elif recipe.adapter.method != FULL_FINETUNING:
        attach_adapter(model, recipe)
    own_head = not isinstance(model, AdapterModel)  # seq2seq: the encoder-decoder's LM head
    if not own_head and name not in model.heads:
        head = recipe.head
        kind = RECIPE_HEADS[head.type or _TASK_HEADS.get(data.task, data.task)]
        labels = data.label_names or []
        num_labels = head.num_labels or (1 if kind == "regression" else len(labels) or 2)
        label2id = {label: i for i, label in enumerate(labels)} if labels else None
        model.add_head(name, HeadConfig(kind, num_labels, head.layers, head.activation, label2id, dropout_prob=head.dropout))
    setup = setup_of(recipe, members)
    if recipe.adapter.method == FULL_FINETUNING:  # the baseline: every weight trains, no adapter
        model.freeze_model(False)
        if not own_head:
            model.active_head = name
        model.train()
    elif isinstance(setup, Fuse):
        model.train_adapter_fusion(setup)  # the members stay frozen; the fusion layers and the head train
    else:
        model.train_adapter(name)
        model.set_active_adapters(setup)  # run the stacked members too, train only `name`
        frozen = dict(model.adapter_state.adapter_parameters(name)) if recipe.adapter.freeze else {}
        if own_head:  # an untied LM head counts as the model's "static head": keep it frozen all the same
            frozen.update(model._head_parameters(name))
        for p in frozen.values():
            p.requires_grad_(False)
    return model, tokenizer


def save_trained(model: AdapterModel, folder: Path, recipe: Recipe) -> None:
    """Write what a run trained: its adapter and head, or its fusion and head (never the members).
    A full fine-tuning baseline writes all its weights to ``model.safetensors`` (for the record: the
    run-folder commands serve adapter runs)."""
    if recipe.adapter.method == FULL_FINETUNING:
        folder.mkdir(parents=True, exist_ok=True)
        write_weights(folder / "model.safetensors", {k: v.detach() for k, v in model.state_dict().items()})
    elif recipe.composition is not None and recipe.composition.type == "fuse":
        model.save_adapter_fusion(folder, recipe.adapter.name, with_head=True)
    else:  # a seq2seq model's own LM head is part of the base model: not saved
        model.save_adapter(folder, recipe.adapter.name, with_head=isinstance(model, AdapterModel))


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe as saved in the run folder: local paths made absolute, so ``adapter eval`` and
    ``adapter predict`` work from any directory; adapters downloaded by Hub id pinned to the
    commit they came from (``org/name@<sha>``), so they load the same files again."""
    saved = copy.deepcopy(recipe)
    for section, key in (("data", "train_file"), ("data", "validation_file"), ("data", "test_file"),
                         ("data", "name"), ("model", "name_or_path"), ("adapter", "load")):
        value = getattr(getattr(saved, section), key)
        if value and Path(value).exists():
            setattr(getattr(saved, section), key, str(Path(value).resolve()))
    if saved.adapter.load:
        saved.adapter.load = pinned(saved.adapter.load)
    if saved.composition is not None:
        saved.composition.adapters = [str(Path(a).resolve()) if Path(a).exists() else pinned(a)
                                      for a in saved.composition.adapters]
    return saved


def load_run(run_dir: str | Path) -> tuple[Recipe, AdapterModel, Any, str]:
    """A finished run's recipe, model with its trained adapter active, tokenizer and adapter name."""
    run = Path(run_dir)
    if not (run / "recipe.yaml").exists() or not (run / "adapter").exists():
        raise AdapterCliError(f"{run}: not a finished run folder (needs recipe.yaml and adapter/)")
    recipe = load_recipe(run / "recipe.yaml")
    if recipe.adapter.method == FULL_FINETUNING:
        raise AdapterCliError(f"{run}: a full fine-tuning baseline; its evaluations are in metrics.jsonl "
                              "(eval, predict, summary and export serve adapter runs)")
    model, tokenizer = load_model(recipe)
    comp = recipe.composition
    members = load_members(model, recipe) if comp is not None and comp.type in ("stack", "fuse") else []
    if comp is not None and comp.type == "fuse":
        name = model.load_adapter_fusion(run / "adapter", load_as=recipe.adapter.name, with_head=True)
    else:
        name = model.load_adapter(run / "adapter")
    model.set_active_adapters(setup_of(recipe, members))
    model.eval()
    return recipe, model, tokenizer, name


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (our pid) while training, so a second `adapter train` into the same
    folder is refused; a lock left by a run that died (kill -9) is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise AdapterCliError(f"{out} is in use by a running training (pid {holder}); wait for it to "
                                      "end or choose another output_dir") from None
            lock.unlink(missing_ok=True)  # stale: its run is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    else:
        raise AdapterCliError(f"{out}: cannot take the run lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> int | None:
    """The pid in a lock file if that process is still alive, else None."""
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # unreadable or half-written: treat as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid if pid != os.getpid() else None
