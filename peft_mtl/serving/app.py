"""The HTTP API: predictions and ensembles over many adapter sets on one loaded backbone.

Endpoints (JSON): ``POST /v1/predict``, ``POST /v1/ensemble``, ``GET /v1/sets``, admin-only
``POST /v1/sets`` and ``DELETE /v1/sets/{name}``, ``GET /healthz``, ``GET /metrics``
(Prometheus text). OpenAPI docs at ``/docs``.

Bad input never reaches the model and never kills the server: malformed JSON → 400, a
body over the limit → 413, too many inputs → 413, an input too long or of the wrong shape →
422, an unknown set or task → 404 naming what is loaded, admin calls without a token → 401,
with a wrong one → 403 (constant-time comparison), a folder outside ``--sets-root`` → 403.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from ..errors import UserError
from ..inference.adapter_graph import GraphEngine
from ..inference.adapter_host import AdapterHost
from . import routes
from .metrics import ServerMetrics
from .routes import ServerState
from .worker import Worker


@dataclass
class ServeConfig:
    """Server limits and batching. Defaults suit a 2-core CPU and short sentences."""

    max_batch: int = 32  # rows per forward pass (1: no batching)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_bytes: int = 1_000_000
    max_inputs: int = 64  # inputs per request
    max_chars: int = 2_000  # characters per sentence
    admin_token: str | None = None  # None: admin endpoints off
    sets_root: Path | None = None  # folders loadable at run time must be under it
    trim_every_s: float = 1.0  # return freed heap memory to the OS this often (0: never); see HeapTrim
    engine: str = "auto"  # auto | onnx | torch: what runs the batched pass (see choose_engine)
    int8: bool = False  # onnx engine: the int8 graph (int8 base GEMMs, fp32 LoRA products)


ENGINES = ("auto", "onnx", "torch")
logger = logging.getLogger(__name__)


def choose_engine(base: AdapterHost, engine: str = "auto", int8: bool = False) -> GraphEngine | None:
    """The multi-adapter graph engine, or None for PyTorch; the choice and its reason are logged.

    ``auto``: the graph on a CPU when ONNX Runtime is installed (2-4x PyTorch's rows/s there,
    reports/serve.md), PyTorch on a GPU. A base loaded with ``int8=True`` keeps its per-(set, task)
    merged graphs on PyTorch's side (``--engine torch --int8``)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        reason = None
        if base.device.type != "cpu":
            reason = f"the backbone is on {base.device}"
        elif base.int8 is not None:
            reason = "the base runs per-(set, task) int8 graphs"
        else:
            try:
                import onnxruntime  # noqa: F401  (deferred: the optional export extra)
            except ImportError:
                reason = "onnxruntime is not installed (pip install 'peft_mtl[export]')"
        if reason is not None:
            logger.info(f"engine: torch ({reason})")
            return None
        engine = "onnx"
    if engine == "torch":
        logger.info("engine: torch (as asked)" + (", int8: one merged graph per (set, task)" if base.int8 else ""))
        return None
    graph = GraphEngine(base, int8=int8)
    logger.info(f"engine: {graph.name} multi-adapter graph ({graph.path})")
    for name in base.sets:
        if graph.unsupported(name):
            logger.info(f"set {name!r} runs on PyTorch: {graph.unsupported(name)}")
    return graph


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"detail": f"request body over {self.limit} bytes"})
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"detail": f"request body over {self.limit} bytes"})


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(base: AdapterHost, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``base``'s loaded sets (its worker thread starts now)."""
    config = config or ServeConfig()
    metrics = ServerMetrics()
    worker = Worker(base, config.max_batch, config.max_wait_ms, metrics.on_batch, config.trim_every_s,
                    engine=choose_engine(base, config.engine, config.int8))
    metrics.loaded_sets.set_function(lambda: len(worker.sets_snapshot))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()  # the model thread ends with the app

    app = FastAPI(title="peft_mtl", version="1", description="Predictions from many LoRA adapter sets on one "
                  "loaded encoder, with dynamic batching across sets and tasks.", lifespan=lifespan)
    app.state.worker = worker
    app.state.server = ServerState(base, worker, config, metrics)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.middleware("http")(metrics.count_request)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    for router in (routes.predictions, routes.admin, routes.operations):
        app.include_router(router)
    app.openapi = lambda: _openapi_with_limits(app, config)
    return app


def _openapi_with_limits(app: FastAPI, config: ServeConfig) -> dict:
    """FastAPI's schema plus this server's limits (inputs per request, characters per sentence, pairs of
    two), so what the schema allows is what the server answers. The handlers enforce them (413 / 422)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for model in ("PredictRequest", "EnsembleRequest"):
            inputs = schema["components"]["schemas"][model]["properties"]["inputs"]
            inputs.update(minItems=1, maxItems=config.max_inputs)
            for item in inputs["items"]["anyOf"]:
                if item.get("type") == "string":
                    item.update(maxLength=config.max_chars)
                else:  # a pair: two sentences
                    item.update(minItems=2, maxItems=2)
                    item["items"].update(maxLength=config.max_chars)
        app.openapi_schema = schema
    return app.openapi_schema


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON → 400; a body of the wrong shape → 422 listing where."""
    errors = exc.errors()
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    detail = "malformed JSON" if status == 400 else [
        {"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in errors]
    return JSONResponse({"detail": detail}, status_code=status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The server never dies on a request: anything unforeseen is a 500 naming the error."""
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


resolve_under_root = routes.resolve_under_root  # kept importable from here (tests, callers of 0.1)
