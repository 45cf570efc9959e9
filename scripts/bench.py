"""Benchmark adaptercli against full fine-tuning (and optionally PEFT) on one machine, as ratios.

Every number that matters is a ratio measured in the same run, on the same randomly initialised
model, the same batch and the same device, so the results do not depend on how fast the machine
is (see ``../shared/notes/anchors.md`` for the targets):

* training throughput (samples/s over ``--steps`` timed AdamW steps after ``--warmup`` steps) of
  full fine-tuning and of frozen-backbone adapter training for each method; speedup = adapter /
  full fine-tuning; peak memory on CUDA;
* inference latency (median ms per batch) of the bare model, an active unmerged adapter and a
  merged LoRA; overhead = adapter / bare - 1;
* adapter file size (``adapter.safetensors``) against the raw bytes of the adapter's parameters.

The model is ``AutoModelForSequenceClassification`` built from a config (no download): its
backbone plus a linear classifier on the first token (BERT, via the pooler) or the last token
(Llama); the loss is cross-entropy on random labels; inputs are random token ids.

Examples::

    .venv/bin/python scripts/bench.py                                  # CPU, MiniLM shape, 16 x 128
    .venv/bin/python scripts/bench.py --threads 2 --out bench.json
    python scripts/bench.py --device cuda --bf16 --model bert-base-shape --batch 32
    python scripts/bench.py --device cuda --bf16 --model llama-1b-shape --batch 8 --seq 512
    PYTHONPATH=. /tmp/benchvenv/bin/python scripts/bench.py --peft     # also PEFT's twin of each method
    .venv/bin/python scripts/bench.py --skip train,infer --loop lora    # train()'s loop against the bare step

``--peft`` needs ``peft`` importable; it is not a dependency of adaptercli, so use a throw-away
virtual environment (see ``scripts/README.md``). ``scripts/bench_gpu.sh`` runs the GPU settings.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

import adaptercli

CORE = ["lora", "seq_bn", "seq_bn_inv", "double_seq_bn", "par_bn", "ia3", "prefix_tuning"]
BREADTH = ["scaled_par_bn", "double_seq_bn_inv", "compacter", "compacter++", "dora", "vera", "dvora",
           "prefix_tuning_flat", "prompt_tuning", "loreft", "noreft", "direft", "mam", "unipelt"]
METHODS = CORE + BREADTH
GROUPS = {"core": CORE, "breadth": BREADTH, "all": METHODS}

SHAPES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "minilm-shape": lambda: BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                       intermediate_size=1536, num_labels=2),
    "bert-base-shape": lambda: BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072, num_labels=2),
    "llama-1b-shape": lambda: LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                          num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                                          vocab_size=128256, max_position_embeddings=4096, num_labels=2,
                                          pad_token_id=0),
    # Tiny shapes of the two, for checking that the script runs (scripts/bench_gpu.sh --dry-run, tests).
    "tiny-bert-shape": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, num_labels=2),
    "tiny-llama-shape": lambda: LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                            vocab_size=1000, max_position_embeddings=256, num_labels=2,
                                            pad_token_id=0),
}

# Our methods that PEFT has too. ``--peft`` times PEFT's version of each (setting ``peft_<method>``)
# built from our method's defaults: the same target modules (read off our adapted model), rank,
# scaling, prefix / prompt length and MLP width.
PEFT_TWINS = ("lora", "dora", "ia3", "vera", "prefix_tuning", "prompt_tuning")
# Twins that leave the model's output unchanged at initialisation (LoRA's and VeRA's B part is zero,
# DoRA's magnitude is the weight's norm, IA3's scales are ones): their first loss must equal ours.
SAME_START = ("lora", "dora", "ia3", "vera")
# Where the trainable parameter counts cannot match, and why (printed beside the mismatch).
PARAM_MISMATCH_WHY = {
    "vera": "ours is AdapterHub's VeRA: it trains a [out, out] vera_B and a [r, r] vera_D per layer; "
            "PEFT's trains the vectors lambda_b [out] and lambda_d [r]",
    "prefix_tuning": "on a model with fewer key/value heads than query heads, PEFT's prefix embedding and its "
                     "MLP's input are as wide as the keys (its token_dim), ours (AdapterHub's) as the hidden size",
}
# Minimum ours / PEFT throughput in the same run (issue 21: DoRA >= 1.1, the others >= 1.0).
PEFT_RATIO_TARGET = {"dora": 1.1}

# Minimum speedups over full fine-tuning from anchors.md, by device (and model on CUDA).
def speedup_target(device: str, model: str, method: str) -> float | None:
    if device == "cpu":
        return 1.25
    return {"bert-base-shape": 1.3, "llama-1b-shape": 1.5}.get(model)


# Minimum share of the `ideal` bound (the frozen backbone with no adapter), from anchors.md.
def ideal_target(method: str) -> float:
    return 0.95 if method in ("lora", "seq_bn") else 0.90


# -- helpers -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args: argparse.Namespace, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def make_batch(config, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    # Ids from 1 up: 0 is Llama's pad id here, and the classifier reads the last non-pad token.
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, config.num_labels, (args.batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


# -- the model under each setting ----------------------------------------------------------------
def build(base: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """A fresh copy of ``base`` on ``device`` set up for ``setting``: "full" (everything trains),
    "bare" (no adapters, eval), an adaptercli method name, "<method>+merged", "<method>+compiled", or
    "peft_<method>" (PEFT's version of one of ``PEFT_TWINS``)."""
    model = copy.deepcopy(base).to(device)
    if setting in ("full", "bare"):
        return model
    if setting == "ideal":
        return ideal(model)
    if setting.startswith("peft_"):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(base, setting.removeprefix("peft_")))
    merged, compiled = setting.endswith("+merged"), setting.endswith("+compiled")
    method = setting.removesuffix("+merged").removesuffix("+compiled")  # not split on "+": compacter++ is a method
    adaptercli.init(model)
    name = method.replace("+", "p")  # adapter names are identifiers: compacter++ -> compacterpp
    model.add_adapter(name, method)
    model.train_adapter(name)
    if merged:
        model.merge_adapter(name)
    return torch.compile(model) if compiled else model  # what train.compile: true does


