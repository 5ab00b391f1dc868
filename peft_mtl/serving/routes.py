"""The endpoints, one small function each, grouped in routers: predictions, admin, operations.

Handlers never touch the model: they check the request, put a job on the worker's queue and
await its future (:class:`~peft_mtl.serving.worker.Worker`). What they share — the worker,
the limits, the metrics — is the :class:`ServerState` on ``app.state.server``.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..inference.adapter_host import AdapterHost
from ..inference.ensemble import ensemble_predict
from ..model.saved_sets import AdapterError
from .metrics import ServerMetrics
from .schemas import (ERROR_RESPONSES, EnsembleRequest, EnsembleResponse, LoadRequest, PredictRequest,
                      PredictResponse)
from .worker import CallJob, PredictJob, UnknownName, Worker

if TYPE_CHECKING:
    from .app import ServeConfig


@dataclass
class ServerState:
    """What every endpoint of one app works with."""

    host: AdapterHost
    worker: Worker
    config: "ServeConfig"
    metrics: ServerMetrics

    def check_inputs(self, inputs: list) -> None:
        """Counts and lengths within the limits (413 / 422 naming the input)."""
        if not inputs:
            raise HTTPException(422, "inputs is empty: send at least one sentence or pair")
        if len(inputs) > self.config.max_inputs:
            raise HTTPException(413, f"{len(inputs)} inputs; at most {self.config.max_inputs} per request")
        for i, item in enumerate(inputs):
            parts = [item] if isinstance(item, str) else item
            if isinstance(item, list) and len(item) != 2:
                raise HTTPException(422, f"input {i}: a pair is [first, second], got {len(item)} parts")
            if any(len(p) > self.config.max_chars for p in parts):
                raise HTTPException(422, f"input {i}: over {self.config.max_chars} characters")
            for p in parts:
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError:  # a lone UTF-16 surrogate (\ud800) is valid JSON but not text
                    raise HTTPException(422, f"input {i}: not valid Unicode text (a lone surrogate?)") from None

    def known_set(self, name: str | None) -> str:
        """``name`` if it is loaded (default: the first loaded set), else 404 naming what is."""
        snapshot = self.worker.sets_snapshot
        if name is None:
            if not snapshot:
                raise HTTPException(404, "no set is loaded")
            return next(iter(snapshot))
        if name not in snapshot:
            raise HTTPException(404, f"no set named {name!r}; loaded: {', '.join(snapshot) or 'none'}")
        return name

    async def run(self, job) -> object:
        """A job's result from the model thread; its errors as HTTP errors (404 unknown, 422 invalid)."""
        try:
            return await asyncio.wrap_future(self.worker.submit(job))
        except UnknownName as err:
            raise HTTPException(404, str(err)) from None
        except (ValueError, AdapterError) as err:
            raise HTTPException(422, str(err)) from None

    def admin(self, authorization: str | None) -> None:
        """Admin calls need the bearer token (constant-time comparison): 401 without it, 403 wrong or off."""
        token = self.config.admin_token
        if token is None:
            raise HTTPException(403, "admin endpoints are off; start the server with --admin-token-file")
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(authorization[len("Bearer "):].encode(), token.encode()):
            raise HTTPException(403, "wrong admin token")


def server(request: Request) -> ServerState:
    return request.app.state.server


def _as_inputs(items: list) -> list:
    return [x if isinstance(x, str) else tuple(x) for x in items]


# Every refusal a route can give is in the OpenAPI schema (clients, and schema fuzzers, rely on it).
predictions = APIRouter(prefix="/v1", tags=["predictions"], responses=ERROR_RESPONSES)
admin = APIRouter(prefix="/v1", tags=["admin"], responses=ERROR_RESPONSES)
operations = APIRouter(tags=["operations"])


@predictions.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
                  summary="Predict one task of one set for sentences or pairs")
async def predict(req: PredictRequest, state: ServerState = Depends(server)):
    state.check_inputs(req.inputs)
    name = state.known_set(req.set)
    inputs = _as_inputs(req.inputs)
    answers = await state.run(PredictJob(name, req.task, inputs))
    state.metrics.rows.labels("/v1/predict").inc(len(inputs))
    return {"predictions": answers, "set": name, "task": req.task}


