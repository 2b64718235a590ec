#!/usr/bin/env python3
"""Where the time goes: the service and the floor app, in this process, one thread,
through Flask's test client (no gunicorn, no sockets, no wrk), on the same distinct
token pairs, then a cProfile of the service's token endpoint.

    python bench/inprocess.py [--n 2000] [--profile-lines 35]

A diagnostic for bench/run.py's ratio: it shows the service's per-exchange cost
above the floor's, and which functions account for it. The service is set up the
same way as in run.py (the CLI, a fresh database, 1,000 links; `--backend postgres` for
PostgreSQL + Redis).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402, F401  (re-executes under the project's venv if needed; puts the bench package on the path)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import importlib  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench.backends import PG_ADMIN, REDIS_URL, open_backend  # noqa: E402
from bench.common import FLOOR_DIR  # noqa: E402
from bench.load import busy_seconds, wait_quiet  # noqa: E402
from bench.workload import fake_ehr, make_bodies  # noqa: E402
from bench.world import World  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="exchanges per app (default 2000)")
    p.add_argument("--links", type=int, default=1000)
    p.add_argument("--profile-lines", type=int, default=35)
    p.add_argument("--dump", help="also save the raw cProfile stats here (e.g. bench/out/service.prof)")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--pg-admin", default=PG_ADMIN)
    p.add_argument("--redis", default=REDIS_URL)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="te-inproc-"))
    ehr = fake_ehr()
    backend = open_backend(a, tmp)
    world = World(tmp, ehr, backend=backend)
    try:
        world.setup_world(a.links)
        files = make_bodies(ehr, [(tag, n, a.links, "std") for tag, n in
                                  (("warm", 200), ("meas", a.n), ("stage", a.n), ("prof", a.n))], tmp)
        bodies = {k: v.read_text().split("\n")[:-1] for k, v in files.items()}
        headers = {"Authorization": world.auth, "Content-Type": "application/x-www-form-urlencoded"}

        os.environ.update({k: v for k, v in world.svc_env.items() if k.startswith("TOKEN_EXCHANGE_")})
        from token_exchange import create_app
        svc = create_app().test_client()
        os.environ["FLOOR_EHR_PEM"] = world.floor_env["FLOOR_EHR_PEM"]
        sys.path.insert(0, str(FLOOR_DIR))
        floor = importlib.import_module("floor_app").app.test_client()

        cpu = {}

        def drive(client, items):
            t, c = time.perf_counter(), time.process_time()
            for b in items:
                r = client.post("/token", data=b, headers=headers)
                if r.status_code != 200:
                    raise SystemExit(f"HTTP {r.status_code}: {r.get_data(as_text=True)[:500]}")
            cpu[client] = cpu.get(client, 0.0) + (time.process_time() - c) / len(items)
            return (time.perf_counter() - t) / len(items)

        wait_quiet(120)
        b0, o0 = busy_seconds(), time.process_time()
        t0 = time.perf_counter()
        half = len(bodies["warm"]) // 2
        drive(svc, bodies["warm"][:half])
        drive(floor, bodies["warm"][half:])
        # Alternate in slices so drift on a shared machine hits both alike.
        s_t = f_t = 0.0
        cpu.clear()
        slices = 10
        step = a.n // slices
        for i in range(slices):
            part = bodies["meas"][i * step:(i + 1) * step]
            s_t += drive(svc, part) / slices
            f_t += drive(floor, part) / slices
        print(f"in-process, one thread, {a.n} distinct exchanges each:")
        print(f"  floor   {f_t * 1e6:8.0f} µs/exchange  ({1 / f_t:6.0f}/s on one core)")
        print(f"  service {s_t * 1e6:8.0f} µs/exchange  ({1 / s_t:6.0f}/s on one core)")
        print(f"  service - floor = {(s_t - f_t) * 1e6:.0f} µs; service / floor time = {s_t / f_t:.2f}")
        print(f"  CPU of this process per exchange: floor {cpu[floor] / slices * 1e6:.0f} µs, service "
              f"{cpu[svc] / slices * 1e6:.0f} µs (the rest of the service's time: waiting on {backend.name})")
        wall = time.perf_counter() - t0
        print(f"  (other processes used {max(0.0, busy_seconds() - b0 - (time.process_time() - o0)) / wall:.2f} "
              "cores meanwhile)")

        # Stage timings: wrap a few of the service's own functions (in this process only).
        ext = svc.application.extensions["token_exchange"]
        from token_exchange import keys as keymod
        stages, originals = {}, []

        def wrap(obj, name, label):
            f = getattr(obj, name, None)
            if f is None:
                return
            originals.append((obj, name, obj.__dict__.get(name), name in obj.__dict__))
            calls = stages.setdefault(label, [])

            def timed(*args, **kw):
                t = time.perf_counter()
                try:
                    return f(*args, **kw)
                finally:
                    calls.append(time.perf_counter() - t)
            setattr(obj, name, timed)
        wrap(ext.pipeline, "decide", "pipeline.decide (all of /token but HTTP and the form)")
        wrap(ext.pipeline, "authenticator", "  client authentication")
        wrap(ext.pipeline.deps.validator, "validate", "  validate subject + actor JWTs")
        wrap(ext.store, "find_link", "  store.find_link (patient link SELECT)")
        wrap(keymod.ActiveKey, "mint", "  mint (RS256 sign)")
        wrap(ext.store, "send_audit", "  store.send_audit (INSERT started)")
        from token_exchange.store import AuditRecording
        wrap(AuditRecording, "committed", "  AuditRecording.committed (the wait for the COMMIT, after signing)")
        from token_exchange import endpoints, pipeline
        from token_exchange.grants import TokenExchangeGrant
        for step, method in TokenExchangeGrant.STEPS:
            wrap(TokenExchangeGrant, method, f"  grant step: {step}")
        wrap(TokenExchangeGrant, "decide_token", "  grant.decide_token (claims, body, the record complete)")
        wrap(pipeline, "log_decision", "  the decision's log line")
        wrap(pipeline, "read_form", "forms.read_form (size, type, parse)")
        wrap(endpoints, "json_answer", "endpoints.json_answer")
        wrap(ext.metrics, "exchange", "metrics.exchange")
        wrap(ext.metrics, "observe", "metrics.observe")
        total = drive(svc, bodies["stage"])
        print(f"\nservice stages, {a.n} exchanges (median / mean per exchange; total {total * 1e6:.0f} µs):")
        for label, calls in stages.items():
            if calls:
                print(f"  {label:58s} {statistics.median(calls) * 1e6:7.0f} / {statistics.fmean(calls) * 1e6:7.0f} µs")
        for obj, name, orig, own in reversed(originals):  # unwrap before profiling
            if own:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)

        prof = cProfile.Profile()
        prof.enable()
        drive(svc, bodies["prof"])
        prof.disable()
        if a.dump:
            Path(a.dump).parent.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(a.dump)
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(a.profile_lines)
            print(f"\n--- service profile by {key} ({a.n} exchanges) ---")
            print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:20000])
    finally:
        backend.drop()
        ehr.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
