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

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..inference.adapter_host import AdapterHost
from ..model.saved_sets import AdapterError
from .schemas import EnsembleRequest, EnsembleResponse, LoadRequest, PredictRequest, PredictResponse
from .worker import BatchStats, CallJob, PredictJob, UnknownName, Worker


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


def create_app(base: AdapterHost, config: ServeConfig | None = None):
    """The FastAPI application serving ``base``'s loaded sets (its worker thread starts now)."""
    from fastapi import FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    config = config or ServeConfig()
    registry = CollectorRegistry()
    requests = Counter("peft_mtl_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    rows_total = Counter("peft_mtl_rows", "inputs answered", ["endpoint"], registry=registry)
    latency = Histogram("peft_mtl_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    batch_rows = Histogram("peft_mtl_batch_rows", "rows per forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    queue_seconds = Histogram("peft_mtl_queue_seconds", "time a request waited for its batch", registry=registry,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
    loaded = Gauge("peft_mtl_loaded_sets", "adapter sets loaded", registry=registry)

    def on_batch(stats: BatchStats) -> None:
        batch_rows.observe(stats.rows)
        for q in stats.queue_seconds:
            queue_seconds.observe(q)

    worker = Worker(base, config.max_batch, config.max_wait_ms, on_batch)
    loaded.set_function(lambda: len(worker.sets_snapshot))

    app = FastAPI(title="peft_mtl", version="1", description="Predictions from many LoRA adapter sets on one "
                  "loaded encoder, with dynamic batching across sets and tasks.")
    app.state.worker = worker
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        detail = "malformed JSON" if status == 400 else [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg")} for e in errors]
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the server never dies on a request
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def check_inputs(inputs: list) -> None:
        if not inputs:
            raise HTTPException(422, "inputs is empty: send at least one sentence or pair")
        if len(inputs) > config.max_inputs:
            raise HTTPException(413, f"{len(inputs)} inputs; at most {config.max_inputs} per request")
        for i, item in enumerate(inputs):
            parts = [item] if isinstance(item, str) else item
            if isinstance(item, list) and len(item) != 2:
                raise HTTPException(422, f"input {i}: a pair is [first, second], got {len(item)} parts")
            if any(len(p) > config.max_chars for p in parts):
                raise HTTPException(422, f"input {i}: over {config.max_chars} characters")

    async def run(job) -> object:
        try:
            return await asyncio.wrap_future(worker.submit(job))
        except UnknownName as err:
            raise HTTPException(404, str(err)) from None
        except (ValueError, AdapterError) as err:
            raise HTTPException(422, str(err)) from None

    def known_set(name: str | None) -> str:
        snapshot = worker.sets_snapshot
        if name is None:
            if not snapshot:
                raise HTTPException(404, "no set is loaded")
            return next(iter(snapshot))
        if name not in snapshot:
            raise HTTPException(404, f"no set named {name!r}; loaded: {', '.join(snapshot) or 'none'}")
        return name

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              summary="Predict one task of one set for sentences or pairs")
    async def predict(req: PredictRequest):
        check_inputs(req.inputs)
        name = known_set(req.set)
        inputs = [x if isinstance(x, str) else tuple(x) for x in req.inputs]
        predictions = await run(PredictJob(name, req.task, inputs))
        rows_total.labels("/v1/predict").inc(len(inputs))
        return {"predictions": predictions, "set": name, "task": req.task}

    @app.post("/v1/ensemble", response_model=EnsembleResponse, response_model_exclude_none=True,
              summary="Ensemble of several loaded sets for one task")
    async def ensemble(req: EnsembleRequest):
        from ..inference.ensemble import ensemble_predict

        check_inputs(req.inputs)
        names = [known_set(s) for s in req.sets]
        inputs = [x if isinstance(x, str) else tuple(x) for x in req.inputs]

        def call(b: AdapterHost):
            for n in names:
                if req.task not in b.sets[n].tasks:
                    raise UnknownName(f"set {n!r} has no task {req.task!r}; it has {', '.join(b.sets[n].tasks)}")
            return ensemble_predict(b, req.task, inputs, names, req.weights, req.method)

        predictions = await run(CallJob(call, rows=len(inputs) * len(names)))
        rows_total.labels("/v1/ensemble").inc(len(inputs))
        return {"predictions": predictions, "sets": names, "task": req.task}

    @app.get("/v1/sets", summary="Loaded sets, their tasks and sizes, and the backbone")
    async def list_sets():
        return {"backbone": base.identity.name, "sets": worker.sets_snapshot}

    def admin(authorization: str | None) -> None:
        if config.admin_token is None:
            raise HTTPException(403, "admin endpoints are off; start the server with --admin-token-file")
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(authorization[len("Bearer "):].encode(), config.admin_token.encode()):
            raise HTTPException(403, "wrong admin token")

    @app.post("/v1/sets", status_code=201, summary="Load a set (admin)")
    async def load_set(req: LoadRequest, authorization: str | None = Header(None)):
        admin(authorization)
        folder = resolve_under_root(req.folder, config.sets_root)
        if req.name in worker.sets_snapshot:
            raise HTTPException(409, f"a set named {req.name!r} is already loaded; DELETE it first or pick another name")
        name = await run(CallJob(lambda b: b.load(folder, name=req.name)))
        return {"name": name, **worker.sets_snapshot.get(name, {})}

    @app.delete("/v1/sets/{name}", summary="Unload a set (admin)")
    async def unload_set(name: str, authorization: str | None = Header(None)):
        admin(authorization)
        known_set(name)
        await run(CallJob(lambda b: b.unload(name)))
        return {"unloaded": name}

    @app.get("/healthz", summary="Liveness: the model thread is running")
    async def healthz():
        alive = worker.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "model thread stopped", "sets": len(worker.sets_snapshot)},
                            status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.on_event("shutdown")
    async def shutdown():
        worker.stop()

    return app


def resolve_under_root(folder: str, root: Path | None) -> Path:
    """The folder, only if it lies under ``root`` (no traversal, no symlink escape) and holds
    nothing but safetensors and JSON weights."""
    from fastapi import HTTPException

    if root is None:
        raise HTTPException(403, "loading sets at run time is off; start the server with --sets-root DIR")
    root = root.resolve()
    target = (root / folder).resolve() if not Path(folder).is_absolute() else Path(folder).resolve()
    if target != root and root not in target.parents:
        raise HTTPException(403, f"{folder!r} is outside the sets root")
    if not target.is_dir():
        raise HTTPException(404, f"{folder!r}: no such folder under the sets root")
    unsafe = [p.name for p in target.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    if unsafe:
        raise HTTPException(422, f"{folder!r} holds pickled weights ({', '.join(sorted(unsafe)[:3])}); "
                                 f"only safetensors sets are loaded")
    return target
