"""Open-loop load test of `peft-mtl serve`: each engine's highest request rate with p99 ≤ 250 ms.

    python benchmarks/serve_load.py [--sets 100] [--seconds 15] [--out reports] [--work DIR]

Makes ``--sets`` adapter sets (90 % single-task SST, 10 % shared+task SST/QQP/STS, each the
shipped adapters/sst or adapters/all with its LoRA factors perturbed so that every set has its
own weights) and serves all of them from one real server (loopback, free port) per engine:

- ``torch --max-batch 1``: PyTorch, no coalescing;
- ``torch coalesced``: PyTorch's grouped pass (``--engine torch``);
- ``onnx fp32`` / ``onnx int8 coalesced``: the multi-adapter graph (``--engine onnx [--int8]``);
- ``merged per-set int8 graphs``: the peers' approach, one merged int8 ONNX graph per (set, task)
  (``--engine torch --int8``; graphs pre-built before timing, sessions kept for the 16 most
  recently used as the server does).

Traffic is open-loop: Poisson arrivals at a fixed rate, each request sent at its time whether
or not earlier ones were answered (latency counts from the scheduled time), set popularity
Zipf-distributed (s = 1.1: a few hot sets, a long tail), a task of the set uniformly, 1–4 real
dev inputs. For each engine the rate doubles from 4 req/s until p99 exceeds 250 ms (or a request
fails), then bisects three times; a rate is *sustained* when p99 ≤ 250 ms with no error. The load
generator is this process (its CPU share of the machine per step is reported); the server is a
separate process. Then the resident memory of 1 and of 100 single-task sets per engine, every
set used once. Writes OUT/serve.json and OUT/serve.md; each server is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
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
P99_TARGET_MS = 250.0
ZIPF_S = 1.1


def make_sets(template: Path, root: Path, count: int, prefix: str, seed: int) -> list[str]:
    """``count`` copies of a set folder whose LoRA factors are perturbed (distinct weights, same shapes)."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        name = f"{prefix}{i:03d}"
        target = root / name
        names.append(name)
        if (target / "peft_mtl.json").is_file():
            continue  # made by an earlier run with the same --work folder
        shutil.copytree(template, target)
        for f in target.rglob("adapter_model.safetensors"):
            tensors = load_file(str(f))
            tensors = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=rng) for k, v in tensors.items()}
            save_file(tensors, str(f), metadata={"format": "pt"})
    return names


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, sets: list[Path], root: Path, token_file: Path, max_batch: int, max_wait_ms: float,
                 extra: list[str] | None = None, env: dict | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "peft_mtl", "serve", *[f"{p.name}={p}" for p in sets], "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--sets-root", str(root),
               "--admin-token-file", str(token_file), *(extra or [])]
        self.log = Path(tempfile.mkstemp(prefix="peft_mtl_serve_", suffix=".log")[1])
        with self.log.open("w") as log:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
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


def dev_pool(data_dir: Path) -> dict[str, list]:
    from peft_mtl.data.loading import load_split, task_file
    from peft_mtl.data.tasks import get_task

    pool = {}
    for t in ("sst", "qqp", "sts"):
        spec = get_task(t)
        examples = load_split(task_file(data_dir, spec, "dev"), spec).examples
        pool[t] = [e.texts[0] if len(e.texts) == 1 else list(e.texts) for e in examples]
    return pool


def zipf_traffic(sets: dict[str, list[str]], pool: dict[str, list], count: int, seed: int) -> list[dict]:
    """Requests whose set follows a Zipf law over a shuffled popularity order; task uniform; 1–4 inputs."""
    rng = random.Random(seed)
    order = sorted(sets)
    rng.shuffle(order)
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(order))]
    names = rng.choices(order, weights=weights, k=count)
    out = []
    for name in names:
        task = rng.choice(sets[name])
        out.append({"set": name, "task": task, "inputs": rng.sample(pool[task], rng.randint(1, 4))})
    return out