def peft_config(base: nn.Module, method: str):
    """PEFT's config for our ``method`` with its default config: LoRA, DoRA, IA3 and VeRA on the
    modules our adapter wraps (found by adding ours to a copy of ``base`` on the meta device),
    prefix and prompt tuning with our lengths and widths. The task type makes PEFT train the
    classifier, as our settings do."""
    import peft

    from adaptercli.methods import METHODS as REGISTRY

    config = REGISTRY[method].make_config()
    common = {"task_type": "SEQ_CLS"}
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=config.prefix_length, prefix_projection=True,
                                       encoder_hidden_size=config.bottleneck_size, **common)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=config.prompt_length, prompt_tuning_init="RANDOM", **common)
    with torch.device("meta"):
        skeleton = type(base)(base.config)
    adaptercli.init(skeleton)
    try:
        skeleton.add_adapter("twin", method)
    except Exception as error:
        raise ValueError(f"no twin: our {method} does not apply to this model ({error})") from error
    targets = sorted(name for name, module in skeleton.named_modules()
                     if isinstance(getattr(module, "loras", None), nn.ModuleDict) and "twin" in module.loras)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               use_dora=config.use_dora, target_modules=targets, **common)
    if method == "ia3":  # ours scales each target's output: PEFT's non-feed-forward IA3
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], **common)
    if method == "vera":
        return peft.VeraConfig(r=config.r, d_initial=config.vera_d, vera_dropout=config.dropout,
                               target_modules=targets, **common)
    raise ValueError(f"PEFT has no twin of {method!r} here; twins: {', '.join(PEFT_TWINS)}")


