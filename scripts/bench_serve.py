"""Benchmark `adapter serve`'s mixed batches: eight adapters of mixed families on the MiniLM shape.

Two measurements, on one machine, in one run:

1. **Throughput** (texts/s, median over ``--repeats`` timed passes after one warm-up, the ways
   taking turns) of the same batch of ``--batch`` texts run three ways: *mixed* (each row its own
   adapter, one forward pass through ``adapter_names``), *one adapter* (every row through one
   active adapter, a plain forward pass: what a server of that one adapter runs; each of the eight
   in turn, their mean time) and *alone* (each request of ``--texts-per-request`` texts as its own
   forward pass, through its adapter).
   Targets (issue 19): mixed >= 0.9x one adapter and >= 3x alone.
2. **Latency** through the real server (uvicorn on 127.0.0.1, the batcher, HTTP): an open-loop
   client sends requests at ``--rate`` per second (Poisson arrivals) for ``--duration`` seconds,
   each to a random adapter; p50 and p99 latency, and how many were refused (503).

3. **Generation** (``--generate``): prompts continued together (``inference.answer_rows``, what the
   server runs for generate requests that arrive together; each prompt its own causal-LM adapter)
   against each prompt continued alone (``inference.answer``, what the server ran before), on
   SmolLM2-135M-Instruct (installed offline as a GGUF file) with four adapters of mixed families;
   greedy, no stop token, so every prompt writes exactly ``--new-tokens`` tokens.

The adapters are the real MiniLM (``minilm``, installed offline) with random, perturbed adapters
and two-label heads, saved to a temporary folder and served from there. ``--tiny`` runs a 2-layer,
32-wide BERT instead: for checking that the script runs, not for numbers.

Examples::

    .venv/bin/python scripts/bench_serve.py --out bench_serve.json
    .venv/bin/python scripts/bench_serve.py --tiny --repeats 2 --duration 2 --rate 20   # a smoke run
    .venv/bin/python scripts/bench_serve.py --skip-latency --generate --out bench_generate.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import adaptercli
from adaptercli.assets import resolve_model_path

# Eight adapters of mixed families that share a batch (prompt tuning and ReFT run in their own).
ADAPTERS = {"lora": "lora", "dora": "dora", "ia3": "ia3", "seq_bn": "seq_bn", "par_bn": "par_bn",
            "compacter": "compacter[reduction_factor=8]", "prefix": "prefix_tuning", "mam": "mam"}
WORDS = ("the movie was great and the acting superb but the plot dragged in the middle while the music "
         "carried every scene to a surprising end that nobody in the audience expected at all").split()


def base_model(tiny: bool, folder: Path) -> str:
    """The base model's folder: MiniLM, or a tiny random BERT with MiniLM's tokenizer."""
    minilm = Path(resolve_model_path("minilm"))
    if not tiny:
        return str(minilm)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    return str(folder)


def _add_moved(model: adaptercli.AdapterModel, name: str, method: str, seed: int) -> None:
    """Add adapter ``name`` and move its weights off their start (a trained adapter's are)."""
    model.add_adapter(name, method)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state.adapter_parameters(name).values():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))


def adapters_model(base: str) -> adaptercli.AdapterModel:
    """The base model with the eight adapters, each moved off its start, and a head each."""
    model = adaptercli.AutoAdapterModel.from_pretrained(base)
    for i, (name, method) in enumerate(ADAPTERS.items()):
        _add_moved(model, name, method, seed=i)
        model.add_classification_head(name, num_labels=2, id2label={0: "neg", 1: "pos"})
    return model.eval()


def texts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(count)]


