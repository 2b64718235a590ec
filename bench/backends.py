"""The back ends the service runs on: SQLite (a file in the temp dir, the default) or the
production shape, PostgreSQL + Redis (`--backend postgres`): a database of its own, created
on the server `--pg-admin` names and dropped at the end, and a Redis key prefix of its own.

For the production shape, `sample()` is read before and after each measured service run,
so the report can say what one exchange costs each back end, independent of the load on
the machine: round trips (TCP segments carrying data from the gunicorn workers to
PostgreSQL and to Redis, read with `ss -ti`), statements (pg_stat_statements, when the
server preloads it), write transactions (the next transaction id moves once per
transaction that wrote), WAL bytes, Redis commands (`INFO commandstats`), and CPU seconds
of the database's backends, of every PostgreSQL process and of Redis. Server-wide figures
(write transactions, WAL, all PostgreSQL processes, Redis) include whatever else uses
the same servers meanwhile: on a quiet machine, nothing."""
from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from bench.load import HZ, proc_cpu_seconds

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Our own sampling queries, left out of the statement counts.
_OURS = r"pg_stat_statements|pg_snapshot_xmax|pg_stat_activity|pg_current_wal_lsn"


class SQLite:
    """The embedded default: a file in the temp dir."""
    name = "sqlite"

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def url(self, copy: str = "") -> str:
        return f"sqlite:///{self.tmp / ('te' + (('-' + copy) if copy else '') + '.db')}"

    def env(self) -> dict:
        return {}

    def copy(self, copy: str) -> str:
        import sqlite3
        src, dst = sqlite3.connect(self.url()[10:]), sqlite3.connect(self.url(copy)[10:])
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return self.url(copy)

    def sample(self, pids) -> dict | None:
        return None

    def drop(self) -> None:
        pass

    def describe(self) -> str:
        return "a fresh SQLite database in a temp dir (`TOKEN_EXCHANGE_DATABASE_URL=sqlite:///TMP/te.db`)"


