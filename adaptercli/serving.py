"""`adapter serve`: many adapters on one frozen base model, chosen per request, over HTTP.

:class:`AdapterServer` holds the model and what it serves (run folders, adapter folders, Hub or
index ids, each under a name); :class:`Batcher` collects the requests that arrive within
``max_wait_ms`` (up to ``max_batch_size`` texts) and runs them as one mixed batch
(``AdapterModel.forward(..., adapter_names=...)``); :func:`create_app` is the FastAPI app
(predict, generate, adapters, health, metrics) and :func:`serve` starts it under uvicorn.
Predictions are computed by the code behind ``adapter predict RUN --json``, so they are the
same values. The model runs in one worker thread: batches, generation and loading take turns.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from .composition import CompositionBlock, Fuse, Stack
from .errors import AdapterCliError
from .evaluation import TextGeneration
from .formats import read_adapter
from .inference import Continuation, answer_rows, prediction, stop_tokens, tag_words
from .locate import locate
from .recipe import FULL_FINETUNING, DataSection, ModelSection, Recipe, load_recipe
from .runs import load_model, member_sources

TOKEN_ENV = "ADAPTERCLI_SERVE_TOKEN"


@dataclasses.dataclass
class ServeSettings:
    """What ``serve.yaml`` (or the command line) sets; every limit is per server."""

    model: str | None = None  # the base model; default: the first run folder's
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> source
    max_batch_size: int = 32  # texts in one forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # requests waiting; beyond it 503 with Retry-After
    timeout_s: float = 30.0  # per request, queueing included
    max_texts: int = 64  # texts per request
    max_tokens: int = 512  # tokens per text (and prompt)
    max_new_tokens: int = 256  # the most a generate request may ask for


def read_settings(path: str | Path | None, **given: Any) -> ServeSettings:
    """Settings from a ``serve.yaml`` (unknown keys and wrong types refused in one line), with the
    command line's values (``given``, None: not given) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise AdapterCliError(f"--config: file not found: {path}")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise AdapterCliError(f"{path}: expected a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise AdapterCliError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(fields)})")
    adapters = {**(data.pop("adapters", None) or {}), **(given.pop("adapters", None) or {})}
    data.update({k: v for k, v in given.items() if v is not None})
    defaults = ServeSettings()
    for key, value in data.items():
        expected = type(getattr(defaults, key)) if getattr(defaults, key) is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[key] = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) or (expected is not str and value <= 0):
            raise AdapterCliError(f"{key}: expected a positive {expected.__name__}, got {value!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()):
        raise AdapterCliError("adapters: expected a mapping of names to sources (run folders, adapter folders, ids)")
    return ServeSettings(**data, adapters=adapters)


@dataclasses.dataclass
class Served:
    """One name the server answers to: what runs for it, its head, and what it loaded."""

    name: str
    source: str
    setup: CompositionBlock
    method: str
    task: str | None
    head: str | None  # the head type; None: no head (hidden states only)
    id2label: dict[int, str]
    max_length: int
    chat: bool  # generation reads prompts as user turns (an instruction-tuned run)
    shares_batches: bool
    loaded: list[str]  # adapters it added to the model (members included)
    fusion: str | None = None
    source_prefix: str = ""  # a seq2seq run's data.source_prefix, put before each prompt

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "task": self.task, "head": self.head,
                "labels": [self.id2label[i] for i in sorted(self.id2label)] or None, "source": self.source}


