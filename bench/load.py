"""Process control: the gunicorn servers this script starts and stops (by their own pids),
the wrk runs that load them, and the CPU figures read from /proc around each run."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import BIN, LUA, log


class Gunicorn:
    """One `gunicorn -w 2 APP` started by this script; stopped by its own pid."""

    def __init__(self, name, app, port, cwd, env, log_path, workers=2, chdir=None):
        self.name, self.port, self.cwd, self.env = name, port, cwd, env
        self.base = f"http://127.0.0.1:{port}"
        self.argv = [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{port}"]
        if chdir:
            self.argv += ["--chdir", str(chdir)]
        self.argv.append(app)
        self.log_path = log_path
        self.proc = None

    def start(self, wait=60):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited at start; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                    if r.status == 200 and len(self.workers()) >= 2:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.name} did not answer /healthz in {wait} s; log:\n{self.log_tail()}")

    def workers(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return sorted(set(pids))

    def peak_rss_kib(self) -> dict[int, int]:
        """VmHWM (peak resident set) of each worker, KiB."""
        out = {}
        for pid in self.workers():
            try:
                m = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
            except OSError:
                continue
            if m:
                out[pid] = int(m.group(1))
        return out

    def log_tail(self, n=3000) -> str:
        try:
            if not self.log.closed:
                self.log.flush()
            return Path(self.log_path).read_text()[-n:]
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # gunicorn stops its workers gracefully
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this script created
            self.proc.wait(10)
        self.log.close()


def post_token(base: str, body: str, auth: str) -> tuple[int, str]:
    """One line of a bodies file: a form body, or `body TAB DPoP proof` (variant dpop)."""
    body, _, proof = body.partition("\t")
    headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"}
    if proof:
        headers["DPoP"] = proof
    req = urllib.request.Request(base + "/token", data=body.encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


HZ = os.sysconf("SC_CLK_TCK")
OTHER_MAX = 0.2  # cores other processes may use during a run before it is done again


def busy_seconds() -> float:
    """CPU time spent on all cores (user, nice, system, irq, softirq, steal), from /proc/stat."""
    return sum(machine_seconds()[:3])


def machine_seconds() -> tuple:
    """(process time: user, nice and system; interrupts: irq and softirq, which on loopback
    is most of the networking's cost and belongs to no process; steal: time the hypervisor
    gave another guest) of all cores, from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system) / HZ, (irq + softirq) / HZ, steal / HZ


def proc_cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / HZ


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def other_load(seconds: float) -> float:
    """Cores busy with work that is not this script's, over a sample of `seconds`."""
    b0, o0 = busy_seconds(), time.process_time()
    time.sleep(seconds)
    return max(0.0, (busy_seconds() - b0) - (time.process_time() - o0)) / seconds


def wait_quiet(max_wait: float, threshold: float = OTHER_MAX) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` cores."""
    deadline = time.time() + max_wait
    load = other_load(1.0)
    said = False
    while load > threshold and time.time() < deadline:
        if not said:
            log(f"  other processes use {load:.2f} cores; waiting up to {max_wait:.0f} s for a quiet machine")
            said = True
        load = other_load(2.0)
    return load


def run_wrk(url, bodies: Path, seconds: float, threads: int, connections: int, auth: str,
            dump_prefix: str) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(LUA), url,
           "--", str(bodies), str(threads), auth, dump_prefix]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    m = re.search(r"^BENCH_JSON (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise SystemExit(f"wrk failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    res = json.loads(m.group(1))
    w = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
    res["wrk_non2xx_or_3xx"] = int(w.group(1)) if w else 0
    res["wrk_stdout"] = r.stdout
    res["cmd"] = cmd
    return res

