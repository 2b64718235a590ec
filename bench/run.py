#!/usr/bin/env python3
"""The token-exchange benchmark: one command, `python bench/run.py [--quick]`.

What it does (see bench/README.md):

1. A fresh SQLite database in a temp dir (`--backend postgres`: a PostgreSQL
   database of its own, and Redis), set up only through the
   `token-exchange` CLI: a fake EHR issuer (an RSA key whose JWKS this process
   serves on loopback), a target, client `vendor`, a trust, and 1,000 patient
   links (`link import` of a generated CSV).
2. Distinct RS256-signed (access token, ID token) pairs, more than a run can
   send, in one file per round plus a separate warm-up file, so no cache of
   verified tokens can help. Many patients, all linked.
3. Alternating runs of the floor app (bench/floor_app.py) and the
   service, each under `gunicorn -w 2`, driven with wrk at 16 connections after
   a short warm-up: exchanges/s, p50/p99 latency, non-2xx count, peak RSS per
   worker. The headline is service / floor; both are also set against the
   crypto-only ceiling = cores / (2 RS256 verify + 1 RS256 sign), measured here.
   With `--backend postgres`, per exchange also the round trips, statements and
   write transactions of each back end and the CPU of PostgreSQL and Redis beside
   the service's (bench/backends.py).
4. Variants, in the same rounds as step 3 and against the same floor: the service
   signing with an ES256 key, exchanges under a user's existing consent,
   exchanges that each match a new patient at a target, user/ scopes at an as-is
   target, at a mapped target whose users are all mapped already, and for users
   each matched for the first time (`--variants`).
5. The service again at 1,000,000 links (100,000 with --quick).
6. bench/RESULTS.md (--backend postgres: bench/RESULTS-postgres.md; --quick: in bench/out/) and raw
   JSON in bench/out/.

The parts are modules of the bench package (bench/__init__.py lists them); this file is the
entry point: the command line and the order of the steps.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
if Path(sys.prefix).resolve() != VENV.resolve() and (VENV / "bin" / "python").exists():
    # Run under the service's own interpreter and libraries (the ones we report).
    os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), *sys.argv])
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the bench package (bench/__init__.py adds tests/ for tests/fakes.py)

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

from bench.backends import PG_ADMIN, REDIS_URL, open_backend  # noqa: E402
from bench.common import BENCH, BIN, FLOOR_DIR, OUT, VARIANTS, log  # noqa: E402
from bench.load import busy_seconds, wait_quiet  # noqa: E402
from bench.measure import Runs  # noqa: E402
from bench.report import end_checks, machine, print_summary, report, summarize, summarize_variant  # noqa: E402
from bench.workload import body_sets, fake_ehr, make_bodies, measure_crypto  # noqa: E402
from bench.world import FakeFHIR, World  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the token-exchange service against the floor app.")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test the script: 3 s runs, 1 s warm-ups, 100,000 links instead of 1,000,000")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 8; --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each run (default 2; --quick 1)")
    p.add_argument("--rounds", type=int, default=4, help="floor+service rounds per link count (default 4)")
    p.add_argument("--quiet-wait", type=float, help="before each run, wait up to this many seconds for other "
                   "processes to leave the cores alone (default 120; --quick 10)")
    p.add_argument("--retries", type=int, default=2, help="run again a run that other processes disturbed "
                   "(default: up to 2 more times; the least disturbed attempt is kept)")
    p.add_argument("--links", type=int, default=1000, help="patient links for the main runs (default 1000)")
    p.add_argument("--big-links", type=int, help="links for the repeat (default 1,000,000; --quick 100,000)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--out", help="report path (default bench/RESULTS.md; --quick bench/out/RESULTS-quick.md)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (database, logs, bodies)")
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                   help="sqlite (default: a file in the temp dir) or postgres: the production shape, PostgreSQL "
                        "+ Redis, in a database of its own created (and dropped at the end) through --pg-admin")
    p.add_argument("--pg-admin", default=PG_ADMIN, help=f"--backend postgres: a PostgreSQL URL that may create "
                   f"and drop databases (default {PG_ADMIN})")
    p.add_argument("--redis", default=REDIS_URL, help=f"--backend postgres: the Redis URL (default {REDIS_URL})")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated service variants run in every round at --links: {', '.join(VARIANTS)} "
                        "(default all), or 'none'")
    args = p.parse_args(argv)
    args.variants = [] if args.variants.strip() in ("", "none") else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} or 'none'")
    args.duration = args.duration or (3 if args.quick else 8)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (10 if args.quick else 90)
    args.big_links = args.big_links or (100_000 if args.quick else 1_000_000)
    if args.big_links <= args.links:
        p.error("--big-links must be larger than --links")
    return args


def preflight():
    """Stop early, saying what to install, when wrk, the project or the floor app is missing."""
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is not installed. It is the load generator this benchmark drives the service "
                 "with; install it with:  apt-get install -y wrk")
    for exe in ("token-exchange", "gunicorn"):
        if not (BIN / exe).exists():
            sys.exit(f"bench: {BIN / exe} is missing; install the project: .venv/bin/pip install -e '.[test]'")
    if not (FLOOR_DIR / "floor_app.py").exists():
        sys.exit(f"bench: the floor app {FLOOR_DIR / 'floor_app.py'} is missing")


def main(argv=None):
    args = parse_args(argv)
    suffix = "" if args.backend == "sqlite" else "-" + args.backend
    out = Path(args.out) if args.out else (OUT / f"RESULTS{suffix}-quick.md" if args.quick
                                           else BENCH / f"RESULTS{suffix}.md")
    preflight()

    command = "python bench/run.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.time()
    info = machine()
    log(f"{info['nproc']} cores, {info['cpu_model']}, Python {info['python']}; load avg {os.getloadavg()[0]:.2f}")
    tmp = Path(tempfile.mkdtemp(prefix="te-bench-"))
    ehr = fake_ehr()
    fhir = FakeFHIR() if {"match", "user-match"} & set(args.variants) else None
    backend = open_backend(args, tmp)
    world = World(tmp, ehr, fhir, backend)
    bench = Runs(args, world)
    try:
        log(f"setting up the service in {tmp} on {args.backend} (fake EHR at {ehr.issuer})")
        imports = [world.setup_world(args.links)]
        if args.variants:
            log(f"setting up the variants: {', '.join(args.variants)}")
            imports += world.setup_variants(args.links, args.variants)

        log("measuring RS256 verify/sign in-process for the crypto-only ceiling")
        wait_quiet(args.quiet_wait)
        b0, o0, t_0 = busy_seconds(), time.process_time(), time.perf_counter()
        crypto = measure_crypto(ehr)
        crypto["other_cores"] = max(0.0, busy_seconds() - b0 - (time.process_time() - o0)) / (
            time.perf_counter() - t_0)
        log(f"  verify {crypto['pyjwt_verify_s'] * 1e6:.0f} µs, sign {crypto['pyjwt_sign_s'] * 1e6:.0f} µs "
            f"-> ceiling {crypto['ceiling_per_s']:.0f} exchanges/s on {crypto['cores']} cores")

        sizes, sets = body_sets(args, crypto["ceiling_per_s"])
        log(f"signing request bodies: {sizes['per_run']} pairs per round, {sizes['warmup']} for warm-ups")
        files = make_bodies(ehr, sets, tmp, fhir.base if fhir else None, fhir.user_base if fhir else None)

        log(f"phase 1: {args.links:,} links, {args.rounds} rounds of floor then service"
            + (f", then the variants {', '.join(args.variants)}" if args.variants else ""))
        bench.phase("small", args.links, files, files["warmup"], args.rounds, args.variants)

        log(f"importing {args.big_links - args.links:,} more links ({args.big_links:,} in all)")
        imports.append(world.import_links(args.links, args.big_links))
        log(f"phase 2: {args.big_links:,} links, {args.rounds} rounds of floor then service")
        bench.phase("big", args.big_links, files, files["warmup"], args.rounds)

        checks = end_checks(args, info, bench, world.audit_counts(), ehr, fhir)
        summaries = {"small": summarize(bench.runs, "small"), "big": summarize(bench.runs, "big")}
        variants = {v: summarize_variant(bench.runs, f"service-{v}") for v in args.variants}
        wall = time.time() - t0
        text = report(info, args, command, crypto, bench.runs, bench.discarded, summaries, imports, checks,
                      bench.problems, sizes, started_at, wall, variants, backend)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        OUT.mkdir(parents=True, exist_ok=True)
        raw = OUT / (f"results{suffix}-quick.json" if args.quick else f"results{suffix}.json")
        raw.write_text(json.dumps({"command": command, "machine": info, "crypto": crypto, "sizes": sizes,
                                   "imports": imports, "runs": bench.runs, "discarded_runs": bench.discarded,
                                   "summaries": summaries, "variants": variants,
                                   "checks": checks, "problems": bench.problems}, indent=1))
        log(f"wrote {out} and {raw}")
        print_summary(args, crypto, summaries, variants, bench.problems)
        return 1 if bench.problems else 0
    finally:
        backend.drop()
        ehr.stop()
        if fhir:
            fhir.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