def ideal(model: nn.Module) -> nn.Module:
    """The bound no frozen-backbone method can beat: the backbone frozen, no adapter at all, and the
    gradient still carried back through every layer to the embedding output (as any adapter in
    layer 0 needs); only the task head trains, as it does beside every adapter."""
    head = model.classifier if hasattr(model, "classifier") else model.score
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():  # something for the optimizer; the classifier is a few hundred weights
        p.requires_grad_(True)
    embeddings = getattr(model.base_model, "embeddings", None) or model.base_model.embed_tokens
    embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    return model


class Trainer:
    """One setting's model and AdamW optimizer, and the wall time of each training step."""

    def __init__(self, model: nn.Module, batch: dict, args: argparse.Namespace, device: torch.device):
        self.model, self.batch, self.args, self.device = model.train(), batch, args, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.step_s: list[float] = []
        self.loss = float("nan")
        self.init_loss = self.eval_loss()

    def eval_loss(self) -> float:
        """The loss on the batch in eval mode (no dropout), before any step: settings that start
        from the same function (an adapter that is the identity at initialisation) agree on it."""
        self.model.eval()
        with torch.no_grad(), autocast(self.args, self.device):
            loss = float(self.model(**self.batch).loss)
        self.model.train()
        return loss

    def step(self, timed: bool) -> None:
        t0 = time.perf_counter()
        with autocast(self.args, self.device):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            sync(self.device)  # only in the interleaved schedule (CPU), where it costs nothing
            self.step_s.append(time.perf_counter() - t0)
        self.loss = float(loss.detach())

    def result(self, elapsed: float | None = None) -> dict[str, Any]:
        """Throughput from the fastest (``--stat min``) or median timed step (interleaved), or
        from ``elapsed`` (sequential)."""
        if elapsed is None:
            step = min(self.step_s) if self.args.stat == "min" else statistics.median(self.step_s)
        else:
            step = elapsed / self.args.steps
        out = {"samples_per_s": self.args.batch / step, "step_ms": 1000 * step,
               "trainable_params": count(self.params), "loss": self.loss, "init_loss": self.init_loss}
        if self.step_s:
            out["min_step_ms"] = 1000 * min(self.step_s)
            out["median_step_ms"] = 1000 * statistics.median(self.step_s)
            out["timed_step_ms"] = [round(1000 * s, 1) for s in self.step_s]
        return out


def train_sequential(trainer: Trainer) -> dict[str, Any]:
    """``--warmup`` then ``--steps`` steps timed as a whole (no sync between steps, so on CUDA
    the host can run ahead of the device as it does in real training)."""
    for _ in range(trainer.args.warmup):
        trainer.step(timed=False)
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(trainer.args.steps):
        trainer.step(timed=False)
    sync(trainer.device)
    result = trainer.result(time.perf_counter() - start)
    result["peak_gib"] = peak_gib(trainer.device)
    return result


def adapter_file(model: nn.Module, method: str) -> dict[str, int]:
    name = method.replace("+", "p")
    state = model.adapter_state
    params = {id(p): p for p in state.adapter_parameters(name).values()}.values()
    raw = sum(p.numel() * p.element_size() for p in params)
    with tempfile.TemporaryDirectory() as folder:
        model.save_adapter(folder, name, with_head=False)
        size = (Path(folder) / "adapter.safetensors").stat().st_size
    return {"params": count(params), "raw_bytes": raw, "file_bytes": size, "overhead_bytes": size - raw}


