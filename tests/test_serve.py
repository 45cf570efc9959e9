"""`adapter serve`: predictions through the server equal `adapter predict RUN --json` for eight
runs of mixed families, prompt tuning included, mixed in one batch; a table of bad requests, each
answered with its status and one line while the server keeps answering; the queue bound (503 + Retry-After) and the timeout (504); the bearer token; and a
bounded load test against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from serve_helpers import train_runs
from test_seq2seq_task import summaries, tiny_bart_dir, tiny_t5_dir, trained  # noqa: F401 - fixtures
from typer.testing import CliRunner

from adaptercli.cli import app as cli_app
from adaptercli.errors import AdapterCliError
from adaptercli.serve import create_app
from adaptercli.serving import AdapterServer, Job, ServeSettings, read_settings

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
TEXTS = ["great movie number 7", "awful movie number 3", "a film nobody saw", "great"]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir: Path, sentiment_csv: Path) -> dict[str, Path]:
    return train_runs(tmp_path_factory.mktemp("serve-runs"), tiny_bert_dir, sentiment_csv)


@pytest.fixture(scope="module")
def offline(runs: dict[str, Path]) -> dict[str, list[dict]]:
    """What `adapter predict RUN --json` prints for TEXTS, per run."""
    printed = {}
    for name, run in runs.items():
        result = CliRunner().invoke(cli_app, ["predict", str(run), *TEXTS, "--json"], env=ENV)
        assert result.exit_code == 0, result.output
        printed[name] = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    return printed


def _server(runs: dict[str, Path], **limits) -> AdapterServer:
    server = AdapterServer(ServeSettings(adapters={n: str(r) for n, r in runs.items()}, **limits))
    for name, run in runs.items():
        server.load(name, str(run))
    return server


@pytest.fixture(scope="module")
def server(runs) -> AdapterServer:
    return _server(runs, max_texts=8, max_tokens=24)


def _same(answer: list[dict], printed: list[dict]) -> None:
    assert [a["text"] for a in answer] == [p["text"] for p in printed]
    for a, p in zip(answer, printed, strict=True):
        assert a["label"] == p["label"]
        assert a["probability"] == pytest.approx(p["probability"], abs=1e-5)


def test_one_mixed_batch_equals_predict_json_for_every_run(server, offline) -> None:
    jobs = [Job(s, TEXTS, False, None) for s in server.served.values()]  # eight adapters, one call
    server.predict_batch(jobs)
    for job in jobs:
        assert job.error is None
        _same(job.result, offline[job.served.name])
    mixing = [n for n, s in server.served.items() if s.shares_batches]
    assert mixing == list(server.served)  # every family mixes, prompt tuning included
    labels = {offline[n][0]["probability"] for n in server.served}
    assert len(labels) == len(server.served)  # the runs differ, so a mix-up would show


def test_predict_endpoint_answers_like_predict_json(server, offline) -> None:
    with TestClient(create_app(server, token="")) as client:
        for name in ("mam", "prompt_tuning"):
            answer = client.post("/v1/predict", json={"adapter": name, "inputs": TEXTS, "scores": True}).json()
            assert answer["adapter"] == name
            _same(answer["predictions"], offline[name])
            scores = answer["predictions"][0]["scores"]
            assert set(scores) == {"neg", "pos"} and sum(scores.values()) == pytest.approx(1.0)
        pair = client.post("/v1/predict", json={"adapter": "lora", "inputs": [["great movie", "number 7"]]})
        assert pair.status_code == 200 and pair.json()["predictions"][0]["label"] in ("neg", "pos")
        listed = client.get("/v1/adapters").json()["adapters"]
        assert [a["name"] for a in listed] == list(server.served)
        assert listed[0] == {"name": "lora", "method": "lora", "task": "classification", "head": "classification",
                             "labels": ["neg", "pos"], "source": str(server.served["lora"].source)}


LONG = " ".join(["word"] * 40)
# (method, path, body: JSON, raw text or None, headers, status, message)
BAD_REQUESTS = [
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["x"]}, {}, 401, "missing or wrong bearer token"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["x"]}, {"authorization": "Bearer nope"}, 401,
     "missing or wrong bearer token"),
    ("GET", "/v1/adapters", None, {"authorization": f"Basic {TOKEN}"}, 401, "missing or wrong bearer token"),
    ("POST", "/v1/predict", '{"adapter": "lora", "inputs": [', None, 422, "the request body is not valid JSON"),
    ("POST", "/v1/predict", {"inputs": ["x"]}, None, 422, "adapter: required field missing"),
    ("POST", "/v1/predict", {"adapter": "lora"}, None, 422, "inputs: required field missing"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": None}, None, 422, "inputs: Input should be a valid list"),
    ("POST", "/v1/predict", {"adapter": None, "inputs": ["x"]}, None, 422, "adapter: Input should be a valid string"),
    ("POST", "/v1/predict", {"adapter": 5, "inputs": ["x"]}, None, 422, "adapter: Input should be a valid string"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": "great"}, None, 422, "inputs: Input should be a valid list"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": []}, None, 422, "inputs: List should have at least 1 item"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": [7]}, None, 422, "inputs.0: Input should be a valid"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": [""]}, None, 422, "inputs.0: String should have at least 1"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": [["only one"]]}, None, 422, "inputs.0"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["x"], "scores": "yes"}, None, 422,
     "scores: Input should be a valid boolean"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["x"], "extra": 1}, None, 422,
     "extra: Extra inputs are not permitted"),
    ("POST", "/v1/predict", [1, 2], None, 422, "body: Input should be a valid dictionary"),
    ("POST", "/v1/predict", None, None, 422, "the request has no body: send a JSON object"),
    ("POST", "/v1/predict", '{"adapter": "lora", "inputs": ["x"]}', {"authorization": f"Bearer {TOKEN}",
     "content-type": "text/plain"}, 422, "sent as JSON with the header content-type: application/json (it was sent as text/plain)"),
    ("POST", "/v1/predict", {"adapter": "nope", "inputs": ["x"]}, None, 404,
     "no adapter named 'nope' is served (served: lora, seq_bn, prefix_tuning, ia3, mam, dora, prompt_tuning, loreft)"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["x"] * 9}, None, 413, "inputs: 9 texts, at most 8 per request"),
    ("POST", "/v1/predict", {"adapter": "lora", "inputs": ["ok", LONG]}, None, 413, "inputs.1: 42 tokens, at most 24 per text"),
    ("POST", "/v1/generate", {"adapter": "lora", "prompt": "hi"}, None, 422,
     "adapter 'lora' has a classification head: generate needs a causal-LM adapter"),
    ("POST", "/v1/generate", {"adapter": "lora", "prompt": "hi", "max_new_tokens": 0}, None, 422,
     "max_new_tokens: Input should be greater than or equal to 1"),
    ("POST", "/v1/adapters", {"name": "lora", "source": "/nowhere"}, None, 409, "an adapter named 'lora' is already served"),
    ("POST", "/v1/adapters", {"name": "new", "source": "/nowhere/at/all"}, None, 422, "cannot load '/nowhere/at/all'"),
    ("POST", "/v1/adapters", {"name": "bad name!", "source": "x"}, None, 422, "name: String should match pattern"),
    ("DELETE", "/v1/adapters/nope", None, None, 404, "no adapter named 'nope' is served"),
    ("GET", "/v1/nothing", None, None, 404, "Not Found"),
    ("GET", "/v1/predict", None, None, 405, "Method Not Allowed"),
]


def test_bad_requests_get_their_status_and_one_line(server, offline) -> None:
    good = {"authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(server, token=TOKEN)) as client:
        for method, path, body, headers, status, message in BAD_REQUESTS:
            sent = {**(good if headers is None else headers)}  # given headers replace the token
            if isinstance(body, str):
                response = client.request(method, path, content=body, headers={"content-type": "application/json", **sent})
            else:
                response = client.request(method, path, json=body, headers=sent)
            assert response.status_code == status, (path, body, response.text)
            error = response.json()["error"]
            assert message in error and "\n" not in error, (path, body, error)
            answer = client.post("/v1/predict", json={"adapter": "seq_bn", "inputs": TEXTS[:1]}, headers=good)
            assert answer.status_code == 200  # still answering, and right
            _same(answer.json()["predictions"], offline["seq_bn"][:1])
        assert client.get("/health").status_code == 200  # no token needed
        metrics = client.get("/metrics", headers=good).text
        assert 'adaptercli_requests_total{method="POST",route="/v1/predict",status="422"}' in metrics
        assert "adaptercli_batch_texts_bucket" in metrics and "adaptercli_queue_length 0" in metrics
    assert len(BAD_REQUESTS) >= 15


def test_fusion_and_stack_runs_are_served_beside_single_adapters(runs, offline, tmp_path, tiny_bert_dir,
                                                                 sentiment_csv) -> None:
    """A fuse run (its members loaded under their saved names, the fusion under the served name)
    and a stack run share one mixed batch with single adapters; each answers like `adapter predict
    RUN --json` on its own run folder."""
    from conftest import write_recipe
    from rich.console import Console

    from adaptercli.recipe import load_recipe
    from adaptercli.train import train

    second = train_runs(tmp_path / "second", tiny_bert_dir, sentiment_csv, {"seq_bn": {"reduction_factor": 8}})["seq_bn"]
    built = {}
    for kind, method, members in (("fuse", None, [runs["seq_bn"], second]), ("stack", "seq_bn", [runs["lora"]])):
        recipe = write_recipe(tmp_path / kind, tiny_bert_dir, sentiment_csv, method=method or "seq_bn",
                              name=f"{kind}_run", composition={"type": kind, "adapters": [str(m) for m in members]},
                              max_steps=2, eval_steps=2, save_steps=2, learning_rate=5e-2)
        train(load_recipe(recipe), console=Console(quiet=True))
        built[kind] = tmp_path / kind / "run"
    printed = {}
    for kind, run in built.items():
        result = CliRunner().invoke(cli_app, ["predict", str(run), *TEXTS, "--json"], env=ENV)
        assert result.exit_code == 0, result.output
        printed[kind] = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    server = _server({"fuse": built["fuse"], "stack": built["stack"], "ia3": runs["ia3"], "mam": runs["mam"]})
    assert server.served["fuse"].shares_batches and server.served["stack"].shares_batches
    jobs = [Job(s, TEXTS, False, None) for s in server.served.values()]
    server.predict_batch(jobs)  # one mixed batch: a fusion, a stack and two single adapters
    for job in jobs:
        assert job.error is None, job.error
        _same(job.result, printed.get(job.served.name) or offline[job.served.name])
    assert printed["fuse"] != printed["stack"]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_tagging_runs_tag_each_word_like_predict_json(method, runs, offline, tmp_path, tiny_bert_dir) -> None:
    """A tagging run (each word its tag, read at its first sub-token; after the prompt's positions
    for prompt tuning) is served beside a classification run in one mixed batch; both equal
    `adapter predict RUN --json`, and a text pair for the tagger is refused in one line."""
    from conftest import write_recipe
    from rich.console import Console

    from adaptercli.recipe import load_recipe
    from adaptercli.train import train

    sentences = [(["alice", "lives", "in", "paris"], ["B-PER", "O", "O", "B-LOC"]),
                 (["bob", "visited", "new", "york", "today"], ["B-PER", "O", "B-LOC", "I-LOC", "O"])]
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps({"text": w, "label": t}) + "\n" for w, t in sentences * 16))
    recipe = write_recipe(tmp_path / "tag", tiny_bert_dir, data, method=method, name="ner", data={"task": "tagging"},
                          max_steps=2, eval_steps=2, save_steps=2, learning_rate=5e-2)
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "tag" / "run"
    texts = ["alice lives in paris", "carol and bob visited new york yesterday afternoon", "unbelievably"]
    result = CliRunner().invoke(cli_app, ["predict", str(run), *texts, "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [[t["token"] for t in p["tokens"]] for p in printed] == [t.split() for t in texts]
    assert {t["tag"] for p in printed for t in p["tokens"]} <= {"O", "B-PER", "B-LOC", "I-LOC"}
    from adaptercli.runs import load_run

    _, model, tokenizer, name = load_run(run)  # by hand: each word's first sub-token
    id2label = model.heads[name].config.id2label
    for text, expected in zip(texts, printed, strict=True):
        enc = tokenizer(text.split(), is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0].float(), -1)
        ids = enc.word_ids()
        extra = 10 if method == "prompt_tuning" else 0  # the prompt's positions (its default length) first
        assert probs.shape[0] == len(ids) + extra
        firsts = [ids.index(w) + extra for w in range(len(text.split()))]
        assert len(ids) > len(firsts) + 2 or text != texts[2]  # "unbelievably" is several sub-tokens
        assert [t["tag"] for t in expected["tokens"]] == [id2label[int(probs[i].argmax())] for i in firsts]
        assert [t["probability"] for t in expected["tokens"]] == pytest.approx([float(probs[i].max()) for i in firsts], abs=1e-5)
    server = _server({"ner": run, "lora": runs["lora"]})
    jobs = [Job(server.served["ner"], texts, False, None), Job(server.served["lora"], TEXTS, False, None)]
    server.predict_batch(jobs)  # one mixed batch: tagging rows beside classification rows
    assert jobs[0].error is None and jobs[1].error is None
    _same(jobs[1].result, offline["lora"])
    for answer, expected in zip(jobs[0].result, printed, strict=True):
        assert [(t["token"], t["tag"]) for t in answer["tokens"]] == [(t["token"], t["tag"]) for t in expected["tokens"]]
        assert [t["probability"] for t in answer["tokens"]] == pytest.approx([t["probability"] for t in expected["tokens"]],
                                                                              abs=1e-5)
    with TestClient(create_app(server, token="")) as client:
        answer = client.post("/v1/predict", json={"adapter": "ner", "inputs": texts[:1]})
        served = answer.json()["predictions"][0]["tokens"]
        assert answer.status_code == 200 and [t["tag"] for t in served] == [t["tag"] for t in printed[0]["tokens"]]
        pair = client.post("/v1/predict", json={"adapter": "ner", "inputs": ["fine", ["a", "b"]]})
        assert pair.status_code == 422 and pair.json()["error"] == "inputs.1: a tagging adapter tags the words of a text, not a text pair"


def test_load_and_unload_while_serving(runs, offline) -> None:
    server = _server({"lora": runs["lora"]})
    with TestClient(create_app(server, token="")) as client:
        added = client.post("/v1/adapters", json={"name": "bn", "source": str(runs["seq_bn"] / "adapter")})
        assert added.status_code == 201 and added.json()["method"] == "seq_bn"
        answer = client.post("/v1/predict", json={"adapter": "bn", "inputs": TEXTS}).json()
        _same(answer["predictions"], offline["seq_bn"])  # an adapter folder: the same head and weights
        before = len(list(server.model.parameters()))
        assert client.delete("/v1/adapters/bn").json() == {"deleted": "bn"}
        assert len(list(server.model.parameters())) < before
        assert client.post("/v1/predict", json={"adapter": "bn", "inputs": ["x"]}).status_code == 404
        _same(client.post("/v1/predict", json={"adapter": "lora", "inputs": TEXTS}).json()["predictions"],
              offline["lora"])


def test_start_refuses_other_base_models_and_bad_settings(runs, tmp_path, tiny_llama_dir) -> None:
    server = _server({"lora": runs["lora"]})
    with pytest.raises(AdapterCliError, match="needs base model .* but the server runs .*: all adapters must share"):
        server._check_base(str(tiny_llama_dir), "other")
    config = tmp_path / "serve.yaml"
    config.write_text("port: 0\n")
    with pytest.raises(AdapterCliError, match="port: expected a positive int, got 0"):
        read_settings(config)
    config.write_text("prot: 8000\n")
    with pytest.raises(AdapterCliError, match="unknown setting"):
        read_settings(config)
    result = CliRunner().invoke(cli_app, ["serve", "--adapter", "nosource"], env=ENV)
    assert result.exit_code == 1 and "--adapter: expected NAME=SOURCE, got 'nosource'" in result.output
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(tmp_path / "missing.yaml")], env=ENV)
    assert result.exit_code == 1 and "--config: file not found" in result.output


def test_shipped_serve_yaml_reads(tmp_path) -> None:
    settings = read_settings(Path(__file__).resolve().parents[1] / "configs/serve/serve.yaml")
    assert settings.host == "127.0.0.1" and settings.adapters and settings.max_batch_size >= 1


# -- against a real uvicorn on 127.0.0.1 -----------------------------------------------------------
class _Uvicorn:
    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _load(url: str, offline: dict[str, list[dict]], clients: int, requests: int) -> dict[int, int]:
    names = list(offline)
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def client(k: int) -> None:
            for i in range(k, requests, clients):
                name, which = names[i % len(names)], [i % len(TEXTS), (i * 7 + 1) % len(TEXTS)]
                body = {"adapter": name, "inputs": [TEXTS[w] for w in which]}
                if i % 11 == 0:  # invalid requests mixed in: an unknown adapter, an empty list
                    body = {"adapter": "nope", "inputs": ["x"]} if i % 2 else {"adapter": name, "inputs": []}
                response = await http.post("/v1/predict", json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    _same(response.json()["predictions"], [offline[name][w] for w in which])
                else:
                    assert response.status_code in (404, 422), response.text
        await asyncio.gather(*(client(k) for k in range(clients)))
    return statuses


@pytest.mark.parametrize(("clients", "requests"), [
    (16, 320), pytest.param(32, 2000, marks=pytest.mark.slow)])  # the size runs with `make repro`
def test_load_on_localhost_every_answer_equals_predict_json(server, offline, clients: int, requests: int) -> None:
    with _Uvicorn(create_app(server, token="")) as url:
        asyncio.run(_load(url, offline, clients=8, requests=40))  # warm-up
        warm = _rss_mb()
        started = time.time()
        statuses = asyncio.run(_load(url, offline, clients=clients, requests=requests))
        elapsed = time.time() - started
        metrics = httpx.get(f"{url}/metrics").text
    invalid = len(range(0, requests, 11))
    assert set(statuses) <= {200, 404, 422} and statuses[200] == requests - invalid, statuses
    assert _rss_mb() <= 1.1 * warm, (warm, _rss_mb())
    batches = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("adaptercli_batch_texts_count")))
    assert batches < statuses[200] + 40  # requests shared batches (40: the warm-up's)
    assert elapsed < 60 * requests / 320


def test_full_queue_answers_503_and_slow_answers_504(runs) -> None:
    server = _server({"lora": runs["lora"]}, max_queue=1, timeout_s=1.0, max_wait_ms=1.0)
    release = threading.Event()
    answer = server.predict_batch

    def blocked(jobs):
        release.wait(5)
        answer(jobs)

    server.predict_batch = blocked

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            first = asyncio.create_task(http.post("/v1/predict", json={"adapter": "lora", "inputs": ["a"]}))
            await asyncio.sleep(0.3)  # taken by the batcher, stuck in the worker
            second = asyncio.create_task(http.post("/v1/predict", json={"adapter": "lora", "inputs": ["b"]}))
            await asyncio.sleep(0.3)  # waits in the queue (its one place)
            third = await http.post("/v1/predict", json={"adapter": "lora", "inputs": ["c"]})
            return [third, await first, await second]

    with _Uvicorn(create_app(server, token="")) as url:
        full, late, queued = asyncio.run(burst(url))
        release.set()
        assert httpx.get(f"{url}/health").status_code == 200
        server.predict_batch = answer
        assert httpx.post(f"{url}/v1/predict", json={"adapter": "lora", "inputs": ["d"]}).status_code == 200
    assert full.status_code == 503 and full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]
    assert late.status_code == 504 and "no answer within 1 s" in late.json()["error"]
    assert queued.status_code == 504


def test_generate_endpoint_answers_like_adapter_generate(tmp_path, tiny_llama_dir) -> None:
    from conftest import write_recipe
    from rich.console import Console

    from adaptercli.inference import generate
    from adaptercli.recipe import load_recipe
    from adaptercli.train import train

    pairs = [(f"what is {a} plus {b}", f"it is {a + b}") for a in range(4) for b in range(4)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in pairs))
    recipe = write_recipe(tmp_path, tiny_llama_dir, data, method="lora", data={"task": "instruct", "label_column": None},
                          max_steps=2, eval_steps=2, save_steps=2, max_seq_length=64)
    train(load_recipe(recipe), console=Console(quiet=True))
    run = tmp_path / "run"
    expected = generate(run, ["what is 2 plus 3"], max_new_tokens=5)[0]
    assert expected  # a random model writes five word pieces, not an empty answer
    with TestClient(create_app(_server({"chat": run}), token="")) as client:
        answer = client.post("/v1/generate", json={"adapter": "chat", "prompt": "what is 2 plus 3", "max_new_tokens": 5})
        assert answer.status_code == 200 and answer.json() == {"adapter": "chat", "text": expected}
        messages = [{"role": "user", "content": "what is 2 plus 3"}]
        answer = client.post("/v1/generate", json={"adapter": "chat", "messages": messages, "max_new_tokens": 5})
        assert answer.json()["text"] == expected
        refused = client.post("/v1/predict", json={"adapter": "chat", "inputs": ["hi"]})
        assert refused.status_code == 422 and "use /v1/generate" in refused.json()["error"]
        both = client.post("/v1/generate", json={"adapter": "chat", "prompt": "x", "messages": messages})
        assert both.status_code == 422 and both.json()["error"] == "give either prompt or messages"

    # Generate requests that arrive together run as one batch (one forward pass per token for every
    # prompt still going), each with its own length, temperature and seed: each answer is the one
    # `adapter generate` writes for that prompt alone.
    asks = [{"prompt": "what is 2 plus 3", "max_new_tokens": 5},
            {"prompt": "what is one plus one and then two", "max_new_tokens": 3, "temperature": 0.9, "seed": 7},
            {"prompt": "hello", "max_new_tokens": 6, "temperature": 1.2, "seed": 1},
            {"messages": messages, "max_new_tokens": 4}]
    alone = [generate(run, [ask.get("prompt", "what is 2 plus 3")], max_new_tokens=ask["max_new_tokens"],
                      temperature=ask.get("temperature", 0.0), seed=ask.get("seed", 0))[0] for ask in asks]

    async def together(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/generate", json={"adapter": "chat", **ask}) for ask in asks])

    server = _server({"chat": run}, max_wait_ms=1000)
    batches: list[int] = []
    continue_rows = server._generate
    server._generate = lambda jobs: batches.append(len(jobs)) or continue_rows(jobs)
    with _Uvicorn(create_app(server, token="")) as url:
        answers = asyncio.run(together(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert [a.json()["text"] for a in answers] == alone and len(set(alone)) > 1
    assert batches == [4] and "adaptercli_batch_texts_count 1" in metrics


def test_seq2seq_runs_generate_like_adapter_generate(trained, runs) -> None:  # noqa: F811 - the imported fixture
    """A seq2seq run is served on its encoder-decoder: generate requests that arrive together are
    written in one batch (greedy ones in one `generate` call, each cut to its own length; sampled
    ones seeded as `adapter generate --seed`), each equal to `adapter generate RUN` alone; predict,
    chat messages and a run with a head on the same server are refused in one line."""
    from adaptercli.inference import generate

    run = trained("t5")
    asks = [{"prompt": "the cat sat on the mat", "max_new_tokens": 6}, {"prompt": "a dog ran", "max_new_tokens": 3},
            {"prompt": "the cat", "max_new_tokens": 5}, {"prompt": "a dog ran", "max_new_tokens": 5, "temperature": 1.0, "seed": 3}]
    alone = [generate(run, [ask["prompt"]], max_new_tokens=ask["max_new_tokens"], temperature=ask.get("temperature", 0.0),
                      seed=ask.get("seed", 0))[0] for ask in asks]
    assert any(alone) and len(set(alone)) > 1
    server = _server({"summary": run}, max_wait_ms=1000)
    batches: list[int] = []
    write = server._write
    server._write = lambda jobs: batches.append(len(jobs)) or write(jobs)

    async def together(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/generate", json={"adapter": "summary", **ask}) for ask in asks])

    with _Uvicorn(create_app(server, token="")) as url:
        answers = asyncio.run(together(url))
        refused = httpx.post(f"{url}/v1/predict", json={"adapter": "summary", "inputs": ["the cat"]})
        chat = httpx.post(f"{url}/v1/generate", json={"adapter": "summary", "messages": [{"role": "user", "content": "x"}]})
    assert [a.json()["text"] for a in answers] == alone and batches == [4]
    assert refused.status_code == 422 and refused.json()["error"].endswith("use /v1/generate")
    assert chat.status_code == 422 and "seq2seq run: give its source text as prompt" in chat.json()["error"]
    with pytest.raises(AdapterCliError) as error:
        server.load("lora", str(runs["lora"]))
    assert "is not a seq2seq run, but the server runs seq2seq runs" in str(error.value)
