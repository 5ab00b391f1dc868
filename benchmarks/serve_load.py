"""Load test of `peft-mtl serve`: dynamic batching vs --max-batch 1, and memory per loaded set.

    python benchmarks/serve_load.py [--requests 600] [--clients 32] [--seconds 120] [--out reports]

Starts the real server (loopback, free port) twice on the same 20 adapter sets — 10
single-task SST sets and 10 shared+task SST/QQP/STS sets, made by perturbing the shipped
adapters/sst and adapters/all so that each set has its own weights — and drives it with
``--clients`` concurrent async clients sending 1–4-input requests spread over sets and
tasks (sentences and pairs from the real dev files), bounded by ``--requests`` and
``--seconds``. Then measures resident memory with 1, 20 and 100 single-task sets loaded
(through the admin API). Each server is stopped by its own PID. Writes OUT/serve.json and
OUT/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_sets(template: Path, root: Path, count: int, prefix: str, seed: int) -> list[str]:
    """``count`` copies of a set folder whose LoRA factors are perturbed (distinct weights, same shapes)."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}"
        target = root / name
        shutil.copytree(template, target)
        for f in target.rglob("adapter_model.safetensors"):
            tensors = load_file(str(f))
            tensors = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=rng) for k, v in tensors.items()}
            save_file(tensors, str(f), metadata={"format": "pt"})
        names.append(name)
    return names


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    def __init__(self, sets: list[Path], root: Path, token_file: Path, max_batch: int, max_wait_ms: float,
                 extra: list[str] | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "peft_mtl", "serve", *[f"{p.name}={p}" for p in sets], "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--sets-root", str(root),
               "--admin-token-file", str(token_file), *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not start")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()  # its own PID
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def workload(sets: dict[str, list[str]], data_dir: Path, count: int, seed: int) -> list[dict]:
    from peft_mtl.data.loading import load_split, task_file
    from peft_mtl.data.tasks import get_task

    rng = random.Random(seed)
    pool = {}
    for t in ("sst", "qqp", "sts"):
        spec = get_task(t)
        examples = load_split(task_file(data_dir, spec, "dev"), spec).examples
        pool[t] = [e.texts[0] if len(e.texts) == 1 else list(e.texts) for e in examples]
    requests = []
    for _ in range(count):
        name = rng.choice(sorted(sets))
        task = rng.choice(sets[name])
        requests.append({"set": name, "task": task, "inputs": rng.sample(pool[task], rng.randint(1, 4))})
    return requests


async def drive(url: str, requests: list[dict], clients: int, seconds: float) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies, errors, rows = [], 0, 0
    started = time.perf_counter()
    deadline = started + seconds

    async def client(http):
        nonlocal errors, rows
        while not queue.empty() and time.perf_counter() < deadline:
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await http.post("/v1/predict", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1
            else:
                rows += len(body["inputs"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
        metrics = (await http.get("/metrics")).text
    elapsed = time.perf_counter() - started
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("peft_mtl_batch_rows_sum", "peft_mtl_batch_rows_count")):
            key, value = line.split()
            values[key] = float(value)
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "rows": rows, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 2), "rows_per_s": round(rows / elapsed, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_batch_rows": round(values["peft_mtl_batch_rows_sum"] / max(1.0, values["peft_mtl_batch_rows_count"]), 2)}


def memory(root: Path, token_file: Path, names: list[str], sizes: dict[str, int]) -> list[dict]:
    import httpx

    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    server = Server([root / names[0]], root, token_file, 32, 5)
    out = []
    try:
        loaded = 1
        for target in (1, 20, 100):
            for name in names[loaded:target]:
                r = httpx.post(server.url + "/v1/sets", json={"name": name, "folder": name}, headers=auth, timeout=120)
                r.raise_for_status()
            loaded = max(loaded, target)
            httpx.post(server.url + "/v1/predict", json={"set": names[target - 1], "task": "sst", "inputs": ["warm up"]})
            out.append({"sets": target, "rss_mb": round(rss_mb(server.proc.pid), 1),
                        "adapter_files_mb": round(sum(sizes[n] for n in names[:target]) / 2**20, 1)})
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="reports")
    args = parser.parse_args()

    from peft_mtl.device import cpu_supports_bf16

    work = Path(tempfile.mkdtemp(prefix="peft_mtl_serve_"))
    token_file = work / "token"
    token_file.write_text(secrets.token_urlsafe(24))
    root = work / "sets"
    root.mkdir()
    try:
        single = make_sets(REPO / "adapters" / "sst", root, 100, "sst", 1)
        multi = make_sets(REPO / "adapters" / "all", root, 10, "mt", 2)
        serving = single[:10] + multi
        tasks = {n: (["sst"] if n.startswith("sst") else ["sst", "qqp", "sts"]) for n in serving}
        requests = workload(tasks, Path(args.data_dir), args.requests, 0)
        runs = {}
        for label, max_batch in (("dynamic", args.max_batch), ("max_batch_1", 1)):
            server = Server([root / n for n in serving], root, token_file, max_batch, args.max_wait_ms)
            try:
                asyncio.run(drive(server.url, requests[:32], args.clients, args.seconds))  # warm-up, not counted
                runs[label] = asyncio.run(drive(server.url, requests, args.clients, args.seconds))
                runs[label]["max_batch"] = max_batch
            finally:
                server.stop()
            print(label, runs[label], file=sys.stderr, flush=True)
        sizes = {n: sum(f.stat().st_size for f in (root / n).rglob("*") if f.is_file()) for n in single}
        mem = memory(root, token_file, single, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    added = mem[-1]["rss_mb"] - mem[0]["rss_mb"]
    files = mem[-1]["adapter_files_mb"] - mem[0]["adapter_files_mb"]
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "cpu": platform.processor() or _cpu_model(), "cpu_native_bf16": cpu_supports_bf16(), "cores": os.cpu_count(),
        "sets_served": len(serving), "clients": args.clients, "runs": runs, "memory": mem,
        "ratios": {"throughput_dynamic_vs_max_batch_1": round(runs["dynamic"]["requests_per_s"]
                                                             / runs["max_batch_1"]["requests_per_s"], 2),
                   "rss_added_per_file_mb_1_to_100": round(added / files, 2) if files else None},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve.md").write_text(render(result))
    print(json.dumps(result["ratios"]))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def render(r: dict) -> str:
    d, s = r["runs"]["dynamic"], r["runs"]["max_batch_1"]
    lines = [
        "# Serving load test", "",
        f"Command: `{r['command']}` — CPU: {r['cpu']} ({'native bf16' if r['cpu_native_bf16'] else 'no native bf16: fp32 path'}), "
        f"{r['cores']} cores; server and load generator on the same machine.", "",
        f"{r['sets_served']} adapter sets loaded (10 single-task SST, 10 shared+task SST/QQP/STS), {r['clients']} "
        f"concurrent clients, requests of 1–4 inputs spread over sets and tasks (real dev sentences and pairs).", "",
        "| server | requests | req/s | rows/s | p50 ms | p95 ms | p99 ms | mean rows per forward pass | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in (("dynamic batching (--max-batch %d)" % d["max_batch"], d), ("--max-batch 1", s)):
        lines.append(f"| {label} | {run['requests']} | {run['requests_per_s']} | {run['rows_per_s']} | {run['p50_ms']} | "
                     f"{run['p95_ms']} | {run['p99_ms']} | {run['mean_batch_rows']} | {run['errors']} |")
    lines += ["", f"Throughput ratio, dynamic / --max-batch 1: **{r['ratios']['throughput_dynamic_vs_max_batch_1']}×**.",
              "", "Resident memory of the server process with single-task SST sets loaded through the admin API:", "",
              "| sets loaded | RSS MB | their adapter files MB |", "|---:|---:|---:|"]
    for m in r["memory"]:
        lines.append(f"| {m['sets']} | {m['rss_mb']} | {m['adapter_files_mb']} |")
    lines += ["", f"RSS added from 1 to 100 sets per MB of adapter files: **{r['ratios']['rss_added_per_file_mb_1_to_100']}**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
