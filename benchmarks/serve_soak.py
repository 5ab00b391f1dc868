"""Soak test of `peft-mtl serve`: many concurrent clients for minutes, bad requests mixed in.

    python benchmarks/serve_soak.py [--minutes 10] [--clients 64] [--bad 0.05] [--json reports/soak.json]

Starts the real server (loopback, free port, --precision fp32) on the shipped adapters/all and
adapters/sst, and drives it with ``--clients`` async clients until ``--minutes`` have passed.
A ``--bad`` share of the requests is bad on purpose — malformed JSON, a lone surrogate, NaN
ensemble weights, an oversize body, an unknown set — and must get its 4xx; every good answer is
compared with ``base.predict`` on the same inputs in this process (abs. difference ≤ 1e-4). The
server's resident memory is sampled every 5 s; after the warm-up (the first fifth of the run) it
must not drift: the one-minute mean of the last minute within 10 % of the first minute's after
the warm-up (the samples swing between the heap trims; the drift averages that out). The server
is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from serve_load import REPO, Server, rss_mb, workload

BAD = {  # name -> (body bytes or dict, expected status)
    "malformed_json": (b'{"set": "all", "task": "sst", "inputs": [', 400),
    "lone_surrogate": (b'{"set": "all", "task": "sst", "inputs": ["\\ud800 bad"]}', 422),
    "nan_weights": (b'{"sets": ["all", "sst"], "task": "sst", "inputs": ["x"], "weights": [NaN, 1]}', 422),
    "oversize_body": (b'{"set": "all", "task": "sst", "inputs": ["' + b"x" * 2_000_000 + b'"]}', 413),
    "unknown_set": (b'{"set": "nope", "task": "sst", "inputs": ["x"]}', 404),
}


def memory_drift(samples: list[tuple[float, float]], seconds: float) -> float | None:
    """Relative change of the one-minute mean resident memory from the first minute after the warm-up
    (the first fifth of the run) to the last minute: growth shows here; swings between heap trims
    average out."""
    warm = seconds / 5
    first = [m for t, m in samples if warm <= t < warm + 60]
    last = [m for t, m in samples if t >= samples[-1][0] - 60] if samples else []
    if not first or not last:
        return None
    return round(sum(last) / len(last) / (sum(first) / len(first)) - 1, 3)


def close(a: list[dict], b: list[dict], tol: float = 1e-4) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if "score" in y:
            if abs(x.get("score", float("inf")) - y["score"]) > tol:
                return False
        elif x.get("label") != y["label"] or max(abs(p - q) for p, q in zip(x["probabilities"], y["probabilities"])) > tol:
            return False
    return True


async def soak(url: str, pid: int, goods: list[tuple[dict, list]], clients: int, seconds: float, bad_share: float,
               seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    counts: Counter = Counter()
    bad_statuses: dict[str, Counter] = {name: Counter() for name in BAD}
    wrong: list[str] = []
    memory: list[tuple[float, float]] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def client(http):
        while time.perf_counter() < deadline:
            if rng.random() < bad_share:
                name = rng.choice(sorted(BAD))
                body, want = BAD[name]
                path = "/v1/ensemble" if name == "nan_weights" else "/v1/predict"
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
                bad_statuses[name][r.status_code] += 1
                counts["bad"] += 1
                counts["bad_expected_status" if r.status_code == want else "bad_other_status"] += 1
                continue
            body, expected = rng.choice(goods)
            r = await http.post("/v1/predict", json=body)
            counts["good"] += 1
            if r.status_code != 200:
                counts["good_failed"] += 1
                wrong.append(f"{r.status_code}: {r.text[:200]}")
            elif not close(r.json()["predictions"], expected):
                counts["good_wrong"] += 1
                wrong.append(f"wrong answer for {body}")

    async def watch():
        while time.perf_counter() < deadline:
            memory.append((round(time.perf_counter() - started, 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(watch(), *[client(http) for _ in range(clients)])
        healthy = (await http.get("/healthz")).status_code == 200
    warm = [m for t, m in memory if t >= seconds / 5]
    level = warm[0] if warm else None
    return {"seconds": round(time.perf_counter() - started, 1), "clients": clients, "bad_share": bad_share,
            "counts": dict(counts), "bad_statuses": {k: dict(v) for k, v in bad_statuses.items()},
            "wrong_examples": wrong[:5], "healthy_after": healthy, "rss_mb": memory,
            "rss_after_warmup_mb": level, "rss_max_after_warmup_mb": max(warm) if warm else None,
            "rss_growth_after_warmup": round(max(warm) / level - 1, 3) if warm else None,
            "rss_drift_after_warmup": memory_drift(memory, seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--bad", type=float, default=0.05)
    parser.add_argument("--requests", type=int, default=400, help="distinct good requests in the pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from peft_mtl import load_base
    from peft_mtl.data.loading import default_data_dir

    sets = {"all": ["sst", "qqp", "sts"], "sst": ["sst"]}
    root = REPO / "adapters"
    base = load_base(precision="fp32")
    for name in sets:
        base.load(root / name, name=name)
    pool = workload(sets, default_data_dir(), args.requests, args.seed)
    goods = [(r, base.predict(r["task"], [tuple(x) if isinstance(x, list) else x for x in r["inputs"]], r["set"]))
             for r in pool]
    token_file = Path(tempfile.mkdtemp()) / "token"
    token_file.write_text(secrets.token_urlsafe(24))
    server = Server([root / name for name in sets], root, token_file, 32, 5.0, extra=["--precision", "fp32"])
    try:
        result = asyncio.run(soak(server.url, server.proc.pid, goods, args.clients, args.minutes * 60, args.bad,
                                  args.seed))
    finally:
        server.stop()
    result["command"] = "python benchmarks/serve_soak.py " + " ".join(sys.argv[1:])
    result["malloc_arena_max"] = os.environ.get("MALLOC_ARENA_MAX")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    summary = {k: result[k] for k in ("counts", "healthy_after", "rss_after_warmup_mb", "rss_max_after_warmup_mb",
                                      "rss_growth_after_warmup", "rss_drift_after_warmup")}
    print(json.dumps(summary))
    good_ok = not result["counts"].get("good_failed") and not result["counts"].get("good_wrong")
    flat = result["rss_drift_after_warmup"] is None or abs(result["rss_drift_after_warmup"]) <= 0.10
    return 0 if good_ok and flat and result["healthy_after"] and not result["counts"].get("bad_other_status") else 1


if __name__ == "__main__":
    sys.exit(main())
