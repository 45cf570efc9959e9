"""Several processes (``accelerate launch``: DDP, FSDP2, DeepSpeed), and the one Accelerator a run
trains with.

Every process runs the same loop over the same global batches (the order is a function of the seed
and epoch); each takes a contiguous share of every batch (`share`). DDP averages the processes'
gradients, so each share's mean loss is weighted by its part of the batch's loss units (examples, or
scored tokens for token-level tasks): the step then equals one process's step on the whole batch.
Only the main process writes files, prints and reports to trackers; FSDP2 and DeepSpeed ZeRO-3
weights are gathered whole before anything is saved (`full_weights`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from .errors import AdapterCliError
from .model import AdapterModel
from .recipe import FULL_FINETUNING, Recipe
from .runs import run_lock


def make_accelerator(recipe: Recipe) -> Accelerator:
    """One Accelerator per run: mixed precision, trackers, and the launch's processes (if any)."""
    cfg, out = recipe.train, Path(recipe.output_dir)
    mixed = cfg.mixed_precision if torch.cuda.is_available() or cfg.mixed_precision == "bf16" else "no"
    # Accelerate keeps the first Accelerator's settings (mixed precision, compile) for the whole
    # process; a second run in the same process (the Python API, reproduce.py) gets its own. The
    # launch's processes (PartialState) stay as they are.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mixed, log_with=list(cfg.report_to) or None,
        dynamo_backend="inductor" if cfg.compile else "no",  # prepare() compiles the model, unwrap_model undoes it
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "trackers")),
        # full fine-tuning leaves weights without a gradient (BERT's pooler); adapters and heads use all theirs
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=recipe.adapter.method == FULL_FINETUNING)])
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise AdapterCliError("FSDP: adaptercli trains with FSDP2; set fsdp_version: 2 in the accelerate config "
                              "(see configs/accelerate/fsdp.yaml)")
    if kind == DistributedType.DEEPSPEED and cfg.gradient_accumulation_steps > 1:
        raise AdapterCliError("train.gradient_accumulation_steps: not supported under DeepSpeed yet; raise "
                              "train.batch_size instead (each process takes batch_size / processes examples)")
    return accelerator


@contextlib.contextmanager
def main_process_lock(accelerator: Accelerator, out: Path) -> Iterator[None]:
    """`run_lock`, held by the main process; every process learns whether it was taken."""
    with contextlib.ExitStack() as stack:
        problem = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(run_lock(out))
            except AdapterCliError as exc:
                problem = str(exc)
        if accelerator.num_processes > 1:
            problem = broadcast_object_list([problem])[0]
        if problem:
            raise AdapterCliError(problem)
        yield


def share(rows: int, accelerator: Accelerator | None) -> tuple[slice, bool]:
    """This process's rows of a batch: a contiguous slice, and whether it holds any. A process
    whose share is empty runs row 0 anyway (its loss multiplied by 0), so that every process runs
    the same forward and backward passes and their collective operations stay in step."""
    if accelerator is None or accelerator.num_processes == 1:
        return slice(0, rows), True
    per = math.ceil(rows / accelerator.num_processes)
    start = min(accelerator.process_index * per, rows)
    stop = min(start + per, rows)
    return (slice(start, stop), True) if start < stop else (slice(0, 1), False)


@contextlib.contextmanager
def full_weights(accelerator: Accelerator, model: Any) -> Iterator[AdapterModel]:
    """The unwrapped model, its trainable weights whole on the main process while inside, to save
    them. FSDP2 and DeepSpeed ZeRO-3 keep only a shard of each weight on each process: they are
    gathered here (collectively: every process enters), so a saved adapter is never a shard."""
    unwrapped = accelerator.unwrap_model(model)
    trainable = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            yield unwrapped
        return
    whole = [(n, p.full_tensor()) for n, p in trainable if isinstance(p, DTensor)]  # FSDP2
    swapped = []
    if accelerator.is_main_process:
        for name, value in whole:
            owner, _, leaf = name.rpartition(".")
            module = unwrapped.get_submodule(owner)
            swapped.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = nn.Parameter(value, requires_grad=True)
    try:
        yield unwrapped
    finally:
        for module, leaf, sharded in swapped:
            module._parameters[leaf] = sharded


def tracker_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat ``section.key`` values that every tracker accepts (lists and None as text)."""
    return _flat("", OmegaConf.to_container(OmegaConf.structured(recipe)))


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """``value`` as ``prefix.key`` entries, nested dicts walked depth first."""
    if not isinstance(value, dict):
        return {prefix: value if isinstance(value, bool | int | float | str) else str(value)}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(f"{prefix}.{key}" if prefix else str(key), item))
    return flat