def _interleaved_medians(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns (one warm-up pass each first), so that
    other load on the machine falls on all of them alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def throughput(model, tokenizer, batch: int, words: int, per_request: int, repeats: int) -> dict[str, Any]:
    """Texts per second of the same batch: mixed adapters in one pass; through one adapter (each
    of the eight in turn, every row through it: what a server of that one adapter runs); and each
    request alone, through its adapter."""
    sample = texts(batch, words, seed=1)
    names = [list(ADAPTERS)[(i // per_request) % len(ADAPTERS)] for i in range(batch)]
    random.Random(2).shuffle(names)
    enc = tokenizer(sample, padding=True, truncation=True, max_length=128, return_tensors="pt")
    requests = [(sample[i:i + per_request], names[i]) for i in range(0, batch, per_request)]
    encoded = [(tokenizer(t, padding=True, return_tensors="pt"), n) for t, n in requests]

    def one(name: str):
        def run():
            model.set_active_adapters(name)
            model(**enc)
        return run

    def alone():
        for request, name in encoded:
            model(**request, adapter_names=[name] * request["input_ids"].shape[0])

    runs = {"mixed": lambda: model(**enc, adapter_names=names), **{f"one:{n}": one(n) for n in ADAPTERS}, "alone": alone}
    with torch.no_grad():
        seconds = _interleaved_medians(runs, repeats)
    one_adapter = statistics.mean(seconds[f"one:{n}"] for n in ADAPTERS)
    return {"mixed_texts_per_s": batch / seconds["mixed"], "one_adapter_texts_per_s": batch / one_adapter,
            "alone_texts_per_s": batch / seconds["alone"],
            "one_adapter_texts_per_s_each": {n: batch / seconds[f"one:{n}"] for n in ADAPTERS},
            "mixed_vs_one_adapter": one_adapter / seconds["mixed"], "mixed_vs_alone": seconds["alone"] / seconds["mixed"],
            "tokens_per_text": int(enc["input_ids"].shape[1])}


GENERATE_ADAPTERS = {"lora": "lora", "seq_bn": "seq_bn", "prefix": "prefix_tuning[prefix_length=10]", "ia3": "ia3"}


def generate_throughput(tiny: bool, folder: Path, prompts: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """New tokens per second: ``prompts`` prompts (each its own adapter, in turn) continued together,
    against each continued alone."""
    from adaptercli.inference import Continuation, answer, answer_rows

    if tiny:
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        LlamaModel(LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(folder)
        path, kwargs = str(folder), {}
    else:
        path, kwargs = resolve_model_path("smollm2"), {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    model = adaptercli.AutoAdapterModel.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    for i, (name, method) in enumerate(GENERATE_ADAPTERS.items()):
        _add_moved(model, name, method, seed=i)
        model.add_causal_lm_head(name)
    model.eval()
    sample = texts(prompts, 16, seed=4)
    names = [list(GENERATE_ADAPTERS)[i % len(GENERATE_ADAPTERS)] for i in range(prompts)]

    def together() -> None:
        answer_rows(model, tokenizer, [Continuation(t, False, new_tokens, 0.0, torch.Generator(), model.setup_named(n))
                                       for t, n in zip(sample, names, strict=True)], set())

    def alone() -> None:
        for text, name in zip(sample, names, strict=True):
            with model.running(model.setup_named(name)):
                answer(model, tokenizer, text, False, set(), new_tokens, 0.0, torch.Generator())

    def uncached() -> None:  # together, every step reading each whole text again (no KV cache)
        answer_rows(model, tokenizer, [Continuation(t, False, new_tokens, 0.0, torch.Generator(), model.setup_named(n))
                                       for t, n in zip(sample, names, strict=True)], set(), cache=False)

    seconds = _interleaved_medians({"together": together, "alone": alone, "uncached": uncached}, repeats)
    tokens = prompts * new_tokens
    return {"model": "tiny" if tiny else "smollm2", "prompts": prompts, "new_tokens": new_tokens,
            "adapters": GENERATE_ADAPTERS, "together_tokens_per_s": tokens / seconds["together"],
            "alone_tokens_per_s": tokens / seconds["alone"], "together_vs_alone": seconds["alone"] / seconds["together"],
            "together_uncached_tokens_per_s": tokens / seconds["uncached"],
            "cached_vs_uncached": seconds["uncached"] / seconds["together"]}


def save_adapters(model, folder: Path) -> dict[str, str]:
    sources = {}
    for name in ADAPTERS:
        model.save_adapter(folder / name, name, with_head=True)
        sources[name] = str(folder / name)
    return sources


async def _open_loop(url: str, rate: float, duration: float, per_request: int, words: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(3)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=512)) as http:
        async def one(body: dict) -> None:
            start = time.perf_counter()
            response = await http.post("/v1/predict", json=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)

        tasks, end = [], time.perf_counter() + duration
        while time.perf_counter() < end:
            body = {"adapter": rng.choice(list(ADAPTERS)), "inputs": texts(per_request, words, rng.randint(0, 10**6))}
            tasks.append(asyncio.create_task(one(body)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    ordered = sorted(latencies) or [float("nan")]
    return {"rate_per_s": rate, "requests": len(tasks), "statuses": statuses,
            "p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def latency(base: str, sources: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """p50 / p99 latency through a real server on 127.0.0.1 at ``--rate`` requests per second."""
    import socket

    import uvicorn

    from adaptercli.serve import create_app
    from adaptercli.serving import AdapterServer, ServeSettings

    settings = ServeSettings(model=base, adapters=sources, max_batch_size=args.batch, max_wait_ms=args.max_wait_ms,
                             max_queue=4096)
    server = AdapterServer(settings)
    for name, source in sources.items():
        server.load(name, source)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = uvicorn.Server(uvicorn.Config(create_app(server, token=""), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_open_loop(url, args.rate, min(1.0, args.duration), args.texts_per_request, args.words))  # warm-up
        return asyncio.run(_open_loop(url, args.rate, args.duration, args.texts_per_request, args.words))
    finally:
        runner.should_exit = True
        thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random BERT: checks the script, no numbers")
    parser.add_argument("--batch", type=int, default=32, help="texts per batch (and the server's max batch size)")
    parser.add_argument("--words", type=int, default=24, help="the longest text, in words")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per way (the median counts)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second for the latency run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the latency run")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--generate", action="store_true", help="also time generation, batched against alone")
    parser.add_argument("--prompts", type=int, default=8, help="prompts continued together (--generate)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each prompt writes (--generate)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = base_model(args.tiny, Path(tmp) / "base")
        model = adapters_model(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        results: dict[str, Any] = {
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "setting": {k: v for k, v in vars(args).items() if k != "out"} | {"model": "tiny" if args.tiny else "minilm",
                                                                              "adapters": ADAPTERS},
            "throughput": throughput(model, tokenizer, args.batch, args.words, args.texts_per_request, args.repeats)}
        if not args.skip_latency:
            results["latency"] = latency(base, save_adapters(model, Path(tmp) / "adapters"), args)
        if args.generate:
            with torch.no_grad():
                results["generate"] = generate_throughput(args.tiny, Path(tmp) / "llama", args.prompts, args.new_tokens,
                                                          max(3, args.repeats // 4))
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
