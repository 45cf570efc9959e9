"""Checkpoints: where a run is (`RunState`), written atomically every ``train.save_steps`` to
``checkpoints/step-N`` (trainable weights, optimizer and scheduler state, random generators, data
position) and restored by ``--resume``; the oldest pruned beyond ``train.save_total_limit``.

Weights and optimizer state are saved whole, never one process's shard (FSDP2's DTensors are
gathered, and cut back into shards on restore), so a run resumes on any number of processes."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .errors import AdapterCliError
from .formats.common import read_json, write_json, write_weights
from .model import AdapterModel


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(folder: Path, model: AdapterModel, optimizer, scheduler, progress: RunState, name: str,
                    write: bool = True) -> None:
    """Write ``checkpoints/step-N`` via a temporary folder and a rename, then point ``latest`` at
    it: a run killed at any moment leaves the previous checkpoint intact. Weights and optimizer
    state are saved whole (never one process's shard), so a run resumes on any number of
    processes. Under several processes every one calls this (gathering a sharded optimizer state
    is collective) and only the main one writes (``write``)."""
    final = folder / f"step-{progress.step}"
    state = full_optimizer_state(optimizer)
    if not write:
        return
    if final.exists():  # the same step saved before (a resumed run ending where it was cut): same state
        write_json(folder / "latest.json", {"checkpoint": final.name, "step": progress.step})
        return
    tmp = folder / f".tmp-step-{progress.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    write_weights(tmp / "trainable.safetensors", trainable)
    tensors = {f"{i}.{key}": value for i, s in state["state"].items() for key, value in s.items() if torch.is_tensor(value)}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    write_weights(tmp / "optimizer.safetensors", tensors)
    numpy_rng = np.random.get_state()
    write_json(tmp / "state.json", {
        "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(), "progress": progress.__dict__,
        "trainable": list(trainable), "adapter": name,
        "rng": {"python": random.getstate(), "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]},
    })
    os.replace(tmp, final)
    write_json(folder / "latest.json", {"checkpoint": final.name, "step": progress.step})


def full_optimizer_state(optimizer) -> dict[str, Any]:
    """The optimizer's state dict with every tensor whole: FSDP2 shards the state like the weights
    (DTensors, gathered here, collectively). DeepSpeed keeps its state inside its engine: none is
    saved, and a resumed run starts the optimizer's moments afresh."""
    if _is_deepspeed(optimizer):
        return {"state": {}, "param_groups": []}
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def _is_deepspeed(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer it prepares
    return type(inner).__module__.split(".")[0] == "deepspeed" or "deepspeed" in type(inner).__module__


def load_checkpoint(folder: Path, model: AdapterModel, optimizer, scheduler) -> RunState:
    """Restore the latest checkpoint; a damaged one is reported (and how to go on), not a traceback."""
    path, meta = restore_weights(folder, model)
    return restore_training_state(folder, path, meta, optimizer, scheduler)


def restore_weights(folder: Path, model: AdapterModel) -> tuple[Path, dict[str, Any]]:
    """Load the latest checkpoint's trained weights into the (not yet distributed) model; returns
    the checkpoint's folder and its state.json."""
    path = folder
    try:
        path = folder / read_json(folder / "latest.json")["checkpoint"]
        meta = read_json(path / "state.json")
        weights = load_file(path / "trainable.safetensors")
        params = dict(model.named_parameters())
        missing = sorted(set(weights) - set(params))
        if missing:
            raise ValueError(f"it holds weights this recipe's model lacks ({missing[0]}, ...)")
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
    except (AdapterCliError, SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        _unrestorable(folder, path, exc)
    return path, meta


def restore_training_state(folder: Path, path: Path, meta: dict[str, Any], optimizer, scheduler) -> RunState:
    """Restore optimizer, scheduler, progress and random generators from a checkpoint (after the
    optimizer was prepared: FSDP2's sharded state is cut from the saved whole tensors)."""
    try:
        tensors = load_file(path / "optimizer.safetensors")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if index != "rng":
                state.setdefault(int(index), {})[name] = value
        if meta["param_groups"] and not _is_deepspeed(optimizer):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {i: {k: shard_like(v, params[i]) for k, v in s.items()} for i, s in state.items()}
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        progress = RunState(**meta["progress"])
    except (AdapterCliError, SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        _unrestorable(folder, path, exc)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "rng" in meta:
        version, internal, gauss = meta["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = meta["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return progress


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved whole optimizer tensor laid out like its parameter: cut into this process's shard
    when FSDP2 shards the parameter (scalars such as Adam's step stay as they are)."""
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def _unrestorable(folder: Path, path: Path, exc: Exception) -> NoReturn:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    raise AdapterCliError(f"--resume: cannot restore the checkpoint {path} ({detail}); delete it (and "
                          f"{folder / 'latest.json'}) to resume from an earlier one, or train without --resume") from None


def prune_checkpoints(folder: Path, keep: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("step-*"))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
