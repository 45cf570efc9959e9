"""The HTTP face of `adapter serve` (FastAPI, run by uvicorn): the routes, the one-line errors and
the optional bearer token. What answers lives in :mod:`adaptercli.serving`.

Every error is ``{"error": "<one line>"}`` with its status: 401 (token), 404 (unknown adapter),
409 (name in use), 413 (too many texts, a text too long), 422 (malformed JSON, missing, null or
wrongly typed fields, empty inputs, an adapter that cannot answer that endpoint), 503 with
``Retry-After`` (queue full), 504 (timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from .errors import AdapterCliError
from .inference import PREDICT_HEADS
from .serving import TOKEN_ENV, AdapterServer, Batcher, GenerateJob, Job, Metrics, Served, ServeSettings, now

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - the optional extra is missing
    FastAPI = None  # type: ignore[assignment,misc]

# Routes that answer without the token: liveness probes and the API's own description.
OPEN_ROUTES = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


class Refused(Exception):
    """A request the server answers with ``status`` and one line."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


if FastAPI is not None:
    Text = Annotated[StrictStr, Field(min_length=1)]

    class PredictRequest(BaseModel):
        """Texts (or text pairs: two-item lists) for one adapter."""

        model_config = ConfigDict(extra="forbid")
        adapter: StrictStr
        inputs: Annotated[list[Text | Annotated[list[Text], Field(min_length=2, max_length=2)]], Field(min_length=1)]
        scores: StrictBool = False

    class GenerateRequest(BaseModel):
        """A prompt (or chat messages) for one causal-LM adapter, or a source text for a seq2seq run."""

        model_config = ConfigDict(extra="forbid")
        adapter: StrictStr
        prompt: Text | None = None
        messages: Annotated[list[dict[StrictStr, StrictStr]], Field(min_length=1)] | None = None
        max_new_tokens: Annotated[StrictInt, Field(ge=1)] = 64
        temperature: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 0.0
        seed: StrictInt = 0

    class LoadRequest(BaseModel):
        """Serve ``source`` (a run folder, an adapter folder, a Hub id or an index id) as ``name``."""

        model_config = ConfigDict(extra="forbid")
        name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_\-]+$")]
        source: Text


def _validation_line(exc: RequestValidationError, content_type: str) -> str:
    """The first problem of a request body, in one line (``inputs.0: Input should be ...``)."""
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(p) for p in error.get("loc", ())[1:] if not str(p).startswith(("list[", "str", "constrained")))
    if not where and error.get("type") == "missing":
        return "the request has no body: send a JSON object (content-type: application/json)"
    if not where and "json" not in content_type:  # FastAPI reads a body as JSON only when it is declared so
        sent = f"it was sent as {content_type}" if content_type else "it was sent without one"
        return f"the body must be sent as JSON with the header content-type: application/json ({sent})"
    if error.get("type") == "missing":
        return f"{where}: required field missing"
    return f"{where or 'body'}: {error.get('msg', 'invalid')}"


def create_app(server: AdapterServer, token: str | None = None) -> Any:
    """The FastAPI app over a loaded server. ``token``: the bearer token every ``/v1`` route and
    ``/metrics`` requires (default ``$ADAPTERCLI_SERVE_TOKEN``; empty: none)."""
    if FastAPI is None:
        raise AdapterCliError("adapter serve needs FastAPI and uvicorn: pip install 'adaptercli[serve]'")
    token = os.environ.get(TOKEN_ENV) if token is None else token
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptercli-model")
    holder: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        batcher = holder["batcher"] = Batcher(server, executor, metrics)
        generating = holder["generate"] = Batcher(server, executor, metrics, work="generate_batch")
        metrics.queue_length = lambda: batcher.queue.qsize() + generating.queue.qsize()
        tasks = [asyncio.create_task(b.run()) for b in (batcher, generating)]
        yield
        for task in tasks:
            task.cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="adaptercli serve", lifespan=lifespan,
                  description="Many adapters on one frozen base model, chosen per request, mixed in one batch.")
    _add_middleware(app, token, metrics)
    _add_error_handlers(app)
    _add_routes(app, server, holder, executor, metrics)
    return app