class AdapterServer:
    """The model and its served adapters; every method runs in the single worker thread."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.counting_tokenizer: Any = None
        self.base: str | None = None  # the base model's folder or id, as the first source named it
        self.seq2seq = False  # an encoder-decoder with its own LM head (seq2seq runs), else heads
        self.served: dict[str, Served] = {}

    # -- loading ---------------------------------------------------------------------------------
    def open_base(self, section: ModelSection, seq2seq: bool = False) -> None:
        """Load the base model (as a run loads it: dtype, attention, quantization) and its tokenizer:
        with flexible heads, or (``seq2seq``) the encoder-decoder with its own LM head."""
        self.model, self.tokenizer = load_model(Recipe(model=section, data=DataSection(task="seq2seq")) if seq2seq
                                                else Recipe(model=section))
        self.seq2seq = seq2seq
        # Requests are counted in the event loop while the worker tokenizes batches: a fast tokenizer
        # used from two threads at once fails ("Already borrowed"), so counting gets its own copy.
        self.counting_tokenizer = copy.deepcopy(self.tokenizer)
        self.model.eval()
        self.base = section.name_or_path

    def _check_base(self, base: str | ModelSection | None, name: str, seq2seq: bool = False) -> None:
        """One base model for everything: ``model:`` of the settings, else the first source's; and
        one kind of it (seq2seq runs on the encoder-decoder with its LM head; the others with heads)."""
        section = ModelSection(name_or_path=base) if isinstance(base, str) else base
        if self.model is not None and seq2seq != self.seq2seq:
            if self.served:
                kinds = ("a seq2seq run", "seq2seq runs") if seq2seq else ("not a seq2seq run", "runs with heads")
                raise AdapterCliError(f"adapter '{name}' is {kinds[0]}, but the server runs "
                                      f"{'seq2seq runs' if self.seq2seq else 'adapters with heads'}: serve {kinds[1]} "
                                      "on a server of their own")
            self.open_base(ModelSection(name_or_path=self.base) if section is None else section, seq2seq)
        if self.model is None:
            if section is None:
                raise AdapterCliError(f"adapter '{name}': its files do not name a base model; set `model:` in serve.yaml")
            self.open_base(section, seq2seq)
        elif section is not None and _model_id(section.name_or_path) != _model_id(self.base or ""):
            raise AdapterCliError(f"adapter '{name}' needs base model {section.name_or_path}, but the server runs "
                                  f"{self.base}: all adapters must share one base model")

    def load(self, name: str, source: str) -> Served:
        """Load ``source`` (a run folder, an adapter folder, a Hub id or an index id) as ``name``."""
        if name in self.served:
            raise AdapterCliError(f"an adapter named '{name}' is already served; DELETE it first")
        if self.model is None and self.settings.model:
            self.open_base(ModelSection(name_or_path=self.settings.model))
        folder = Path(source)
        if (folder / "recipe.yaml").is_file() and (folder / "adapter").is_dir():
            served = self._load_run(name, source)
        else:
            served = self._load_adapter(name, source)
        self.served[name] = served
        return served

    def _load_run(self, name: str, source: str) -> Served:
        folder = Path(source)
        recipe = load_recipe(folder / "recipe.yaml")
        if recipe.adapter.method == FULL_FINETUNING:
            raise AdapterCliError(f"adapter '{name}': {source} is a full fine-tuning baseline; `adapter serve` serves "
                                  "adapter runs")
        seq2seq = recipe.data.task == "seq2seq"
        self._check_base(recipe.model, name, seq2seq)
        model, state = self.model, self.model.adapter_state
        members: list[str] = []
        try:
            comp = recipe.composition  # an averaged run's adapter is the average: no members to run
            for found, member in member_sources(model, recipe) if comp is not None and comp.type in ("stack", "fuse") else []:
                if member in state.adapters:
                    raise AdapterCliError(f"adapter '{name}': its member '{member}' clashes with an adapter already "
                                          "loaded; serve one of them only")
                members.append(model.load_adapter(found, load_as=member, with_head=False))
            if recipe.composition is not None and recipe.composition.type == "fuse":
                model.load_adapter_fusion(folder / "adapter", load_as=name, with_head=True)
                setup: CompositionBlock = Fuse(*members, name=name)
            else:
                model.load_adapter(folder / "adapter", load_as=name, with_head=not seq2seq)
                setup = Stack(*members, name)
        except Exception:
            self._remove(members + [name], name)
            raise
        fusion = name if isinstance(setup, Fuse) else None
        served = self._served(name, source, setup, members + ([] if fusion else [name]), fusion,
                              task=recipe.data.task, max_length=recipe.train.max_seq_length,
                              chat=recipe.data.task == "instruct")
        if seq2seq:
            served.head, served.source_prefix = "seq2seq", recipe.data.source_prefix
        return served

    def _load_adapter(self, name: str, source: str) -> Served:
        state = self.model.adapter_state if self.model is not None else None
        found = locate(source) if state is None else locate(source, model_type=state.model_type,
                                                             hidden_size=state.hidden_size)
        self._check_base(read_adapter(found, with_head=False).model_name, name)
        self.model.load_adapter(found, load_as=name, with_head=True)
        return self._served(name, source, Stack(name), [name], None, task=None,
                            max_length=self.settings.max_tokens, chat=False)

    def _served(self, name: str, source: str, setup: CompositionBlock, loaded: list[str], fusion: str | None, *,
                task: str | None, max_length: int, chat: bool) -> Served:
        model = self.model
        heads = getattr(model, "heads", {})  # an encoder-decoder keeps its own LM head
        head = heads[name].config if name in heads else None
        method = "fusion" if fusion else model.adapter_state.adapters[name].method
        return Served(name, source, setup, method, task, head.head_type if head else None,
                      dict(head.id2label or {}) if head else {}, min(max_length, self.settings.max_tokens), chat,
                      model.shares_batches(setup), loaded, fusion)

    def unload(self, name: str) -> None:
        served = self.served.pop(name)
        self._remove(served.loaded, served.fusion)

    def _remove(self, adapters: list[str], fusion: str | None) -> None:
        state = self.model.adapter_state
        if fusion and fusion in state.fusions:
            self.model.delete_adapter_fusion(fusion)
        if fusion and fusion in getattr(self.model, "heads", {}):
            del self.model.heads[fusion]
        for adapter in adapters:
            if adapter in state.adapters:
                self.model.delete_adapter(adapter)

    # -- answering -------------------------------------------------------------------------------
    def count_tokens(self, text: str | list[str]) -> int:
        pair = [text] if isinstance(text, str) else list(text)
        return len(self.counting_tokenizer(*pair, truncation=False)["input_ids"])

    def predict_batch(self, jobs: list[Job]) -> None:
        """Answer each job (its ``result`` or ``error``): the jobs whose adapters share batches in
        one forward pass, each other adapter's in one of its own. A failing pass is retried job by
        job, so one bad request never fails the others."""
        self._in_parts(jobs, self._forward, "prediction")

    def _forward(self, jobs: list[Job]) -> None:
        features, setups, words = [], [], []
        for job in jobs:
            for text in job.inputs:
                if job.served.head == "tagging":  # its words, as `adapter predict` splits them
                    words.append(text.split())
                    features.append(self.tokenizer(words[-1], is_split_into_words=True, truncation=True,
                                                   max_length=job.served.max_length))
                else:
                    pair = [text] if isinstance(text, str) else list(text)
                    features.append(self.tokenizer(*pair, truncation=True, max_length=job.served.max_length))
                    words.append([])
                setups.append(job.served.setup)
        word_ids = [feature.word_ids() if row_words else None for feature, row_words in zip(features, words, strict=True)]
        batch = self.tokenizer.pad(features, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            logits = self.model(**batch, adapter_names=setups).logits
        width = batch["input_ids"].shape[1]
        row = 0
        for job in jobs:
            job.result = []
            for text in job.inputs:
                if job.served.head == "tagging":
                    ids = word_ids[row]
                    padding = [None] * (width - len(ids))
                    ids = padding + ids if self.tokenizer.padding_side == "left" else ids + padding
                    out = {"text": text, **tag_words(job.served.id2label, words[row], ids, logits[row])}
                else:
                    out = {"text": text, **prediction(job.served.head, job.served.id2label, logits[row])}
                if job.scores and job.served.head == "classification":
                    probs = torch.softmax(logits[row].float(), -1).tolist()
                    out["scores"] = {job.served.id2label.get(i, str(i)): p for i, p in enumerate(probs)}
                job.result.append(out)
                row += 1

    def generate_batch(self, jobs: list[GenerateJob]) -> None:
        """Answer each generate job (its ``result`` or ``error``): the jobs whose adapters share
        batches continued together (one forward pass per token for every row still going), each
        other adapter's together on their own; a failing batch is retried job by job (a prompt the
        adapter cannot read, e.g. chat messages without a chat template: 422)."""
        self._in_parts(jobs, self._generate, "generation", user_errors=True)

    def _in_parts(self, jobs: list, work: Callable[[list], None], what: str, user_errors: bool = False) -> None:
        """Run ``work`` on the live jobs, part by part (see ``_parts``); a part that fails is run
        again job by job, each failing job getting its own error (``user_errors``: an
        AdapterCliError is the request's fault, 422), so one bad request never fails the others."""
        live = [j for j in jobs if j.served.name in self.served and self.served[j.served.name] is j.served]
        for job in set(jobs) - set(live):
            job.error = (404, f"adapter '{job.served.name}' was unloaded")
        for part in (p for p in self._parts(live) if p):
            try:
                work(part)
            except Exception:
                for job in part:
                    try:
                        work([job])
                    except AdapterCliError as exc:
                        job.error = (422, str(exc).splitlines()[0]) if user_errors else (500, f"{what} failed: {_first_line(exc)}")
                    except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
                        job.error = (500, f"{what} failed: {_first_line(exc)}")

    def _generate(self, jobs: list[GenerateJob]) -> None:
        if self.seq2seq:
            self._write(jobs)
            return
        rows = [Continuation(job.prompt, job.served.chat or not isinstance(job.prompt, str), job.max_new_tokens,
                             job.temperature, torch.Generator().manual_seed(job.seed), job.served.setup)
                for job in jobs]
        stop = stop_tokens(self.model, self.tokenizer)
        if jobs[0].served.shares_batches:
            texts = answer_rows(self.model, self.tokenizer, rows, stop)
        else:  # a family that cannot share a batch (none of the built-in ones): one prompt at a time
            texts = [answer_rows(self.model, self.tokenizer, [row], stop)[0] for row in rows]
        for job, text in zip(jobs, texts, strict=True):
            job.result = text

    def _write(self, jobs: list[GenerateJob]) -> None:
        """Seq2seq jobs, as `adapter generate RUN` writes each prompt (after the run's source
        prefix, with the KV cache): the greedy ones in one ``generate`` call (each row its own
        adapter, cut to its own ``max_new_tokens``: a greedy text's start does not depend on how
        far it goes); each sampled one on its own, seeded as `adapter generate --seed` seeds it."""
        def encoded(part: list[GenerateJob]) -> dict[str, torch.Tensor]:
            features = [self.tokenizer(job.served.source_prefix + str(job.prompt), truncation=True,
                                       max_length=job.served.max_length) for job in part]
            return self.tokenizer.pad(features, return_tensors="pt").to(self.model.device)

        writing = TextGeneration(self.tokenizer, max(job.max_new_tokens for job in jobs))
        greedy = [job for job in jobs if job.temperature == 0]
        if greedy:
            setups = [job.served.setup for job in greedy]
            with torch.no_grad():
                ids = self.model.generate(**encoded(greedy), adapter_names=setups, do_sample=False, num_beams=1,
                                          max_new_tokens=max(job.max_new_tokens for job in greedy))
            for row, job in enumerate(greedy):  # the decoder's start token, then the new tokens
                job.result = writing.decode(ids[row : row + 1, : 1 + job.max_new_tokens])[0]
        for job in (job for job in jobs if job.temperature > 0):
            torch.manual_seed(job.seed)  # `model.generate` samples with torch's global generator
            with self.model.running(job.served.setup), torch.no_grad():
                ids = self.model.generate(**encoded([job]), do_sample=True, temperature=job.temperature,
                                          num_beams=1, max_new_tokens=job.max_new_tokens)
            job.result = writing.decode(ids)[0]

    def _parts(self, jobs: list) -> list[list]:
        """The jobs whose adapters share batches, then each other adapter's jobs on their own."""
        parts = [[j for j in jobs if j.served.shares_batches]]
        for name in dict.fromkeys(j.served.name for j in jobs if not j.served.shares_batches):
            parts.append([j for j in jobs if j.served.name == name])
        return parts


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _model_id(name: str) -> str:
    """What makes two names one base model: the last part of the folder or id, as the fusion
    check compares them (a run's ``minilm`` and an adapter's recorded folder path agree)."""
    from .assets import resolve_model_path

    return Path(resolve_model_path(name).rstrip("/")).name


@dataclasses.dataclass(eq=False)
class Job:
    """One predict request on its way through a batch."""

    served: Served
    inputs: list[str | list[str]]
    scores: bool
    future: asyncio.Future
    result: list[dict[str, Any]] | None = None
    error: tuple[int, str] | None = None


@dataclasses.dataclass(eq=False)
class GenerateJob:
    """One generate request on its way through a batch."""

    served: Served
    prompt: str | list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    seed: int
    future: asyncio.Future
    result: str | None = None
    error: tuple[int, str] | None = None

    @property
    def inputs(self) -> list[Any]:  # one row of the batch
        return [self.prompt]


class Batcher:
    """Collects requests for up to ``max_wait_ms`` (or ``max_batch_size`` rows: predict texts,
    generate prompts) and runs them as one batch in the worker thread with the server's method
    named ``work`` (``predict_batch`` or ``generate_batch``)."""

    def __init__(self, server: AdapterServer, executor: ThreadPoolExecutor, metrics: Metrics,
                 work: str = "predict_batch"):
        self.server, self.executor, self.metrics, self.work = server, executor, metrics, work
        self.settings = server.settings
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.settings.max_queue)

    def submit(self, job: Job | GenerateJob) -> None:
        """Queue a job; raises asyncio.QueueFull when the queue is full."""
        self.queue.put_nowait(job)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows, deadline = len(jobs[0].inputs), loop.time() + self.settings.max_wait_ms / 1000
            while rows < self.settings.max_batch_size and (left := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                rows += len(jobs[-1].inputs)
            jobs = [j for j in jobs if not j.future.done()]  # timed out while waiting
            if not jobs:
                continue
            self.metrics.batch(sum(len(j.inputs) for j in jobs))
            try:
                await loop.run_in_executor(self.executor, getattr(self.server, self.work), jobs)
            except Exception as exc:  # noqa: BLE001 - never let the batching loop die
                for job in jobs:
                    job.error = job.error or (500, f"failed: {_first_line(exc)}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(None)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters and histograms for ``GET /metrics`` (the Prometheus text format)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_rows = 0
        self.queue_length = lambda: 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency[_bucket(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def batch(self, rows: int) -> None:
        self.batches[_bucket(BATCH_BUCKETS, rows)] += 1
        self.batch_rows += rows

    def render(self) -> str:
        lines = ["# HELP adaptercli_requests_total HTTP requests by method, route and status.",
                 "# TYPE adaptercli_requests_total counter"]
        lines += [f'adaptercli_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                  for (m, r, s), n in sorted(self.requests.items())]
        lines += ["# HELP adaptercli_queue_length Predict and generate requests waiting for a batch.",
                  "# TYPE adaptercli_queue_length gauge", f"adaptercli_queue_length {self.queue_length()}"]
        lines += _histogram("adaptercli_request_seconds", "Request latency in seconds.", LATENCY_BUCKETS,
                            self.latency, self.latency_sum)
        lines += _histogram("adaptercli_batch_texts", "Texts per forward pass.", BATCH_BUCKETS,
                            self.batches, self.batch_rows)
        return "\n".join(lines) + "\n"


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def _histogram(name: str, text: str, bounds: tuple[float, ...], counts: list[int], total: float) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        running += count
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    return lines + [f"{name}_sum {total}", f"{name}_count {running}"]


def now() -> float:
    return time.perf_counter()
