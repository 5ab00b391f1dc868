"""``peft-mtl serve``: load the backbone once, load every set, run the app with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from ..inference.adapter_host import load_base
from ..model.saved_sets import read_manifest
from .app import ServeConfig, create_app

logger = logging.getLogger(__name__)


def parse_set(item: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder)."""
    if "=" in item and not Path(item).exists():
        name, folder = item.split("=", 1)
        return name, Path(folder)
    return None, Path(item)


def serve(sets: list[str], host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          backbone: str | None = None, precision: str = "auto", device: str = "auto", int8: bool = False) -> None:
    """Load ``sets`` on one backbone and serve them until interrupted (SIGINT/SIGTERM)."""
    parsed = [parse_set(s) for s in sets]
    if backbone is None and parsed:
        backbone = read_manifest(parsed[0][1]).get("backbone_source")
    config = config or ServeConfig()
    # --int8 means the int8 multi-adapter graph, except on --engine torch: one merged graph per (set, task).
    base = load_base(backbone, precision=precision, device=device, int8=int8 and config.engine == "torch")
    for name, folder in parsed:
        base.load(folder, name=name)
    app = create_app(base, config)
    logger.info(f"peft-mtl serve: {len(base.sets)} set(s) on http://{host}:{port} (docs: /docs); "
                f"batching up to {app.state.worker.max_batch} rows")
    for name in base.sets:
        logger.info(f"  {name}: {app.state.worker.engine_of(name)}")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