def run_training(base: nn.Module, batch: dict, settings: list[str], args, device) -> tuple[dict, dict]:
    """Train every setting; returns (results by setting, adapter file sizes by method).

    ``interleaved`` (default on CPU): all settings live at once and take one step in turn, and each
    setting's throughput comes from its fastest (or median, ``--stat``) step, so load from other
    processes on a shared machine hits every setting alike. ``sequential`` (default on CUDA): one setting at a time,
    timed over all its steps, with its own peak memory; ``--repeats`` runs and the best counts.
    """
    files: dict[str, dict] = {}
    results: dict[str, dict] = {}

    def make(setting: str) -> Trainer | None:
        try:
            trainer = Trainer(build(base, setting, device), batch, args, device)
            if setting in METHODS:
                files[setting] = adapter_file(trainer.model, setting)
            return trainer
        except Exception as error:  # one broken method must not hide the others' numbers
            results[setting] = {"error": f"{type(error).__name__}: {error}"}
            return None

    def guarded(setting: str, action: Callable[..., Any], *action_args: Any) -> bool:
        try:
            action(*action_args)
            return True
        except Exception as error:
            results[setting] = {"error": f"{type(error).__name__}: {error}"}
            return False

    if args.schedule == "interleaved":
        trainers = {s: t for s in settings if (t := make(s)) is not None}
        for i in range(args.warmup + args.steps):
            for setting in list(trainers):
                if not guarded(setting, trainers[setting].step, i >= args.warmup):
                    del trainers[setting]
            print(f"  step {i + 1}/{args.warmup + args.steps} ({'timed' if i >= args.warmup else 'warmup'})",
                  file=sys.stderr, flush=True)
        results.update({s: {**t.result(), "peak_gib": None} for s, t in trainers.items()})
    else:
        for setting in settings:
            runs = []
            for _ in range(args.repeats):
                free(device)
                trainer = make(setting)
                if trainer is None or not guarded(setting, lambda t, out: out.append(train_sequential(t)), trainer, runs):
                    break
                del trainer
            if runs:
                best = max(runs, key=lambda r: r["samples_per_s"])
                results[setting] = {**best, "runs_samples_per_s": [round(r["samples_per_s"], 3) for r in runs]}
            r = results[setting]
            print(f"  train {setting:<14} " + (f"{r['samples_per_s']:8.2f} samples/s" if "error" not in r else r["error"]),
                  file=sys.stderr, flush=True)
    return {s: results[s] for s in settings if s in results}, files