def _add_middleware(app: Any, token: str | None, metrics: Metrics) -> None:
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next):
        start = now()
        if expected is not None and request.url.path not in OPEN_ROUTES and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected):
            response = JSONResponse({"error": "missing or wrong bearer token (send Authorization: Bearer <token>)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "other")
        metrics.request(request.method, route, response.status_code, now() - start)
        return response


def _add_error_handlers(app: Any) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_line(exc, request.headers.get("content-type", ""))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)


def _served(server: AdapterServer, name: str) -> Served:
    if name not in server.served:
        raise Refused(404, f"no adapter named '{name}' is served (served: {', '.join(server.served) or 'none'})")
    return server.served[name]


def _check_predict(server: AdapterServer, body: PredictRequest) -> Served:
    served = _served(server, body.adapter)
    limits = server.settings
    if served.head not in PREDICT_HEADS:
        hint = "; use /v1/generate" if served.head in ("causal_lm", "seq2seq") else ""
        raise Refused(422, f"adapter '{served.name}' has a {served.head or 'missing'} head: predict answers "
                           f"classification, regression and tagging heads{hint}")
    if len(body.inputs) > limits.max_texts:
        raise Refused(413, f"inputs: {len(body.inputs)} texts, at most {limits.max_texts} per request")
    if served.head == "tagging" and (pair := next((i for i, t in enumerate(body.inputs) if not isinstance(t, str)), None)) is not None:
        raise Refused(422, f"inputs.{pair}: a tagging adapter tags the words of a text, not a text pair")
    for i, text in enumerate(body.inputs):
        if (tokens := server.count_tokens(text)) > limits.max_tokens:
            raise Refused(413, f"inputs.{i}: {tokens} tokens, at most {limits.max_tokens} per text")
    return served


async def _answered(batcher: Batcher, job: Job | GenerateJob) -> None:
    """Queue ``job`` on ``batcher`` and wait for its batch: 503 when the queue is full, 504 past
    the request timeout, the job's own error if it failed."""
    limits = batcher.settings
    try:
        batcher.submit(job)
    except asyncio.QueueFull:
        raise Refused(503, f"the queue is full ({limits.max_queue} requests); retry shortly",
                      {"Retry-After": "1"}) from None
    try:
        await asyncio.wait_for(job.future, limits.timeout_s)
    except asyncio.TimeoutError:
        raise Refused(504, f"no answer within {limits.timeout_s:g} s") from None
    if job.error is not None:
        raise Refused(*job.error)


def _add_routes(app: Any, server: AdapterServer, holder: dict[str, Batcher], executor: ThreadPoolExecutor,
                metrics: Metrics) -> None:
    limits = server.settings

    @app.post("/v1/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """Label each text (or text pair) with one adapter: what `adapter predict RUN --json` prints."""
        served = _check_predict(server, body)
        job = Job(served, list(body.inputs), body.scores, asyncio.get_running_loop().create_future())
        await _answered(holder["batcher"], job)
        return {"adapter": served.name, "predictions": job.result}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt, or answer chat messages, with one causal-LM adapter; write a seq2seq
        run's text for a source prompt. Requests arriving together are continued as one batch."""
        served = _served(server, body.adapter)
        if served.head not in ("causal_lm", "seq2seq"):
            raise Refused(422, f"adapter '{served.name}' has a {served.head or 'missing'} head: generate needs a "
                               "causal-LM adapter or a seq2seq run; use /v1/predict")
        if (body.prompt is None) == (body.messages is None):
            raise Refused(422, "give either prompt or messages")
        if served.head == "seq2seq" and body.messages is not None:
            raise Refused(422, f"adapter '{served.name}' is a seq2seq run: give its source text as prompt, not messages")
        if body.max_new_tokens > limits.max_new_tokens:
            raise Refused(422, f"max_new_tokens: at most {limits.max_new_tokens}")
        prompt = body.prompt if body.prompt is not None else body.messages
        if body.prompt is not None and (tokens := server.count_tokens(body.prompt)) > limits.max_tokens:
            raise Refused(413, f"prompt: {tokens} tokens, at most {limits.max_tokens}")
        job = GenerateJob(served, prompt, body.max_new_tokens, float(body.temperature), body.seed,
                          asyncio.get_running_loop().create_future())
        await _answered(holder["generate"], job)
        return {"adapter": served.name, "text": job.result}

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        """The served adapters: name, method, task, head, labels, source."""
        return {"adapters": [s.describe() for s in server.served.values()]}

    @app.post("/v1/adapters", status_code=201)
    async def load(body: LoadRequest) -> dict[str, Any]:
        """Load and serve one more adapter (on the server's base model)."""
        if body.name in server.served:
            raise Refused(409, f"an adapter named '{body.name}' is already served; DELETE it first")
        try:
            served = await asyncio.get_running_loop().run_in_executor(executor, server.load, body.name, body.source)
        except (AdapterCliError, OSError) as exc:
            raise Refused(422, f"cannot load '{body.source}': {str(exc).splitlines()[0][:300]}") from None
        return served.describe()

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str) -> dict[str, Any]:
        """Stop serving an adapter and free its weights."""
        _served(server, name)
        await asyncio.get_running_loop().run_in_executor(executor, server.unload, name)
        return {"deleted": name}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: ok, and how many adapters are served."""
        return {"status": "ok", "adapters": len(server.served)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        """Requests, latency, batch sizes and queue length in the Prometheus text format."""
        return metrics.render()


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    """Load every adapter of ``settings`` (refusing at start, in one line, what cannot be served)
    and answer on ``host:port`` until interrupted."""
    if FastAPI is None:
        raise AdapterCliError("adapter serve needs FastAPI and uvicorn: pip install 'adaptercli[serve]'")
    import uvicorn

    if not settings.adapters:
        raise AdapterCliError("no adapters to serve: give --adapter NAME=SOURCE or `adapters:` in serve.yaml")
    server = AdapterServer(settings)
    for name, source in settings.adapters.items():
        server.load(name, source)
    uvicorn.run(create_app(server), host=settings.host, port=settings.port, log_level=log_level)
