"""Measured runs: each a fresh gunicorn (floor, service or a variant), one exchange by hand,
a wrk warm-up, then the measured wrk run with CPU sampled around it; rounds of them, and a
run that other processes disturbed run again."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from bench.backends import cost as backend_cost
from bench.common import FLOOR_DIR, ROOT, log
from bench.load import (OTHER_MAX, Gunicorn, busy_seconds, children_cpu_seconds, machine_seconds, post_token,
                        proc_cpu_seconds, run_wrk, wait_quiet)
from bench.workload import with_proofs
from bench.world import World


class Runs:
    """The measured runs of one benchmark against one world: `runs` kept, `discarded` (done
    again because other processes disturbed them), `problems` found, and the 2xx and non-2xx
    answers this script saw from the service."""

    def __init__(self, args, world: World):
        self.args, self.world = args, world
        self.runs: list[dict] = []
        self.discarded: list[dict] = []  # runs done again because other processes disturbed them
        self.problems: list[str] = []
        self.service_2xx_seen = 0  # every 2xx the service answered that this script saw
        self.service_non2xx_seen = 0

    def server(self, kind: str) -> Gunicorn:
        w = self.world
        if kind == "service-es256":
            return Gunicorn(kind, "wsgi:app", w.svc_port, ROOT, w.es_env, w.tmp / "service.log")
        if kind.startswith("service"):
            return Gunicorn(kind, "wsgi:app", w.svc_port, ROOT, w.svc_env, w.tmp / "service.log")
        return Gunicorn("floor", "floor_app:app", w.floor_port, FLOOR_DIR, w.floor_env, w.tmp / "floor.log",
                        chdir=FLOOR_DIR)

    def measure(self, kind: str, phase: str, links: int, rnd: int, bodies: Path, warm: Path) -> dict:
        a, auth = self.args, self.world.auth
        other_before = wait_quiet(a.quiet_wait)
        if kind == "service-dpop":  # fresh proofs (60 s of validity), after the wait for a quiet machine
            endpoint = self.world.svc_env["TOKEN_EXCHANGE_ISSUER"] + "/token"
            warm = with_proofs(warm, self.world.tmp / f"dpop-{warm.name}", endpoint)
            bodies = with_proofs(bodies, self.world.tmp / f"dpop-{bodies.name}", endpoint)
        service = kind.startswith("service")
        code = code_fingerprint() if service else None
        srv = self.server(kind).start()
        load_before = os.getloadavg()[0]
        try:
            # One exchange by hand first: a broken setup fails here, clearly.
            first = warm.open().readline().strip()
            status, text = post_token(srv.base, first, auth)
            if status != 200:
                raise SystemExit(f"{kind}: the first exchange failed: HTTP {status} {text[:500]}\n{srv.log_tail()}")
            if service:
                self.service_2xx_seen += 1
            dump = str(self.world.tmp / f"fail-{phase}-{kind}-{rnd}")
            warmup = run_wrk(srv.base + "/token", warm, a.warmup, a.threads, a.connections, auth,
                             dump + "-warmup")
            gpids = [srv.proc.pid, *srv.workers()]
            back0 = self.world.backend.sample(gpids) if service else None  # outside the CPU window
            machine0 = machine_seconds()
            cpu0 = (busy_seconds(), proc_cpu_seconds(gpids), children_cpu_seconds(), time.process_time())
            res = run_wrk(srv.base + "/token", bodies, a.duration, a.threads, a.connections, auth, dump)
            cpu1 = (busy_seconds(), proc_cpu_seconds(gpids), children_cpu_seconds(), time.process_time())
            machine1 = machine_seconds()
            back1 = self.world.backend.sample(gpids) if back0 is not None else None
            rss = srv.peak_rss_kib()
        finally:
            srv.stop()
        secs = res["duration_us"] / 1e6
        ok = res["responses"] - res["non2xx"]
        busy, app_cpu, wrk_cpu, own = (b - a_ for a_, b in zip(cpu0, cpu1))
        cpu = {"app": app_cpu / secs, "wrk": wrk_cpu / secs,
               "other": max(0.0, busy - app_cpu - wrk_cpu - own) / secs,
               "idle": max(0.0, (os.cpu_count() or 1) - busy / secs)}
        # the part of "other" that is no process's: interrupts (loopback networking) and steal
        _, irq, steal = (b - a_ for a_, b in zip(machine0, machine1))
        cpu["interrupts"], cpu["steal"] = irq / secs, steal / secs
        run = {
            "phase": phase, "links": links, "round": rnd, "app": kind,
            "requests": res["requests"], "ok": ok, "non2xx": res["non2xx"],
            "wrk_non2xx_or_3xx": res["wrk_non2xx_or_3xx"],
            "socket_errors": sum(res[k] for k in ("err_connect", "err_read", "err_write", "err_timeout")),
            "wrapped": res["wrapped"], "bodies": res["bodies"], "seconds": secs,
            "exchanges_per_s": ok / secs, "requests_per_s": res["requests"] / secs,
            "p50_ms": res["lat_p50_us"] / 1000, "p90_ms": res["lat_p90_us"] / 1000,
            "p99_ms": res["lat_p99_us"] / 1000, "max_ms": res["lat_max_us"] / 1000,
            "rss_peak_mib": sorted(round(v / 1024, 1) for v in rss.values()),
            "loadavg_before": load_before, "other_cores_before": other_before, "cpu_cores": cpu,
            "app_cpu_ms_per_exchange": (app_cpu / ok * 1000) if ok else None,
            "code": code if code == code_fingerprint() else f"{code}..{code_fingerprint()}",
            "warmup": {k: warmup[k] for k in ("responses", "non2xx", "wrapped")},
            "wrk_stdout": res["wrk_stdout"],
        }
        if back1 is not None:
            run["backend"] = backend_cost(back0, back1, ok)
            b = run["backend"]
            log(f"  per exchange: PostgreSQL {b['pg_round_trips']:.2f} round trips, "
                f"{b['pg_statements'] if b['pg_statements'] is None else round(b['pg_statements'], 2)} statements, "
                f"{b['pg_write_transactions']:.2f} write transactions, {b['pg_wal_bytes']:.0f} WAL bytes, "
                f"CPU {b['pg_backend_cpu_ms']:.3f} ms (all postgres {b['pg_all_cpu_ms']:.3f}); Redis "
                f"{b['redis_round_trips']:.2f} round trips, {b['redis_commands']:.2f} commands, "
                f"CPU {b['redis_cpu_ms']:.3f} ms")
        if service:
            self.service_2xx_seen += ok + warmup["responses"] - warmup["non2xx"]
            self.service_non2xx_seen += res["non2xx"] + warmup["non2xx"]
        self.runs.append(run)
        log(f"  {kind:7s} {phase} r{rnd}: {run['exchanges_per_s']:7.1f} exchanges/s  p50 {run['p50_ms']:6.2f} ms  "
            f"p99 {run['p99_ms']:6.2f} ms  non-2xx {run['non2xx']}  sock-err {run['socket_errors']}  "
            f"RSS {run['rss_peak_mib']} MiB  CPU app {cpu['app']:.2f} wrk {cpu['wrk']:.2f} "
            f"other {cpu['other']:.2f} (interrupts {cpu['interrupts']:.2f}, steal {cpu['steal']:.2f}) "
            f"idle {cpu['idle']:.2f} cores")
        if run["wrapped"]:
            self.problems.append(f"{kind} {phase} round {rnd}: the body file ran out ({run['bodies']} bodies); "
                                 "tokens were re-sent. Raise the body count.")
        for label, n in (("measured", res["non2xx"]), ("warm-up", warmup["non2xx"])):
            if n:
                suffix = "" if label == "measured" else "-warmup"
                dumps = sorted(self.world.tmp.glob(Path(dump + suffix).name + "-*.txt"))
                sample = dumps[0].read_text()[:800] if dumps else "(no response captured)"
                msg = (f"{kind} {phase} round {rnd}: {n} non-2xx responses in the {label} run; "
                       f"first one: {sample.strip()}")
                self.problems.append(msg)
                log("  PROBLEM: " + msg)
                log("  server log tail:\n" + srv.log_tail(1500))
        if run["socket_errors"]:
            self.problems.append(f"{kind} {phase} round {rnd}: {run['socket_errors']} socket errors "
                                 f"(connect/read/write/timeout) reported by wrk")
        return run

    def phase(self, phase: str, links: int, sets: dict, warm: Path, rounds: int, variants=()):
        """Rounds of floor, service, then each variant's service run, on the round's bodies
        (the consent, match and user variants on their own)."""
        for rnd in range(1, rounds + 1):
            bodies = sets[f"{phase}-r{rnd}"]
            for kind in ("floor", "service", *(f"service-{v}" for v in variants)):
                v = kind.removeprefix("service-")
                if f"{v}-r{rnd}" in sets:  # a variant with bodies of its own (consent, match, user-...)
                    self.measure_clean(kind, phase, links, rnd, sets[f"{v}-r{rnd}"], sets[f"warmup-{v}"])
                else:
                    self.measure_clean(kind, phase, links, rnd, bodies, warm)

    def measure_clean(self, kind, phase, links, rnd, bodies, warm):
        """A run that other processes disturbed (> OTHER_MAX cores during it) is run again,
        up to --retries times; the least disturbed attempt is kept."""
        attempts = []
        for _ in range(1 + self.args.retries):
            attempts.append(self.measure(kind, phase, links, rnd, bodies, warm))
            if attempts[-1]["cpu_cores"]["other"] <= OTHER_MAX:
                break
            log(f"  other processes used {attempts[-1]['cpu_cores']['other']:.2f} cores during that run")
        keep = min(attempts, key=lambda r: r["cpu_cores"]["other"])
        for r in attempts:
            self.runs.remove(r)
            if r is not keep:
                self.discarded.append(r)
        keep["attempts"] = len(attempts)
        self.runs.append(keep)
        return keep


def code_fingerprint() -> str:
    """A hash of the service's code as gunicorn will load it (the package and wsgi.py)."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "token_exchange").rglob("*.py"), ROOT / "wsgi.py"]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]