class Postgres:
    """A database of its own on the PostgreSQL server `admin` reaches (created here,
    dropped by drop()), and a Redis key prefix of its own."""
    name = "postgres"

    def __init__(self, admin: str, redis_url: str):
        import psycopg
        self.psycopg = psycopg
        self.admin, self.redis_url = admin, redis_url
        self.db = f"te_bench_{uuid.uuid4().hex[:8]}"
        self.copies: list[str] = []
        self.prefix = f"te-bench-{self.db}"
        self._sql(f'CREATE DATABASE "{self.db}"')
        self.statements = self._enable_statements()
        import redis
        self.redis = redis.Redis.from_url(redis_url)
        self.redis.ping()
        self.version = self._admin_value("SHOW server_version")

    def _connect(self, db=None):
        url = self.admin if db is None else self.admin.rsplit("/", 1)[0] + "/" + db
        return self.psycopg.connect(url, autocommit=True)

    def _sql(self, sql, db=None):
        with self._connect(db) as c:
            c.execute(sql)

    def _admin_value(self, sql):
        with self._connect() as c:
            return c.execute(sql).fetchone()[0]

    def _enable_statements(self) -> bool:
        """pg_stat_statements in our own database, when the server preloads it."""
        try:
            with self._connect(self.db) as c:
                c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                c.execute("SELECT count(*) FROM pg_stat_statements")
            return True
        except self.psycopg.Error:
            return False

    def url(self, copy: str = "") -> str:
        return self.admin.rsplit("/", 1)[0] + "/" + self.db + (("_" + copy) if copy else "")

    def env(self) -> dict:
        return {"TOKEN_EXCHANGE_REDIS_URL": self.redis_url, "TOKEN_EXCHANGE_REDIS_PREFIX": self.prefix}

    def copy(self, copy: str) -> str:
        """A copy of the set-up database (CREATE DATABASE ... TEMPLATE; nothing is connected to it now)."""
        name = f"{self.db}_{copy}"
        self._sql(f'CREATE DATABASE "{name}" TEMPLATE "{self.db}"')
        self.copies.append(name)
        return self.url(copy)

    def drop(self) -> None:
        for name in [*self.copies, self.db]:
            try:
                self._sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except self.psycopg.Error as e:
                print(f"[bench] could not drop database {name}: {e}")
        try:
            keys = list(self.redis.scan_iter(match=self.prefix + ":*", count=1000))
            if keys:
                self.redis.delete(*keys)
        except Exception as e:  # noqa: BLE001 - cleanup only
            print(f"[bench] could not clear the Redis prefix {self.prefix}: {e}")

    def describe(self) -> str:
        return (f"PostgreSQL {self.version}: a fresh database (`{self.db}`) created through `{_safe(self.admin)}` "
                f"and dropped at the end; Redis `{_safe(self.redis_url)}` with a key prefix of its own "
                "(`TOKEN_EXCHANGE_REDIS_URL`, `TOKEN_EXCHANGE_REDIS_PREFIX`)")

    # -- what a run costs the back ends ------------------------------------------------
    def sample(self, pids) -> dict:
        """Counters now; a run's cost is the difference of two samples. `pids`: the gunicorn
        master and workers (whose sockets are counted)."""
        out = {}
        dbs = [self.db, *self.copies]
        ours = set()  # the backends of these sampling connections, left out of the CPU figures
        with self._connect() as c:
            ours.add(c.info.backend_pid)
            out["next_xid"], out["wal_lsn"] = c.execute(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
                "(pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
            backends = [r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)",
                                                (dbs,))]
            # client backends of other databases: not this benchmark's work
            others = {r[0] for r in c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = "
                                              "'client backend' AND datname <> ALL(%s)", (dbs,))}
        out["statements"] = None
        out["by_statement"] = {}
        if self.statements:
            with self._connect(self.db) as c:
                ours.add(c.info.backend_pid)
                rows = c.execute("SELECT s.query, sum(s.calls) FROM pg_stat_statements s JOIN pg_database d "
                                 "ON d.oid = s.dbid WHERE d.datname = ANY(%s) AND s.query !~ %s GROUP BY 1",
                                 (dbs, _OURS)).fetchall()
            out["by_statement"] = {q: int(n) for q, n in rows}
            out["statements"] = sum(out["by_statement"].values())
        backends = [pid for pid in backends if pid not in ours]
        out["pg_backend_cpu"] = {pid: proc_cpu_seconds([pid]) for pid in backends}
        out["pg_server_cpu"] = {pid: proc_cpu_seconds([pid]) for pid in _postgres_pids()
                                if pid not in ours and pid not in others}
        info = self.redis.info("commandstats")
        out["redis_commands"] = sum(v["calls"] for k, v in info.items() if k != "cmdstat_info")
        out["redis_by_command"] = {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items()
                                   if k != "cmdstat_info"}
        cpu = self.redis.info("cpu")
        out["redis_cpu"] = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        pg_port = urlsplit(self.admin).port or 5432
        redis_port = urlsplit(self.redis_url).port or 6379
        out["segments"] = _segments_out(set(pids), {pg_port: "pg", redis_port: "redis"})
        return out


def cost(before: dict, after: dict, exchanges: int) -> dict:
    """Per exchange, from two samples around a run that answered `exchanges`."""
    n = max(1, exchanges)
    seg = {k: sum(v - before["segments"].get(sock, 0) for sock, v in after["segments"].items() if sock[0] == k)
           for k in ("pg", "redis")}
    backend_cpu = sum(v - before["pg_backend_cpu"].get(pid, 0.0) for pid, v in after["pg_backend_cpu"].items())
    # processes that lived through the run, or started in it (one that ended took its figure along)
    server_cpu = sum(v - before["pg_server_cpu"].get(pid, 0.0) for pid, v in after["pg_server_cpu"].items())
    by_stmt = {q: n_ - before["by_statement"].get(q, 0) for q, n_ in after["by_statement"].items()}
    by_cmd = {k: v - before["redis_by_command"].get(k, 0) for k, v in after["redis_by_command"].items()}
    return {
        "pg_round_trips": seg["pg"] / n,
        "redis_round_trips": seg["redis"] / n,
        "pg_statements": None if after["statements"] is None else (after["statements"] - before["statements"]) / n,
        "pg_write_transactions": (after["next_xid"] - before["next_xid"]) / n,
        "pg_wal_bytes": (after["wal_lsn"] - before["wal_lsn"]) / n,
        "redis_commands": (after["redis_commands"] - before["redis_commands"]) / n,
        "pg_backend_cpu_ms": backend_cpu / n * 1000,
        "pg_all_cpu_ms": server_cpu / n * 1000,
        "redis_cpu_ms": (after["redis_cpu"] - before["redis_cpu"]) / n * 1000,
        "top_statements": sorted(((round(v / n, 3), _one_line(q)) for q, v in by_stmt.items() if v > 0),
                                 reverse=True)[:8],
        "redis_by_command": {k: round(v / n, 3) for k, v in by_cmd.items() if v > 0},
    }


