"""Peak memory and step time of adapter training with and without gradient checkpointing.

Each setting runs in a fresh process on the same randomly initialised model (a Llama shape built
from its config, no download) with the same batch: AdamW steps on a LoRA (or any method) adapter,
loss = mean squared hidden state. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the
CPU it is the process's peak resident memory during the steps (Linux: the high-water mark is reset
through /proc/self/clear_refs just before the first) minus its resident memory at that moment, i.e.
what training adds on top of the loaded model. Step time: the median over ``--steps`` steps after
the first. Prints one JSON line per setting and the ratio.

    .venv/bin/python scripts/checkpointing_memory.py                       # CPU, 8 x 512 Llama, batch 4 x 256
    python scripts/checkpointing_memory.py --device cuda --layers 16 --hidden 2048 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModel, LlamaConfig

    import adaptercli

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1), vocab_size=32000,
                         max_position_embeddings=max(args.seq, 128))
    model = adaptercli.init(AutoModel.from_config(config, attn_implementation="sdpa")).to(args.device)
    model.add_adapter("a", args.method)
    model.train_adapter("a")
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=args.device)

    def step() -> float:
        started = time.perf_counter()
        hidden = model(input_ids=ids)[0]
        hidden.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    # From before the first step: the allocator keeps freed memory, so on the CPU only the first
    # step's activations raise the resident memory (the adapter's optimizer state is small).
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident memory (VmHWM)
        base = _rss_kib("VmRSS") * 1024
    times = [step() for _ in range(args.steps + 1)][1:]  # the first step's time has warm-up in it
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _rss_kib("VmHWM") * 1024
    return {"checkpointing": args.checkpointing, "method": args.method, "device": args.device,
            "shape": f"{args.layers} x {args.hidden}", "batch": f"{args.batch} x {args.seq}",
            "training_peak_mib": round((peak - base) / 2**20, 1), "step_s_median": round(statistics.median(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # one child's setting
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    results = []
    for checkpointing in (False, True):
        command = [sys.executable, __file__, "--child", *sys.argv[1:]] + (["--checkpointing"] if checkpointing else [])
        line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(line)
    off, on = results
    print(json.dumps({"peak_ratio_on_off": round(on["training_peak_mib"] / off["training_peak_mib"], 3),
                      "time_ratio_on_off": round(on["step_s_median"] / off["step_s_median"], 3)}))


if __name__ == "__main__":
    main()