async def open_loop(url: str, rate: float, seconds: float, requests: list[dict], seed: int,
                    timeout: float = 10.0) -> dict:
    """Poisson arrivals at ``rate`` req/s for ``seconds``; latency from each request's scheduled time."""
    import httpx

    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while True:
        t += rng.exponential(1 / rate)
        if t >= seconds:
            break
        times.append(t)
    latencies: list[float] = []
    errors, rows = 0, 0
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

    async def one(http, at: float, body: dict) -> None:
        nonlocal errors, rows
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        try:
            r = await http.post("/v1/predict", json=body)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            rows += len(body["inputs"])
            latencies.append(time.perf_counter() - (start + at))
        else:
            errors += 1
            latencies.append(math.inf)

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        start = time.perf_counter() + 0.05
        offset = seed * 997  # each step its own slice of the traffic
        await asyncio.gather(*[one(http, at, requests[(offset + i) % len(requests)]) for i, at in enumerate(times)])
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
    lat = np.array(latencies) * 1000
    pct = {f"p{q}_ms": (round(float(np.percentile(lat, q)), 1) if np.isfinite(np.percentile(lat, q)) else None)
           for q in (50, 90, 99)}
    p99 = pct["p99_ms"]
    return {"rate": round(rate, 2), "requests": len(times), "errors": errors, "rows": rows,
            "achieved_per_s": round((len(times) - errors) / seconds, 2), **pct,
            "sustained": errors == 0 and p99 is not None and p99 <= P99_TARGET_MS,
            "generator_cpu_share": round(cpu / wall / (os.cpu_count() or 1), 3)}


def drain(url: str, probe: dict, limit_s: float = 180) -> None:
    """Wait until the server answers a one-input request quickly again (its queue is empty)."""
    import httpx

    deadline = time.time() + limit_s
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            httpx.post(url + "/v1/predict", json=probe, timeout=60)
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 < 0.1:
            return
        time.sleep(1.0)


def search(url: str, requests: list[dict], seconds: float, probe: dict, log) -> list[dict]:
    """Double the rate from 4 req/s until it is not sustained, then bisect three times."""
    steps, good, bad, rate, seed = [], None, None, 4.0, 0
    while True:
        seed += 1
        result = asyncio.run(open_loop(url, rate, seconds, requests, seed))
        steps.append(result)
        log(result)
        drain(url, probe)
        if result["sustained"]:
            good = rate
        else:
            bad = rate
        if bad is None:
            if rate >= 512:
                break
            rate *= 2
            continue
        if good is None:  # not even 4 req/s: try lower once
            if rate <= 1:
                break
            rate /= 2
            continue
        if len([s for s in steps if s["rate"] > good and s["rate"] < bad]) >= 3 or bad / good < 1.1:
            break
        rate = math.sqrt(good * bad)
    return steps


ENGINES = {  # label: (serve flags, --max-batch)
    "torch --max-batch 1": (["--engine", "torch"], 1),
    "torch coalesced": (["--engine", "torch"], 32),
    "onnx fp32 coalesced": (["--engine", "onnx"], 32),
    "onnx int8 coalesced": (["--engine", "onnx", "--int8"], 32),
    "merged per-set int8 graphs": (["--engine", "torch", "--int8"], 32),
}


def warm(url: str, sets: dict[str, list[str]], pool: dict[str, list]) -> None:
    """One request per (set, task): builds what each engine builds on first use (entries, graphs)."""
    import httpx

    for name, tasks in sets.items():
        for task in tasks:
            r = httpx.post(url + "/v1/predict", json={"set": name, "task": task, "inputs": pool[task][:2]}, timeout=600)
            r.raise_for_status()