def report_section(runs, backend) -> list[str]:
    """RESULTS.md's section on what each service run cost the back ends, per exchange."""
    rows = [r for r in runs if r.get("backend")]
    if not rows:
        return []
    L = ["## What an exchange costs the back ends\n",
         "Per 2xx answer of each measured service run, from counters read just before and just after it "
         "(bench/backends.py): *round trips* = TCP segments carrying data from the gunicorn workers to the "
         "server (one per request sent); *statements* = pg_stat_statements calls in the benchmark's "
         "databases (— when the server does not preload it); *write transactions* = transaction ids "
         "PostgreSQL assigned (each one a commit that waits for the WAL to reach the disk); CPU = "
         "CPU time ÷ 2xx answers of the service (gunicorn master and workers), of the database's backends, "
         "of every PostgreSQL process but other databases' client backends (so with the postmaster, WAL writer, "
         "checkpointer, background writer and autovacuum) and of Redis (its own `INFO cpu`). Write "
         "transactions and Redis figures are server-wide: anything else using the same servers during a run "
         "adds to them.\n",
         "| links | round | app | PG round trips | PG statements | PG write transactions | WAL bytes | "
         "Redis round trips | Redis commands | CPU ms: service / PG backends / all PG / Redis |",
         "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        b = r["backend"]
        st = "—" if b["pg_statements"] is None else f"{b['pg_statements']:.2f}"
        L.append(f"| {r['links']:,} | {r['round']} | {r['app']} | {b['pg_round_trips']:.2f} | {st} | "
                 f"{b['pg_write_transactions']:.2f} | {b['pg_wal_bytes']:.0f} | {b['redis_round_trips']:.2f} | "
                 f"{b['redis_commands']:.2f} | {r['app_cpu_ms_per_exchange'] or 0:.3f} / "
                 f"{b['pg_backend_cpu_ms']:.3f} / {b['pg_all_cpu_ms']:.3f} / {b['redis_cpu_ms']:.3f} |")
    L.append("")
    first = rows[0]["backend"]
    if first["top_statements"]:
        L.append(f"Statements per exchange in the first service run ({rows[0]['app']}, round {rows[0]['round']}):\n")
        L += ["| per exchange | statement |", "|---:|---|"]
        L += [f"| {n:.2f} | `{q}` |" for n, q in first["top_statements"]]
        L.append("")
    if first["redis_by_command"]:
        L.append("Redis commands per exchange in that run: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in sorted(first["redis_by_command"].items())) + ".\n")
    return L


def _one_line(q: str, width: int = 110) -> str:
    q = " ".join(q.split())
    return q if len(q) <= width else q[:width - 1] + "…"


def _safe(url: str) -> str:
    """A URL without its password."""
    u = urlsplit(url)
    if u.password:
        return url.replace(":" + u.password + "@", ":***@")
    return url


def _postgres_pids() -> list[int]:
    """Every process named postgres (the server, its backends and its background workers)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == "postgres":
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


_SS_USERS = re.compile(r"pid=(\d+)")
_SS_SEGS = re.compile(r"\bdata_segs_out:(\d+)")


def _segments_out(pids: set, ports: dict) -> dict:
    """{(kind, local address): data segments sent} for the TCP sockets of `pids` to `ports`
    ({port: kind}). One request to a server is one data segment here (both drivers write a
    request at once, with Nagle off), so the count is the round trips."""
    filt = " or ".join(f"dport = :{p}" for p in ports)
    try:
        text = subprocess.run(["ss", "-tinpH", f"( {filt} )"], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    lines = text.splitlines()
    for head, detail in zip(lines[::2], lines[1::2]):
        fields = head.split()
        if len(fields) < 5 or not {int(x) for x in _SS_USERS.findall(head)} & pids:
            continue
        port = int(fields[4].rsplit(":", 1)[1])
        m = _SS_SEGS.search(detail)
        if port in ports and m:
            out[(ports[port], fields[3])] = int(m.group(1))
    return out


def open_backend(args, tmp: Path):
    if args.backend == "postgres":
        return Postgres(args.pg_admin, args.redis)
    return SQLite(tmp)


__all__ = ["SQLite", "Postgres", "cost", "open_backend", "PG_ADMIN", "REDIS_URL", "HZ"]