@predictions.post("/ensemble", response_model=EnsembleResponse, response_model_exclude_none=True,
                  summary="Ensemble of several loaded sets for one task")
async def ensemble(req: EnsembleRequest, state: ServerState = Depends(server)):
    state.check_inputs(req.inputs)
    names = [state.known_set(s) for s in req.sets]
    inputs = _as_inputs(req.inputs)

    def call(host: AdapterHost):
        for n in names:
            if req.task not in host.sets[n].tasks:
                raise UnknownName(f"set {n!r} has no task {req.task!r}; it has {', '.join(host.sets[n].tasks)}")
        return ensemble_predict(host, req.task, inputs, names, req.weights, req.method, engine=state.worker.engine)

    answers = await state.run(CallJob(call, rows=len(inputs) * len(names)))
    state.metrics.rows.labels("/v1/ensemble").inc(len(inputs))
    return {"predictions": answers, "sets": names, "task": req.task}


@predictions.get("/sets", summary="Loaded sets, their tasks and sizes, and the backbone")
async def list_sets(state: ServerState = Depends(server)):
    return {"backbone": state.host.identity.name, "sets": state.worker.sets_snapshot}


@admin.post("/sets", status_code=201, summary="Load a set (admin)")
async def load_set(req: LoadRequest, authorization: str | None = Header(None), state: ServerState = Depends(server)):
    state.admin(authorization)
    folder = resolve_under_root(req.folder, state.config.sets_root)
    if req.name in state.worker.sets_snapshot:
        raise HTTPException(409, f"a set named {req.name!r} is already loaded; DELETE it first or pick another name")
    name = await state.run(CallJob(lambda host: host.load(folder, name=req.name)))
    return {"name": name, **state.worker.sets_snapshot.get(name, {})}


@admin.delete("/sets/{name}", summary="Unload a set (admin)")
async def unload_set(name: str, authorization: str | None = Header(None), state: ServerState = Depends(server)):
    state.admin(authorization)
    state.known_set(name)
    await state.run(CallJob(lambda host: host.unload(name)))
    return {"unloaded": name}


@operations.get("/healthz", summary="Liveness: the model thread is running",
                responses={503: {"model": dict, "description": "the model thread stopped"}})
async def healthz(state: ServerState = Depends(server)):
    alive = state.worker.thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "model thread stopped", "sets": len(state.worker.sets_snapshot)},
                        status_code=200 if alive else 503)


@operations.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(state: ServerState = Depends(server)):
    return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")


def resolve_under_root(folder: str, root: Path | None) -> Path:
    """The folder, only if it lies under ``root`` (no traversal, no symlink escape) and holds
    nothing but safetensors and JSON weights."""
    if root is None:
        raise HTTPException(403, "loading sets at run time is off; start the server with --sets-root DIR")
    root = root.resolve()
    try:
        target = (root / folder).resolve() if not Path(folder).is_absolute() else Path(folder).resolve()
    except (ValueError, OSError) as err:  # a NUL byte, an over-long name, a link loop
        raise HTTPException(422, f"{folder!r} is not a usable folder name ({err})") from None
    if target != root and root not in target.parents:
        raise HTTPException(403, f"{folder!r} is outside the sets root")
    if not target.is_dir():
        raise HTTPException(404, f"{folder!r}: no such folder under the sets root")
    escaping = [str(p.relative_to(target)) for p in target.rglob("*")
                if p.is_symlink() and p.resolve() != root and root not in p.resolve().parents]
    if escaping:  # a link inside the folder must not reach outside the root either
        raise HTTPException(403, f"{folder!r} holds links that point outside the sets root "
                                 f"({', '.join(sorted(escaping)[:3])})")
    unsafe = [p.name for p in target.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    if unsafe:
        raise HTTPException(422, f"{folder!r} holds pickled weights ({', '.join(sorted(unsafe)[:3])}); "
                                 f"only safetensors sets are loaded")
    return target