def memory(root: Path, token_file: Path, names: list[str], sizes: dict[str, int], flags: list[str],
           env: dict) -> dict:
    """RSS with 1 single-task set, then with all ``names`` loaded through the admin API, each used once."""
    import httpx

    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    server = Server([root / names[0]], root, token_file, 32, 5, flags, env)
    try:
        probe = {"set": names[0], "task": "sst", "inputs": ["warm up"]}
        httpx.post(server.url + "/v1/predict", json=probe, timeout=600).raise_for_status()
        time.sleep(2)  # the server trims its heap every second
        one = rss_mb(server.proc.pid)
        for name in names[1:]:
            httpx.post(server.url + "/v1/sets", json={"name": name, "folder": name}, headers=auth,
                       timeout=600).raise_for_status()
            httpx.post(server.url + "/v1/predict", json={"set": name, "task": "sst", "inputs": ["warm up"]},
                       timeout=600).raise_for_status()
        time.sleep(2)
        many = rss_mb(server.proc.pid)
    finally:
        server.stop()
    files = sum(sizes[n] for n in names[1:]) / 2**20
    return {"rss_1_mb": round(one, 1), f"rss_{len(names)}_mb": round(many, 1), "sets": len(names),
            "added_files_mb": round(files, 1), "added_rss_per_file_mb": round((many - one) / files, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=15, help="length of each fixed-rate step")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of the labels")
    parser.add_argument("--work", default=None, help="keep the generated sets and graph cache here (reused)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default="reports")
    args = parser.parse_args()

    from peft_mtl.device import cpu_supports_bf16

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="peft_mtl_serve_"))
    root = work / "sets"
    root.mkdir(parents=True, exist_ok=True)
    token_file = work / "token"
    if not token_file.is_file():
        token_file.write_text(secrets.token_urlsafe(24))
    env = dict(os.environ, PEFT_MTL_CACHE=str(work / "cache"))
    n_multi = max(1, args.sets // 10)
    single_all = make_sets(REPO / "adapters" / "sst", root, max(100, args.sets - n_multi), "s", 1)
    single = single_all[:args.sets - n_multi]
    multi = make_sets(REPO / "adapters" / "all", root, n_multi, "m", 2)
    sets = {n: ["sst"] for n in single} | {n: ["sst", "qqp", "sts"] for n in multi}
    pool = dev_pool(Path(args.data_dir))
    requests = zipf_traffic(sets, pool, 20000, 0)
    probe = {"set": single[0], "task": "sst", "inputs": ["ok"]}
    sizes = {n: sum(f.stat().st_size for f in (root / n).rglob("*") if f.is_file()) for n in single_all}
    runs, mem = {}, {}
    labels = [e.strip() for e in args.engines.split(",") if e.strip()]
    for label in labels:
        flags, max_batch = ENGINES[label]
        t0 = time.time()
        server = Server([root / n for n in sets], root, token_file, max_batch, 5, flags, env)
        started = time.time() - t0
        try:
            t0 = time.time()
            warm(server.url, sets, pool)
            warmed = time.time() - t0
            rss = rss_mb(server.proc.pid)
            steps = search(server.url, requests, args.seconds, probe,
                           lambda r, label=label: print(label, json.dumps(r), file=sys.stderr, flush=True))
        finally:
            server.stop()
        best = max((s["rate"] for s in steps if s["sustained"]), default=0.0)
        runs[label] = {"flags": flags, "max_batch": max_batch, "start_s": round(started, 1),
                       "warm_up_s": round(warmed, 1), "rss_serving_mb": round(rss, 1), "steps": steps,
                       "highest_sustained_rate": best}
        print(label, "highest sustained", best, file=sys.stderr, flush=True)
        if not args.no_memory and label != "torch --max-batch 1":  # same memory as torch coalesced
            mem[label] = memory(root, token_file, single_all[:100], sizes, flags, env)
            print(label, "memory", json.dumps(mem[label]), file=sys.stderr, flush=True)

    graph_files = sorted((work / "cache" / "int8").glob("*/model.int8.onnx"))
    per_graph_mb = (sum(f.stat().st_size for f in graph_files) / len(graph_files) / 2**20) if graph_files else None
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "cpu": _cpu_model(), "cpu_native_bf16": cpu_supports_bf16(), "cores": os.cpu_count(),
        "server_threads": "torch intra-op 2 (default), ONNX Runtime intra-op 2 (torch.get_num_threads())",
        "sets": len(sets), "single_task_sets": len(single), "multi_task_sets": len(multi), "zipf_s": ZIPF_S,
        "step_seconds": args.seconds, "p99_target_ms": P99_TARGET_MS, "runs": runs, "memory": mem,
        "merged_graph_mb_each": round(per_graph_mb, 1) if per_graph_mb else None,
        "merged_graphs_for_all_sets_mb": round(per_graph_mb * sum(len(t) for t in sets.values()), 1)
        if per_graph_mb else None,
    }
    result["ratios"] = ratios({k: v["highest_sustained_rate"] for k, v in runs.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve.md").write_text(render(result))
    print(json.dumps(result["ratios"]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def ratios(rate: dict[str, float]) -> dict[str, float]:
    """Each engine's highest sustained rate over torch --max-batch 1's and over torch coalesced's."""
    out = {}
    for ref in ("torch --max-batch 1", "torch coalesced"):
        for label, value in rate.items():
            if rate.get(ref) and label != ref and not (label == "torch --max-batch 1"):
                out[f"{label} / {ref}"] = round(value / rate[ref], 2)
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def render(r: dict) -> str:
    lines = [
        "# Serving under open-loop traffic", "",
        f"Command: `{r['command']}` — CPU: {r['cpu']} "
        f"({'native bf16: AVX512-BF16/AMX' if r['cpu_native_bf16'] else 'no native bf16 (AVX2-class)'}), "
        f"{r['cores']} cores; {r['server_threads']}. The load generator is the benchmark process on the same "
        f"machine (its CPU share per step below).", "",
        f"{r['sets']} adapter sets loaded ({r['single_task_sets']} single-task SST, {r['multi_task_sets']} shared+task "
        f"SST/QQP/STS), popularity Zipf (s = {r['zipf_s']}), requests of 1–4 real dev inputs; Poisson arrivals at a "
        f"fixed rate for {r['step_seconds']:g} s per step, latency from each request's scheduled send time.", "",
        f"## Highest rate sustained with p99 ≤ {r['p99_target_ms']:g} ms", "",
        "| engine | highest sustained req/s | server start s | warm-up s |", "|---|---:|---:|---:|",
    ]
    for label, run in r["runs"].items():
        lines.append(f"| {label} | **{run['highest_sustained_rate']:g}** | {run['start_s']} | {run['warm_up_s']} |")
    lines += ["", "Ratios of the highest sustained rates:", ""] + [f"- {k}: **{v}×**" for k, v in r["ratios"].items()] + ["",
              "## Every step", "",
              "| engine | offered req/s | answered req/s | p50 ms | p90 ms | p99 ms | errors | sustained | generator CPU share |",
              "|---|---:|---:|---:|---:|---:|---:|:-:|---:|"]
    for label, run in r["runs"].items():
        for s in sorted(run["steps"], key=lambda s: s["rate"]):
            lines.append(f"| {label} | {s['rate']} | {s['achieved_per_s']} | {s['p50_ms']} | {s['p90_ms']} | "
                         f"{s['p99_ms']} | {s['errors']} | {'yes' if s['sustained'] else 'no'} | "
                         f"{s['generator_cpu_share']} |")
    if r["memory"]:
        lines += ["", "## Memory: 100 single-task sets resident, each used once", "",
                  "| engine | RSS, 1 set MB | RSS, 100 sets MB | their adapter files MB (99 added) | added RSS per MB of files |",
                  "|---|---:|---:|---:|---:|"]
        for label, m in r["memory"].items():
            lines.append(f"| {label} | {m['rss_1_mb']} | {m['rss_%d_mb' % m['sets']]} | {m['added_files_mb']} | "
                         f"**{m['added_rss_per_file_mb']}** |")
    if r.get("merged_graph_mb_each"):
        lines += ["", f"The merged per-set int8 graphs are {r['merged_graph_mb_each']} MB each on disk: holding one per "
                      f"(set, task) of these {r['sets']} sets resident takes {r['merged_graphs_for_all_sets_mb']} MB "
                      f"(the server keeps the 16 most recently used sessions open and reopens the others)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
