"""`peft-mtl serve`: dynamic batching across sets and tasks gives base.predict's answers; every
endpoint and every bad input, against a real server on a free loopback port."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from peft_mtl.serving.worker import PredictJob, UnknownName, Worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["a fine film", "dull and long", "ok", "a gorgeous, witty, seductive movie", "bad"]
PAIRS = [("how do i learn python", "what is the best way to learn python"), ("a cat", "stock prices fell")]


def close(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b):
        if "score" in x:
            if abs(x["score"] - y["score"]) > 1e-4:
                return False
        elif x["label"] != y["label"] or max(abs(p - q) for p, q in zip(x["probabilities"], y["probabilities"])) > 1e-4:
            return False
    return len(a) == len(b)


def test_one_coalesced_batch_answers_every_set_and_task_like_base_predict(base):
    batches = []
    worker = Worker(base, max_batch=64, max_wait_ms=300, on_batch=batches.append)
    jobs = [PredictJob("multi", "sst", SENTENCES[:3]), PredictJob("single", "sst", SENTENCES[1:]),
            PredictJob("multi", "qqp", PAIRS), PredictJob("heads", "sts", PAIRS[:1]),
            PredictJob("multi", "sts", PAIRS), PredictJob("full", "sst", SENTENCES[:2]),
            PredictJob("heads", "sst", SENTENCES[:1]), PredictJob("multi", "sst", SENTENCES[4:])]
    try:
        futures = [worker.submit(job) for job in jobs]
        results = [f.result(timeout=60) for f in futures]
    finally:
        worker.stop()
    assert len(batches) == 1 and batches[0].jobs == len(jobs), "all requests went into one forward pass"
    for job, got in zip(jobs, results):
        assert close(got, base.predict(job.task, job.inputs, job.set)), (job.set, job.task)


def test_batches_stop_at_max_batch_rows_and_unknown_names_fail_alone(base):
    batches = []
    worker = Worker(base, max_batch=4, max_wait_ms=200, on_batch=batches.append)
    try:
        futures = [worker.submit(PredictJob("multi", "sst", SENTENCES[:3])) for _ in range(3)]
        bad = worker.submit(PredictJob("gone", "sst", SENTENCES[:1]))
        wrong_task = worker.submit(PredictJob("single", "qqp", [PAIRS[0]]))
        assert all(len(f.result(timeout=60)) == 3 for f in futures)
        with pytest.raises(UnknownName, match="loaded: multi, single, heads, full"):
            bad.result(timeout=60)
        with pytest.raises(UnknownName, match="has no task 'qqp'"):
            wrong_task.result(timeout=60)
    finally:
        worker.stop()
    assert max(b.rows for b in batches) <= 4


# ----------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(sets_root: Path, token_file: Path, *extra: str):
    """A real `peft-mtl serve` on a free loopback port; yields its URL; stopped by its own PID."""
    port = free_port()
    cmd = [sys.executable, "-m", "peft_mtl", "serve", f"multi={sets_root / 'multi'}", f"single={sets_root / 'single'}",
           "--port", str(port), "--max-batch", "16", "--max-wait-ms", "20", "--admin-token-file", str(token_file),
           "--sets-root", str(sets_root), "--max-inputs", "8", "--max-chars", "200", "--max-body-bytes", "20000",
           "--precision", "fp32", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> tuple[Path, str]:
    token = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(token)
    return path, token


@pytest.fixture(scope="module")
def server(sets_root, token_file):
    """The server on its default engine on a CPU: the multi-adapter ONNX graph."""
    for url in start_server(sets_root, token_file[0]):
        yield url, token_file[1]


@pytest.fixture(scope="module")
def torch_server(sets_root, token_file):
    for url in start_server(sets_root, token_file[0], "--engine", "torch"):
        yield url, token_file[1]


def test_predict_matches_base_predict_and_lists_sets(server, base):
    url, _ = server
    r = httpx.post(url + "/v1/predict", json={"set": "multi", "task": "qqp", "inputs": [list(p) for p in PAIRS]})
    assert r.status_code == 200 and r.json()["set"] == "multi" and r.json()["task"] == "qqp"
    assert close(r.json()["predictions"], base.predict("qqp", PAIRS, "multi"))
    r = httpx.post(url + "/v1/predict", json={"task": "sst", "inputs": SENTENCES})  # default set: the first loaded
    assert r.status_code == 200 and r.json()["set"] == "multi"
    sets = httpx.get(url + "/v1/sets").json()
    assert set(sets["sets"]) == {"multi", "single"} and sets["sets"]["multi"]["tasks"] == ["sst", "qqp", "sts"]
    assert sets["sets"]["multi"]["engine"] == "onnx fp32", "the default engine on a CPU is the multi-adapter graph"
    r = httpx.post(url + "/v1/ensemble", json={"sets": ["multi", "single"], "task": "sst", "inputs": SENTENCES[:2]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    from peft_mtl.inference.ensemble import ensemble_predict

    assert close(r.json()["predictions"], ensemble_predict(base, "sst", SENTENCES[:2], ["multi", "single"])), \
        "an ensemble on the graph (members as rows) answers like the PyTorch ensemble"
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    assert "/v1/predict" in httpx.get(url + "/openapi.json").json()["paths"]


def test_concurrent_requests_over_sets_and_tasks_are_batched_and_exact(server, base):
    import asyncio

    url, _ = server
    work = [("multi", "sst", SENTENCES[:2]), ("single", "sst", SENTENCES[2:]), ("multi", "sts", PAIRS),
            ("multi", "qqp", PAIRS[:1])] * 4

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/v1/predict", json={"set": s, "task": t, "inputs": [list(x) if isinstance(x, tuple) else x
                                                                                  for x in inputs]})
                for s, t, inputs in work])

    responses = asyncio.run(go())
    for (s, t, inputs), r in zip(work, responses):
        assert r.status_code == 200 and close(r.json()["predictions"], base.predict(t, inputs, s))
    metrics = httpx.get(url + "/metrics").text
    count = float(next(l for l in metrics.splitlines() if l.startswith("peft_mtl_batch_rows_count")).split()[-1])
    total = float(next(l for l in metrics.splitlines() if l.startswith("peft_mtl_batch_rows_sum")).split()[-1])
    assert total / count > 1.5, "concurrent requests must share forward passes"
    for name in ("peft_mtl_requests_total", "peft_mtl_request_seconds_bucket", "peft_mtl_queue_seconds_bucket",
                 "peft_mtl_loaded_sets", "peft_mtl_rows_total"):
        assert name in metrics, name


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    ({"set": "nope", "task": "sst", "inputs": ["x"]}, 404, "loaded: multi, single"),
    ({"set": "single", "task": "qqp", "inputs": [["a", "b"]]}, 404, "has no task 'qqp'"),
    ({"set": "multi", "task": "sst", "inputs": ["x"] * 9}, 413, "at most 8"),
    ({"set": "multi", "task": "sst", "inputs": ["x" * 201]}, 422, "over 200 characters"),
    ({"set": "multi", "task": "sst", "inputs": []}, 422, "inputs is empty"),
    ({"set": "multi", "task": "qqp", "inputs": ["not a pair"]}, 422, "sentence pair"),
    ({"set": "multi", "task": "sst", "inputs": [["a", "b", "c"]]}, 422, "a pair is [first, second]"),
    ({"set": "multi", "task": "sst"}, 422, "inputs"),
    ({"set": "multi", "task": "sst", "inputs": ["x" * 100] * 8, "pad": "y" * 30000}, 413, "bytes"),
])
def test_bad_requests_get_a_clear_status_and_the_server_lives_on(server, body, status, message):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(url + "/v1/predict", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url + "/v1/predict", json=body)
    assert r.status_code == status and message in str(r.json()["detail"]), r.text
    assert httpx.get(url + "/healthz").status_code == 200


def test_admin_endpoints_need_the_token_and_stay_inside_the_sets_root(server, sets_root):
    url, token = server
    load = {"name": "heads", "folder": "heads"}
    assert httpx.post(url + "/v1/sets", json=load).status_code == 401
    assert httpx.post(url + "/v1/sets", json=load, headers={"Authorization": "Bearer wrong"}).status_code == 403
    auth = {"Authorization": f"Bearer {token}"}
    outside = httpx.post(url + "/v1/sets", json={"name": "x", "folder": "../../etc"}, headers=auth)
    assert outside.status_code == 403 and "outside the sets root" in outside.json()["detail"]
    pickled = sets_root / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    r = httpx.post(url + "/v1/sets", json={"name": "p", "folder": "pickled"}, headers=auth)
    assert r.status_code == 422 and "only safetensors" in r.json()["detail"]
    assert httpx.delete(url + "/v1/sets/single").status_code == 401


def test_load_and_unload_while_serving_never_breaks_an_in_flight_request(server, base):
    url, token = server
    auth = {"Authorization": f"Bearer {token}"}
    failures, answered = [], []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"set": "multi", "task": "sst", "inputs": SENTENCES[:2]})
                if r.status_code != 200 or not close(r.json()["predictions"], base.predict("sst", SENTENCES[:2], "multi")):
                    failures.append(r.text)
                answered.append(1)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            r = httpx.post(url + "/v1/sets", json={"name": "extra", "folder": "full"}, headers=auth, timeout=60)
            assert r.status_code == 201 and r.json()["tasks"] == ["sst"], r.text
            assert httpx.post(url + "/v1/sets", json={"name": "extra", "folder": "full"},
                              headers=auth).status_code == 409
            p = httpx.post(url + "/v1/predict", json={"set": "extra", "task": "sst", "inputs": ["x"]})
            assert p.status_code == 200
            assert httpx.delete(url + "/v1/sets/extra", headers=auth, timeout=60).status_code == 200
            assert httpx.post(url + "/v1/predict", json={"set": "extra", "task": "sst",
                                                         "inputs": ["x"]}).status_code == 404
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert answered and not failures, failures[:2]


@pytest.mark.parametrize("engine", ["server", "torch_server"])
def test_a_set_hot_loaded_answers_with_its_own_adapters_and_unloads_to_404(engine, request, base, sets_root):
    """On either engine: load → use → unload → 404 for LoRA sets (the graph takes their factors as
    inputs: no rebuild), the name reused by a different set answers as that set, and clients of the
    other sets keep getting exact answers throughout."""
    url, token = request.getfixturevalue(engine)
    auth = {"Authorization": f"Bearer {token}"}
    failures, answered = [], []
    stop = threading.Event()
    expected = {("multi", "qqp"): base.predict("qqp", PAIRS, "multi"), ("single", "sst"): base.predict("sst", SENTENCES, "single")}

    def client(name: str, task: str):
        inputs = [list(p) for p in PAIRS] if task == "qqp" else SENTENCES
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"set": name, "task": task, "inputs": inputs})
                if r.status_code != 200 or not close(r.json()["predictions"], expected[(name, task)]):
                    failures.append(r.text)
                answered.append(1)

    threads = [threading.Thread(target=client, args=key) for key in expected]
    for t in threads:
        t.start()
    try:
        for folder in ("single", "multi", "heads"):  # the same name for three different sets in turn
            r = httpx.post(url + "/v1/sets", json={"name": "hot", "folder": folder}, headers=auth, timeout=60)
            assert r.status_code == 201, r.text
            p = httpx.post(url + "/v1/predict", json={"set": "hot", "task": "sst", "inputs": SENTENCES}, timeout=60)
            assert p.status_code == 200 and close(p.json()["predictions"], base.predict("sst", SENTENCES, folder)), folder
            assert httpx.delete(url + "/v1/sets/hot", headers=auth, timeout=60).status_code == 200
            gone = httpx.post(url + "/v1/predict", json={"set": "hot", "task": "sst", "inputs": ["x"]})
            assert gone.status_code == 404 and "no set named 'hot'" in gone.text
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert answered and not failures, failures[:2]


def test_admin_is_off_without_a_token_file(base):
    from fastapi.testclient import TestClient

    from peft_mtl.serving import ServeConfig, create_app

    app = create_app(base, ServeConfig())
    with TestClient(app) as client:
        r = client.post("/v1/sets", json={"name": "x", "folder": "y"}, headers={"Authorization": "Bearer abc"})
        assert r.status_code == 403 and "--admin-token-file" in r.json()["detail"]
        assert client.delete("/v1/sets/multi").status_code == 403


def test_a_batch_splits_into_two_passes_only_when_that_saves_padding():
    from peft_mtl.serving.worker import split_by_length

    def block(name, rows, length):
        return (name, "sst", [0], [[{"input_ids": [1] * length}] * rows])

    short, long_ = block("a", 20, 8), block("b", 4, 60)
    assert [[b[0] for b in p] for p in split_by_length([short, long_])] == [["a"], ["b"]]
    similar = [block("a", 10, 20), block("b", 10, 24)]
    assert len(split_by_length(similar)) == 1
    assert len(split_by_length([short])) == 1


# -- reliability: one bad request never fails its neighbours ----------------------------------

SURROGATE = '{"set": "multi", "task": "sst", "inputs": ["\\ud800 bad"]}'  # valid JSON, not valid text


def test_a_bad_request_mixed_into_concurrent_good_ones_fails_alone(server, base):
    """Regression: a lone surrogate broke tokenisation of the whole coalesced batch (111 of 361 good
    requests failed with 500); now it gets 422 naming its input, and every good answer is exact."""
    import asyncio

    url, _ = server
    good = [("multi", "sst", SENTENCES[:2]), ("single", "sst", SENTENCES[2:]), ("multi", "sts", PAIRS)] * 8

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            calls = [client.post("/v1/predict", json={"set": s, "task": t, "inputs": [list(x) if isinstance(x, tuple)
                                                                                      else x for x in inputs]})
                     for s, t, inputs in good]
            bad = [client.post("/v1/predict", content=SURROGATE.encode(), headers={"content-type": "application/json"})
                   for _ in range(8)]
            return await asyncio.gather(*calls, *bad)

    responses = asyncio.run(go())
    for (s, t, inputs), r in zip(good, responses):
        assert r.status_code == 200 and close(r.json()["predictions"], base.predict(t, inputs, s)), r.text
    for r in responses[len(good):]:
        assert r.status_code == 422 and "input 0" in r.text, r.text


def test_the_worker_answers_each_request_alone_when_a_shared_pass_fails(base, monkeypatch):
    """Text the tokenizer refuses fails its own job; a pass that fails for another reason is retried
    job by job, so only the job that breaks it fails."""
    from peft_mtl.serving.worker import InvalidInput

    real = Worker._grouped_pass

    def poisoned(self, jobs):
        if any("poison" in str(j.inputs) for j in jobs):
            raise RuntimeError("a pass that cannot run")
        return real(self, jobs)

    monkeypatch.setattr(Worker, "_grouped_pass", poisoned)
    worker = Worker(base, max_batch=64, max_wait_ms=200)
    try:
        jobs = [PredictJob("multi", "sst", SENTENCES[:2]), PredictJob("multi", "sst", ["\ud800 bad"]),
                PredictJob("single", "sst", ["poison"]), PredictJob("multi", "sts", PAIRS)]
        futures = [worker.submit(j) for j in jobs]
        assert close(futures[0].result(60), base.predict("sst", SENTENCES[:2], "multi"))
        with pytest.raises(InvalidInput, match="cannot be tokenised"):
            futures[1].result(60)
        with pytest.raises(RuntimeError, match="cannot run"):
            futures[2].result(60)
        assert close(futures[3].result(60), base.predict("sts", PAIRS, "multi"))
    finally:
        worker.stop()


def test_non_finite_numbers_in_a_request_are_refused(server):
    """Regression: NaN ensemble weights answered 200 with null probabilities."""
    url, _ = server
    for weights in ("[NaN, 1]", "[Infinity, 1]", "[-1, 1]"):
        body = f'{{"sets": ["multi", "single"], "task": "sst", "inputs": ["a fine film"], "weights": {weights}}}'
        r = httpx.post(url + "/v1/ensemble", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, (weights, r.text)
    assert httpx.get(url + "/healthz").status_code == 200


def test_a_set_with_a_link_out_of_the_sets_root_is_refused(server, sets_root, tmp_path):
    """Regression: the folder was checked, the files in it were not."""
    import shutil

    url, token = server
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not for you")
    linked = sets_root / "linked"
    shutil.copytree(sets_root / "single", linked, dirs_exist_ok=True)
    (linked / "head.safetensors").unlink(missing_ok=True)
    (linked / "head.safetensors").symlink_to(outside)
    r = httpx.post(url + "/v1/sets", json={"name": "linked", "folder": "linked"},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and "outside the sets root" in r.json()["detail"], r.text


def test_schema_fuzzing_finds_no_server_error_and_a_schema_that_matches(server, tmp_path):
    """schemathesis against the server's own OpenAPI schema: every endpoint, admin ones with and
    without the token, valid and invalid requests → no 5xx, responses as documented, server healthy."""
    pytest.importorskip("schemathesis")
    import json

    url, token = server
    (tmp_path / "token").write_text(token)
    out = tmp_path / "fuzz.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "server_fuzz.py"), "--url", url, "--token-file",
                             str(tmp_path / "token"), "--examples", "40", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["cases"] >= 300, report["cases"]
    assert report["server_errors"] == 0 and report["failures"] == {} and report["healthy_after"], report
    assert result.returncode == 0


def test_a_folder_name_with_a_nul_byte_is_refused_not_a_server_error(server):
    """Regression (found by the long schema-fuzzing run): Path.resolve() raised on a NUL byte → 500."""
    url, token = server
    r = httpx.post(url + "/v1/sets", json={"name": "x", "folder": "a\u0000b"},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 422 and "not a usable folder name" in r.json()["detail"], r.text