def run_inference(base: nn.Module, batch: dict, settings: list[str], args, device) -> dict:
    """Median latency per forward pass; the settings take turns (``--rounds`` rounds of
    ``--infer-iters`` passes each) so that drift in machine speed hits them all alike."""
    free(device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    models = {}
    for setting in settings:
        try:
            models[setting] = build(base, setting, device).eval()
        except Exception as error:
            models[setting] = f"{type(error).__name__}: {error}"
    times: dict[str, list[float]] = {s: [] for s in settings}

    def forward(model):
        with torch.inference_mode(), autocast(args, device):
            model(**inputs)

    for model in models.values():
        if not isinstance(model, str):
            for _ in range(args.warmup):
                forward(model)
    for _ in range(args.rounds):
        for setting, model in models.items():
            if isinstance(model, str):
                continue
            for _ in range(args.infer_iters):
                sync(device)
                t0 = time.perf_counter()
                forward(model)
                sync(device)
                times[setting].append(time.perf_counter() - t0)
    results = {}
    for setting, model in models.items():
        if isinstance(model, str):
            results[setting] = {"error": model}
        else:
            results[setting] = {"median_ms": 1000 * statistics.median(times[setting]),
                                "min_ms": 1000 * min(times[setting]), "n": len(times[setting])}
    bare = results.get("bare", {}).get("median_ms")
    for result in results.values():
        if bare and "median_ms" in result:
            result["overhead_pct"] = 100 * (result["median_ms"] / bare - 1)
    return results


def run_profile(base: nn.Module, batch: dict, setting: str, args, device) -> None:
    """Print torch.profiler's top operators for ``--steps`` training steps of one setting."""
    from torch.profiler import ProfilerActivity, profile

    free(device)
    model = build(base, setting, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with autocast(args, device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {setting} ({args.steps} steps)\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


# -- report ------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _against(value: float | None, target: float | None, spec: str, scale: float) -> str:
    """``1.42 ✓ (1.25)``: a value, whether it meets its target, and the target."""
    if value is None:
        return "—"
    text = format(scale * value, spec)
    return text if target is None else f"{text} {'✓' if value >= target else '✗'} ({format(scale * target, spec)})"


def markdown(report: dict) -> str:
    args, lines = report["args"], []
    m = report["machine"]
    lines.append(f"**{args['model']}**, batch {args['batch']} × {args['seq']}, {m['device_name']}, "
                 f"{m['torch_threads']} threads, {'bf16 autocast' if args['bf16'] else 'fp32'}, "
                 f"{args['warmup']} warmup + {args['steps']} timed steps ({args['schedule']}" + (f", best of {args['repeats']}" if args['schedule'] == 'sequential' else f", {args['stat']} step") + f"); torch {m['torch']}, "
                 f"transformers {m['transformers']}" + (f", peft {m['peft']}" if m.get("peft") else ""))
    training = report["training"]
    full = training.get("full", {}).get("samples_per_s")
    if training:
        lines += ["", "| training | trainable params | samples/s | step ms | × full FT (target) | % of ideal (target) | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for setting, r in training.items():
            if "error" in r:
                lines.append(f"| {setting} | error: {r['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {setting} | {r['trainable_params']:,} | {r['samples_per_s']:.2f} | {r['step_ms']:.0f} | "
                         f"{_against(r.get('speedup'), r.get('target'), '.2f', 1)} | "
                         f"{_against(r.get('of_ideal'), r.get('ideal_target'), '.1f', 100)} | {fmt(r['peak_gib'], '.2f')} |")
        if full is None:
            lines.append("(no full fine-tuning number: speedups not computed)")
        lines.append("\n`ideal`: the frozen backbone with no adapter, its gradient carried back to the embedding output "
                     "(only the task head trains) — the bound for any frozen-backbone method. A method whose lowest "
                     "adapter sits above the embeddings (seq_bn's first adapter is after layer 0's feed-forward block) "
                     "can come out slightly above 100%: its backward pass stops there.")
    twins = {s.removeprefix("peft_"): r for s, r in training.items() if s.startswith("peft_") and "ours_vs_peft" in r}
    if twins:
        lines += ["", "| ours vs PEFT | trainable params ours / PEFT | first loss ours / PEFT | ours / PEFT throughput (target) |",
                  "|---|---:|---:|---:|"]
        for method, r in twins.items():
            params = f"{r['ours_params']:,} / {r['trainable_params']:,} {'✓' if r['params_match'] else '✗ differ'}"
            start = {True: " ✓ same", False: " ✗ differ", None: ""}[r.get("same_start")]
            lines.append(f"| {method} | {params} | {r['ours_init_loss']:.4f} / {r['init_loss']:.4f}{start} | "
                         f"{_against(r['ours_vs_peft'], r['ours_vs_peft_target'], '.2f', 1)} |")
        lines += [f"\n{m}: parameter counts differ: {r['params_mismatch_why']}." for m, r in twins.items()
                  if "params_mismatch_why" in r]
    inference = report["inference"]
    if inference:
        lines += ["", "| inference | median ms/batch | min ms | overhead vs bare |", "|---|---:|---:|---:|"]
        for setting, r in inference.items():
            if "error" in r:
                lines.append(f"| {setting} | error: {r['error'][:80]} | | |")
                continue
            lines.append(f"| {setting} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {fmt(r.get('overhead_pct'), '+.1f')}% |")
    if report.get("loop"):
        import bench_loop

        lines += ["", bench_loop.markdown(report["loop"])]
    files = report["files"]
    if files:
        lines += ["", "| adapter file | params | raw bytes | adapter.safetensors | overhead |", "|---|---:|---:|---:|---:|"]
        for method, r in files.items():
            lines.append(f"| {method} | {r['params']:,} | {r['raw_bytes']:,} | {r['file_bytes']:,} | "
                         f"+{r['overhead_bytes']:,} B ({100 * r['overhead_bytes'] / r['raw_bytes']:.1f}%) |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "adaptercli": adaptercli.__version__, "device": str(device),
            "device_name": cpu_name()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def peft_twins(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """The methods whose PEFT twin this run times: ``--peft-methods``, or every method of the run that
    PEFT has too."""
    if not args.peft:
        return []
    if args.peft_methods is None:
        return [m for m in PEFT_TWINS if m in methods]
    chosen = [m for m in args.peft_methods.split(",") if m]
    unknown = [m for m in chosen if m not in PEFT_TWINS]
    if unknown:
        raise SystemExit(f"--peft-methods: no PEFT twin for {', '.join(unknown)} (twins: {', '.join(PEFT_TWINS)})")
    return chosen


def compare_twins(training: dict[str, dict], twins: list[str], tolerance: float) -> None:
    """Add to each ``peft_<method>`` row our throughput over PEFT's, both trainable parameter counts
    and whether they match, and both first losses (eval mode, before any step) and whether they
    agree where both adapters start as the identity. Mismatches are printed, not hidden."""
    for method in twins:
        theirs, ours = training.get(f"peft_{method}", {}), training.get(method, {})
        if "samples_per_s" not in theirs or "samples_per_s" not in ours:
            continue
        theirs["ours_vs_peft"] = ours["samples_per_s"] / theirs["samples_per_s"]
        theirs["ours_vs_peft_target"] = PEFT_RATIO_TARGET.get(method, 1.0)
        theirs["ours_params"] = ours["trainable_params"]
        theirs["params_match"] = ours["trainable_params"] == theirs["trainable_params"]
        theirs["ours_init_loss"] = ours["init_loss"]
        theirs["init_loss_diff"] = abs(ours["init_loss"] - theirs["init_loss"])
        if method in SAME_START:
            theirs["same_start"] = theirs["init_loss_diff"] <= tolerance * max(1.0, abs(ours["init_loss"]))
        if not theirs["params_match"]:
            why = PARAM_MISMATCH_WHY.get(method, "not expected: check the twin's config")
            theirs["params_mismatch_why"] = why
            print(f"warning: {method}: {ours['trainable_params']:,} trainable parameters, PEFT's "
                  f"{theirs['trainable_params']:,} ({why})", file=sys.stderr)
        if theirs.get("same_start") is False:
            print(f"warning: {method}: first loss {ours['init_loss']:.6f}, PEFT's {theirs['init_loss']:.6f}: "
                  "both should be the bare model's", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SHAPES), default="minilm-shape")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (and forward passes) first")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    parser.add_argument("--schedule", choices=["interleaved", "sequential"], default=None,
                        help="training: settings take turns step by step (default on CPU) or run one after "
                             "another with their own peak memory (default on CUDA)")
    parser.add_argument("--stat", choices=["min", "median"], default="min",
                        help="interleaved schedule: a setting's step time is its fastest or its median timed step "
                             "(min: other load on the machine only ever slows a step down)")
    parser.add_argument("--repeats", type=int, default=1, help="sequential schedule: runs per setting, best counts")
    parser.add_argument("--rounds", type=int, default=4, help="inference: rounds the settings take in turn")
    parser.add_argument("--infer-iters", type=int, default=3, help="inference: timed passes per setting per round")
    parser.add_argument("--methods", default="all", help="comma-separated adapter methods to train, or a group: "
                                                          "core (the seven core methods), breadth, all")
    parser.add_argument("--infer-methods", default="lora,seq_bn", help="active unmerged adapters to time at inference")
    parser.add_argument("--compile", default="", help="comma-separated methods also trained through torch.compile "
                                                      "(settings <method>+compiled; the warmup steps compile)")
    parser.add_argument("--peft", action="store_true", help="also time PEFT's version of each method that PEFT has "
                                                               "too (needs peft importable; see --peft-methods)")
    parser.add_argument("--peft-methods", default=None, help="comma-separated methods whose PEFT twin --peft times "
                                                             f"(default: those of {', '.join(PEFT_TWINS)} in --methods)")
    parser.add_argument("--loop", default="", help="comma-separated methods to train with the real train() loop "
                                                   "(fixed-length batches) against the bare step of the same model; "
                                                   "BERT shapes; see scripts/bench_loop.py")
    parser.add_argument("--loop-eval-samples", type=int, default=64, help="--loop: validation set size (each "
                                                                           "evaluation is timed on its own)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train, infer")
    parser.add_argument("--profile", default="", help="comma-separated settings to profile (e.g. full,seq_bn) "
                                                      "after the benchmark; prints torch.profiler tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    if args.peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("--peft: peft is not importable in this environment (see scripts/README.md)")
    args.schedule = args.schedule or ("sequential" if device.type == "cuda" else "interleaved")
    skip = set(filter(None, args.skip.split(",")))
    methods = [m for part in args.methods.split(",") if part for m in GROUPS.get(part, [part])]

    torch.manual_seed(args.seed)
    config = SHAPES[args.model]()
    if config.model_type == "bert" and args.seq > config.max_position_embeddings:
        parser.error(f"--seq {args.seq} exceeds BERT's {config.max_position_embeddings} positions")
    base = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")  # stays on CPU
    batch = make_batch(config, args, device)
    print(f"{args.model}: {count(base.parameters()):,} parameters; device {device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > cores - torch.get_num_threads() + 0.5:
        # Threads that share cores with other work wait on each other at every parallel op: such
        # runs are several times slower and far noisier (seen: full fine-tuning 8.6 s/step instead
        # of 1.2 s with 2 threads and one other busy process on 2 cores).
        print(f"warning: load average {load:.1f} on {cores} cores; other processes compete with the "
              f"{torch.get_num_threads()} benchmark threads. Numbers will be noisy; try --threads "
              f"{max(1, cores - round(load))}.", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"args": vars(args), "machine": machine_info(device), "training": {},
                              "inference": {}, "files": {}, "ours_vs_peft": None, "loop": {}}
    started = time.perf_counter()
    if "train" not in skip:
        settings = ["full", "ideal", *methods] + [f"{m}+compiled" for m in args.compile.split(",") if m]
        twins = peft_twins(args, methods)
        settings += [f"peft_{m}" for m in twins]
        report["training"], report["files"] = run_training(base, batch, settings, args, device)
        full = report["training"].get("full", {}).get("samples_per_s")
        bound = report["training"].get("ideal", {}).get("samples_per_s")
        for setting, r in report["training"].items():
            if full and "samples_per_s" in r and setting != "full":
                r["speedup"] = r["samples_per_s"] / full
                r["target"] = speedup_target(device.type, args.model, setting) if setting in METHODS else None
            if bound and "samples_per_s" in r and setting not in ("full", "ideal"):
                r["of_ideal"] = r["samples_per_s"] / bound
                r["ideal_target"] = ideal_target(setting) if setting in METHODS else None
        compare_twins(report["training"], twins, tolerance=2e-2 if args.bf16 else 1e-4)
        report["ours_vs_peft"] = report["training"].get("peft_lora", {}).get("ours_vs_peft")
    if "infer" not in skip:
        infer = ["bare", *[m for m in args.infer_methods.split(",") if m], "lora+merged"]
        infer += ["peft_lora"] if args.peft else []
        report["inference"] = run_inference(base, batch, infer, args, device)
    if args.loop:
        import bench_loop  # beside this file

        stat = min if args.stat == "min" else statistics.median
        for method in filter(None, args.loop.split(",")):
            try:
                report["loop"][method] = bench_loop.run_loop(method, config, args, stat)
            except Exception as error:  # one broken method must not hide the others' numbers
                report["loop"][method] = {"error": f"{type(error).__name__}: {error}"}
    report["seconds"] = time.perf_counter() - started
    report["machine"]["loadavg_start_end"] = [round(load, 2), round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None]

    print(markdown(report))
    print(f"\n({report['seconds']:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    for setting in filter(None, args.profile.split(",")):
        run_profile(base, batch, setting, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
