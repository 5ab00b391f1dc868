"""``peft-mtl serve``: adapter sets over HTTP, one backbone, dynamic batching across sets and tasks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .options import add_engine_options

HELP = "serve adapter sets over HTTP (one backbone, dynamic batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sets", nargs="*", help="set folders to load at start (NAME=DIR to name one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="rows per forward pass across requests (1: off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--admin-token-file", default=None, help="file holding the token for POST/DELETE /v1/sets")
    p.add_argument("--sets-root", default=None, help="folders loadable at run time must be under it")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per sentence")
    p.add_argument("--backbone", default=None, help="default: the first set's backbone")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"],
                   help="what runs the batched pass: onnx (one multi-adapter ONNX Runtime graph, LoRA factors as "
                        "inputs; with --int8 its int8 copy), torch, or auto (onnx on a CPU, torch on a GPU)")
    add_engine_options(p, int8_help="int8 base weights: the int8 multi-adapter graph (LoRA products stay fp32); "
                                     "with --engine torch, one merged int8 graph per (set, task) instead")


def _admin_token(path_text: str | None) -> str | None:
    if not path_text:
        return None
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"{path}: admin token file not found")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise UserError(f"{path}: the admin token is shorter than 16 characters; use a long random one "
                        f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def run(args: argparse.Namespace, argv: list[str]) -> int:
    try:  # deferred: FastAPI and uvicorn are the optional serve extra
        from ..serving import ServeConfig
        from ..serving.server import serve
    except ImportError as err:
        raise UserError(f"serving needs the serve extra ({err.name} is missing): pip install 'peft_mtl[serve]'") from None
    root = Path(args.sets_root) if args.sets_root else None
    if root is not None and not root.is_dir():
        raise UserError(f"{root}: --sets-root is not a folder")
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                         max_inputs=args.max_inputs, max_chars=args.max_chars, admin_token=_admin_token(args.admin_token_file),
                         sets_root=root, engine=args.engine, int8=args.int8)
    serve(args.sets, args.host, args.port, config, args.backbone, args.precision, args.device, args.int8)
    return 0
