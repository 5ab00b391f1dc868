"""Schema fuzzing of a running `peft-mtl serve` with schemathesis, against its own OpenAPI schema.

Every operation, with and without the admin token, with schema-valid ("positive") and
schema-violating ("negative") requests. Checks: no 5xx (``not_a_server_error``) and the
conformance checks — the status code, content type and body of every response are the ones the
schema documents. The server must answer /healthz at the end.

    python benchmarks/server_fuzz.py --url http://127.0.0.1:8000 --token-file TOKEN --examples 300 \\
        --json reports/fuzz.json

The test suite runs it with a few hundred cases (tests/test_serve.py); reports/reliability.md
records a long run (≥ 5,000 cases).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(url: str, token: str | None, examples: int) -> dict:
    """``examples`` cases per (operation, auth, generation mode); returns counts and every failure."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: Counter = Counter()
    failures: Counter = Counter()
    cases = 0
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for auth in (None, token):
            headers = {"Authorization": f"Bearer {auth}"} if auth else None
            for mode in ("positive", "negative"):
                strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

                @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def one(case):
                    nonlocal cases
                    cases += 1
                    response = case.call(base_url=url, headers=headers, timeout=60)
                    statuses[response.status_code] += 1
                    try:
                        case.validate_response(response, checks=CHECKS)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as err:  # every failure (an exception group too) is counted, none stops the run
                        failures[f"{operation.label} [{mode}, {'token' if auth else 'no token'}]: "
                                 f"{str(err).strip().splitlines()[0][:200]}"] += 1

                try:
                    one()
                except Unsatisfiable:  # no schema-violating request exists (an operation without inputs)
                    pass
    healthy = httpx.get(url + "/healthz", timeout=30).status_code == 200
    return {"cases": cases, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500), "failures": dict(failures),
            "healthy_after": healthy, "seconds": round(time.perf_counter() - started, 1),
            "examples_per_operation_mode": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", default=None)
    parser.add_argument("--examples", type=int, default=300, help="cases per operation, auth and mode")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    result = fuzz(args.url, token, args.examples)
    result["command"] = "python benchmarks/server_fuzz.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("cases", "server_errors", "healthy_after")} |
                     {"failures": len(result["failures"])}))
    return 0 if not result["server_errors"] and not result["failures"] and result["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
