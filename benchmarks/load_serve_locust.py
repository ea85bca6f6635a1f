"""The locust user that ``benchmarks/load_serve.py`` runs headless against examples/serve.py (not run on its own).

Each simulated client POSTs one request body (prepared by load_serve.py: one PNG as multipart) to
``/predict`` again and again with no wait between requests (a closed loop), and counts a request as
an error unless it is answered 200 with exactly one prediction. Every request's latency is kept and
written to ``LOAD_SERVE_TIMES`` (JSON) when locust quits, so percentiles are exact (locust's own CSV
rounds them). Bounded: locust's ``--run-time`` ends the run, and every client stops after
``LOAD_SERVE_MAX_REQUESTS`` requests in all. Only localhost is allowed as ``--host``.

Environment: LOAD_SERVE_BODY (file with the body), LOAD_SERVE_CTYPE (its Content-Type),
LOAD_SERVE_TIMES (where to write the latencies), LOAD_SERVE_MAX_REQUESTS (default 1,000,000).
"""
from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

BODY = open(os.environ["LOAD_SERVE_BODY"], "rb").read()  # noqa: SIM115 - read once at import
HEADERS = {"Content-Type": os.environ["LOAD_SERVE_CTYPE"]}
MAX_REQUESTS = int(os.environ.get("LOAD_SERVE_MAX_REQUESTS", "1000000"))
RECORDS: list[tuple[float, float, bool]] = []  # (start time, latency ms, ok)
ERRORS: dict[str, int] = {}


@events.test_start.add_listener
def _localhost_only(environment, **_):
    host = urlparse(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load_serve_locust: refusing to load {environment.host!r}; localhost only")


@events.quitting.add_listener
def _write_times(environment, **_):
    with open(os.environ["LOAD_SERVE_TIMES"], "w") as f:
        json.dump({"records": RECORDS, "errors": ERRORS}, f)


class Client(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self):
        if len(RECORDS) >= MAX_REQUESTS:
            raise StopUser()
        start, ok, why = time.time(), False, None
        t0 = time.perf_counter()
        with self.client.post("/predict", data=BODY, headers=HEADERS, catch_response=True) as r:
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                why = f"HTTP {r.status_code}"
            else:
                try:
                    ok = len(r.json()["predictions"]) == 1
                    why = None if ok else "not one prediction"
                except Exception as exc:  # noqa: BLE001 - any malformed answer is an error
                    why = f"bad answer: {type(exc).__name__}"
            if ok:
                r.success()
            else:
                r.failure(why)
                ERRORS[why] = ERRORS.get(why, 0) + 1
        RECORDS.append((start, ms, ok))
