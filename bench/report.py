"""The report: the machine, the summaries of the runs, the end-of-run checks, bench/RESULTS.md
(one function per section) and the lines printed at the end."""
from __future__ import annotations

import platform
import re
import sqlite3
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from bench.common import (CLIENT_SECRET, EHR_SCOPE, IDT, MATCH_SYSTEM, REQ_SCOPE, ROOT, TARGET, TARGET_CONSENT, TE,
                          VARIANTS)
from bench.load import OTHER_MAX


def other_split(c: dict) -> str:
    """' (irq 0.07, steal 0.02)' for runs that recorded them (older results did not)."""
    return f" (irq {c['interrupts']:.2f}, steal {c['steal']:.2f})" if "interrupts" in c else ""


def git_head() -> str:
    """The checked-out commit, read from .git without running git."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        p = ROOT / ".git" / ref
        if p.exists():
            return f"{p.read_text().strip()[:12]} ({ref.rsplit('/', 1)[-1]})"
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return f"{line[:12]} ({ref.rsplit('/', 1)[-1]})"
    except OSError:
        pass
    return "unknown"


# -- machine and summaries -------------------------------------------------------
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    libs = {}
    for name in ("Flask", "Werkzeug", "Authlib", "PyJWT", "cryptography", "SQLAlchemy", "alembic", "gunicorn"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = "-"
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        libs["OpenSSL"] = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - informational only
        pass
    libs["SQLite"] = sqlite3.sqlite_version
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "mem_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libs": libs,
        "wrk": (wrk_v.stdout + wrk_v.stderr).splitlines()[0].strip(),
        "git_head": git_head(),
    }

def summarize(runs, phase):
    def sel(app):
        return [r for r in runs if r["phase"] == phase and r["app"] == app]
    svc, flo = sel("service"), sel("floor")
    if not svc or not flo:
        return None
    mean = statistics.fmean
    return {
        "service_rate": mean(r["exchanges_per_s"] for r in svc),
        "floor_rate": mean(r["exchanges_per_s"] for r in flo),
        "round_ratios": [s["exchanges_per_s"] / f["exchanges_per_s"] for s, f in zip(svc, flo)],
        "ratio_of_means": mean(r["exchanges_per_s"] for r in svc) / mean(r["exchanges_per_s"] for r in flo),
        "ratio": statistics.median(s["exchanges_per_s"] / f["exchanges_per_s"] for s, f in zip(svc, flo)),
        "service_cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] for r in svc),
        "floor_cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] for r in flo),
        "cpu_ratio": statistics.median(f["app_cpu_ms_per_exchange"] / s["app_cpu_ms_per_exchange"]
                                       for s, f in zip(svc, flo)),
        "service_p50": statistics.median(r["p50_ms"] for r in svc),
        "service_p99": statistics.median(r["p99_ms"] for r in svc),
        "floor_p50": statistics.median(r["p50_ms"] for r in flo),
        "floor_p99": statistics.median(r["p99_ms"] for r in flo),
        "service_rss": max(max(r["rss_peak_mib"] or [0]) for r in svc),
        "floor_rss": max(max(r["rss_peak_mib"] or [0]) for r in flo),
        "service_non2xx": sum(r["non2xx"] for r in svc),
        "floor_non2xx": sum(r["non2xx"] for r in flo),
    }

def summarize_variant(runs, kind):
    """A variant's runs against the floor run and the RS256 service run of their own round."""
    rounds: dict = {}
    for r in runs:
        if r["phase"] == "small":
            rounds.setdefault(r["round"], {})[r["app"]] = r
    full = [rd for _, rd in sorted(rounds.items()) if {"floor", "service", kind} <= rd.keys()]
    if not full:
        return None
    v = [rd[kind] for rd in full]
    return {
        "rate": statistics.fmean(r["exchanges_per_s"] for r in v),
        "floor_ratios": [rd[kind]["exchanges_per_s"] / rd["floor"]["exchanges_per_s"] for rd in full],
        "service_ratios": [rd[kind]["exchanges_per_s"] / rd["service"]["exchanges_per_s"] for rd in full],
        "cpu_ms": statistics.median(r["app_cpu_ms_per_exchange"] or 0 for r in v),
        "service_cpu_ms": statistics.median(rd["service"]["app_cpu_ms_per_exchange"] or 0 for rd in full),
        "p50": statistics.median(r["p50_ms"] for r in v),
        "p99": statistics.median(r["p99_ms"] for r in v),
        "rss": max(max(r["rss_peak_mib"] or [0]) for r in v),
        "non2xx": sum(r["non2xx"] for r in v),
    }

# -- RESULTS.md --------------------------------------------------------------------
def report(info, args, command, crypto, runs, discarded, summaries, imports, checks, problems, sizes, started,
           wall, variants=None, backend=None) -> str:
    from bench.backends import report_section
    variants = variants or {}
    return "\n".join([
        *_preamble(info, command, started, wall),
        *_headline(args, crypto, summaries, variants),
        *_runs(args, runs, discarded),
        *report_section(runs, backend),
        *_by_link_count(args, crypto, summaries),
        *_variants(args, variants),
        *_ceiling(crypto),
        *_setup(args, imports, sizes, variants, backend),
        *_checks(checks, problems),
    ])


def _preamble(info, command, started, wall) -> list[str]:
    """Title, command and machine."""
    L: list[str] = []
    w = L.append
    w("# token-exchange benchmark results\n")
    w(f"Recorded {started} by `bench/run.py` (wall time {wall / 60:.1f} min). "
      "Regenerate with the command below; this file is overwritten.\n")
    w("## Command\n")
    w("```sh\n" + command + "\n```\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| cores (`nproc`) | {info['nproc']} |")
    w(f"| CPU | {info['cpu_model']} |")
    w(f"| memory | {info['mem_gib']} GiB |")
    w(f"| kernel | {info['kernel']} |")
    w(f"| Python | {info['python']} |")
    w("| libraries | " + ", ".join(f"{k} {v}" for k, v in info["libs"].items()) + " |")
    w(f"| load generator | {info['wrk']} |")
    w(f"| code | commit {info['git_head']}; see Checks for the code each service run loaded |")
    w("")
    w(f"wrk runs on the same {info['nproc']} cores as the two gunicorn workers, so every figure here "
      "includes the cost of generating the load; the ratios cancel most of it, the absolute rates do not.\n")
    return L


def _headline(args, crypto, summaries, variants) -> list[str]:
    """The ratios, rates and variants in a few lines."""
    L: list[str] = []
    w = L.append
    small, big = summaries["small"], summaries["big"]
    ceiling = crypto["ceiling_per_s"]
    w("## Headline\n")
    if small:
        w(f"- **service ÷ floor = {small['ratio']:.2f}** at {args.links:,} links: the median of the rounds' "
          f"ratios ({', '.join(f'{x:.2f}' for x in small['round_ratios'])}), each round a floor run and the "
          f"service run right after it (ratio of the mean rates: {small['ratio_of_means']:.2f}).")
        w(f"- CPU cost per exchange (gunicorn master + workers, CPU time ÷ 2xx answers): service "
          f"{small['service_cpu_ms']:.2f} ms, floor {small['floor_cpu_ms']:.2f} ms; floor ÷ service = "
          f"**{small['cpu_ratio']:.2f}**, the throughput ratio the two would show with the cores to themselves "
          "(less sensitive to other load on a shared machine than the rates).")
        w(f"- service: **{small['service_rate']:.0f} exchanges/s**, p50 {small['service_p50']:.1f} ms, "
          f"p99 {small['service_p99']:.1f} ms, peak RSS {small['service_rss']:.0f} MiB per worker, "
          f"{small['service_non2xx']} non-2xx.")
        w(f"- floor: {small['floor_rate']:.0f} exchanges/s, p50 {small['floor_p50']:.1f} ms, "
          f"p99 {small['floor_p99']:.1f} ms, peak RSS {small['floor_rss']:.0f} MiB per worker.")
        w(f"- crypto-only ceiling: {ceiling:.0f} exchanges/s; floor ÷ ceiling = "
          f"{small['floor_rate'] / ceiling:.2f}, service ÷ ceiling = {small['service_rate'] / ceiling:.2f}.")
    for name, v in variants.items():
        if v:
            w(f"- variant **{name}**: {v['rate']:.0f} exchanges/s, ÷ floor = **{statistics.median(v['floor_ratios']):.2f}**, "
              f"÷ the RS256 service of the same round = {statistics.median(v['service_ratios']):.2f}; CPU per exchange "
              f"{v['cpu_ms']:.2f} ms (RS256 service {v['service_cpu_ms']:.2f} ms); p50 {v['p50']:.1f} ms, "
              f"p99 {v['p99']:.1f} ms (see Variants).")
    if big and small:
        w(f"- at {args.big_links:,} links: **service ÷ floor = {big['ratio']:.2f}** (vs {small['ratio']:.2f} at "
          f"{args.links:,}; per round: {', '.join(f'{x:.2f}' for x in big['round_ratios'])}); CPU per exchange "
          f"{big['service_cpu_ms']:.2f} ms (vs {small['service_cpu_ms']:.2f} ms), CPU-cost ratio "
          f"{big['cpu_ratio']:.2f} (vs {small['cpu_ratio']:.2f}); service "
          f"{big['service_rate']:.0f} exchanges/s, p50 {big['service_p50']:.1f} ms, p99 {big['service_p99']:.1f} ms "
          f"(at {args.links:,}: {small['service_rate']:.0f}/s, {small['service_p50']:.1f} ms, "
          f"{small['service_p99']:.1f} ms). The ratio is the drift-free comparison; the raw rates move with "
          "whatever else the machine is doing (see the CPU column below).")
    w("")
    return L


def _runs(args, runs, discarded) -> list[str]:
    """Every kept run, and how many were disturbed."""
    L: list[str] = []
    w = L.append
    w("## Runs\n")
    w("Floor and service runs alternate; each run starts a fresh `gunicorn -w 2`, sends one exchange by hand, "
      f"warms up for {args.warmup:g} s with the warm-up token set, then measures for {args.duration:g} s "
      f"(`wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency`). Exchanges/s counts 2xx "
      "responses only. Peak RSS is VmHWM of each worker (children of the gunicorn master) at the end of the run.\n")
    w("| links | round | app | exchanges/s | p50 ms | p99 ms | non-2xx | socket errors | requests | "
      "peak RSS per worker (MiB) | app CPU ms per exchange | CPU cores: app / wrk / other / idle |")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in runs:
        c = r["cpu_cores"]
        w(f"| {r['links']:,} | {r['round']} | {r['app']} | {r['exchanges_per_s']:.1f} | {r['p50_ms']:.2f} | "
          f"{r['p99_ms']:.2f} | {r['non2xx']} | {r['socket_errors']} | {r['requests']:,} | "
          f"{' / '.join(f'{x:.0f}' for x in r['rss_peak_mib'])} | {r['app_cpu_ms_per_exchange'] or 0:.2f} | "
          f"{c['app']:.2f} / {c['wrk']:.2f} / {c['other']:.2f}{other_split(c)} / {c['idle']:.2f} |")
    w("")
    w("CPU cores are averages over the measured run, from /proc: *app* = the gunicorn master and workers, "
      "*wrk* = the load generator, *other* = every other process on the machine (a shared machine shows it "
      f"here; each run first waits up to {args.quiet_wait:g} s for other processes to use under 0.2 cores), "
      "*idle* = unused. Where recorded, *other* names its share that is no process's: *irq* (interrupts, "
      "on loopback most of the networking's cost) and *steal* (a virtual machine's core given to another guest).\n")
    if discarded:
        w(f"{len(discarded)} disturbed run(s) were done again and dropped (their figures are in "
          "bench/out/results.json of the run that wrote this file, which git ignores).\n")
    busy = [r for r in runs if r["cpu_cores"]["other"] > OTHER_MAX]
    if busy:
        w(f"**{len(busy)} of {len(runs)} kept runs shared the cores with other work (other > {OTHER_MAX} cores)**; their "
          "rates understate what this machine can do, and a ratio is only as good as its two runs' "
          "conditions are alike.\n")
    return L


def _by_link_count(args, crypto, summaries) -> list[str]:
    """One row per link count."""
    L: list[str] = []
    w = L.append
    small, big = summaries["small"], summaries["big"]
    ceiling = crypto["ceiling_per_s"]
    w("## Summary by link count\n")
    w("| links | service exchanges/s | floor exchanges/s | service ÷ floor | service ÷ ceiling | floor ÷ ceiling | "
      "service p50 / p99 ms | floor p50 / p99 ms | service peak RSS MiB | CPU ms per exchange service / floor | "
      "CPU-cost ratio |")
    w("|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|")
    for links, s in ((args.links, small), (args.big_links, big)):
        if s:
            w(f"| {links:,} | {s['service_rate']:.1f} | {s['floor_rate']:.1f} | **{s['ratio']:.2f}** | "
              f"{s['service_rate'] / ceiling:.2f} | {s['floor_rate'] / ceiling:.2f} | "
              f"{s['service_p50']:.1f} / {s['service_p99']:.1f} | {s['floor_p50']:.1f} / {s['floor_p99']:.1f} | "
              f"{s['service_rss']:.0f} | {s['service_cpu_ms']:.2f} / {s['floor_cpu_ms']:.2f} | {s['cpu_ratio']:.2f} |")
    w("")
    return L


def _variants(args, variants) -> list[str]:
    """Each variant against its round's floor and RS256 service."""
    L: list[str] = []
    w = L.append
    if variants:
        w("## Variants\n")
        w(f"Each round at {args.links:,} links runs the floor, the service (RS256), then each variant's service "
          "run, every run a fresh `gunicorn -w 2` with its own warm-up; ratios are per round, then the median. "
          "What each variant changes:\n")
        for name in variants:
            w(f"- **{name}**: {VARIANTS[name]}.")
        w("")
        w("| variant | exchanges/s | ÷ floor (per round) | ÷ floor | ÷ RS256 service (per round) | ÷ RS256 service | "
          "p50 / p99 ms | CPU ms per exchange (RS256 service) | peak RSS MiB | non-2xx |")
        w("|---|---:|---|---:|---|---:|---|---|---:|---:|")
        for name, v in variants.items():
            if v:
                w(f"| {name} | {v['rate']:.1f} | {', '.join(f'{x:.2f}' for x in v['floor_ratios'])} | "
                  f"**{statistics.median(v['floor_ratios']):.2f}** | "
                  f"{', '.join(f'{x:.2f}' for x in v['service_ratios'])} | "
                  f"{statistics.median(v['service_ratios']):.2f} | {v['p50']:.1f} / {v['p99']:.1f} | "
                  f"{v['cpu_ms']:.2f} ({v['service_cpu_ms']:.2f}) | {v['rss']:.0f} | {v['non2xx']} |")
        w("")
        if "match" in variants:
            w("The match variant's CPU column counts the service only; the fake FHIR server answering its "
              "searches runs in the benchmark process (not counted as *other*). Every one of its exchanges "
              "is a patient's first: a matched link is never matched again within `--match-ttl`, so the next "
              "exchange for that patient costs what the RS256 row costs.\n")
    return L


def _ceiling(crypto) -> list[str]:
    """The crypto-only ceiling and the times it is made of."""
    L: list[str] = []
    w = L.append
    ceiling = crypto["ceiling_per_s"]
    w("## Crypto-only ceiling\n")
    w("Measured in the benchmark process, one thread, best of 5 batches, RSA-2048 "
      f"(other processes meanwhile: {crypto.get('other_cores', 0):.2f} cores):\n")
    w("| operation | PyJWT (as the floor calls it) | raw cryptography |")
    w("|---|---:|---:|")
    w(f"| RS256 verify | {crypto['pyjwt_verify_s'] * 1e6:.0f} µs | {crypto['raw_verify_s'] * 1e6:.0f} µs |")
    w(f"| RS256 sign | {crypto['pyjwt_sign_s'] * 1e6:.0f} µs | {crypto['raw_sign_s'] * 1e6:.0f} µs |")
    if "pyjwt_es256_sign_s" in crypto:
        w(f"| ES256 sign (P-256; the es256 variant's minting) | {crypto['pyjwt_es256_sign_s'] * 1e6:.0f} µs | |")
    w("")
    w(f"Ceiling = cores ÷ (2 × verify + 1 sign) = {crypto['cores']} ÷ {crypto['per_exchange_s'] * 1e3:.3f} ms "
      f"= **{ceiling:.0f} exchanges/s** (PyJWT figures). Nothing that verifies two RS256 tokens and signs one "
      "can beat it on this machine; it ignores HTTP, parsing and the load generator.\n")
    return L


def _setup(args, imports, sizes, variants, backend=None) -> list[str]:
    """How the world and the bodies were made."""
    L: list[str] = []
    w = L.append
    w("## Setup\n")
    where = backend.describe() if backend is not None else "a fresh SQLite database in a temp dir"
    w(f"- {where[0].upper() + where[1:]}, with `TOKEN_EXCHANGE_ISSUER=http://127.0.0.1:PORT`; "
      "configured only with the CLI: `db upgrade`, "
      "`issuer add EHR --jwks-uri EHR/jwks --source https://fhir.a.example/fhir --algs RS256`, "
      "`target add https://fhir.b.example/fhir --name hospital-b`, `client add vendor --secret-env ...` "
      f"({len(CLIENT_SECRET)}-character secret, HTTP Basic), "
      "`trust add ... --scopes 'patient/*.rs' --upstream-client-id vendor-at-ehr`, `link import FILE.csv`.")
    if "consent" in variants:
        w(f"- Variant consent: `target add {TARGET_CONSENT} --name hospital-c`, `trust add ... --consent required "
          "--consent-max-days 365`, the same links for it, and one recorded consent per linked patient (user "
          "consent-user-K for patient K, `patient/*.rs`), written with the service's own models as the approval "
          "page writes them (no command grants consent on a user's behalf). Its tokens' `sub` is that user; "
          "the ID token carries a random `nonce`, so every pair is still distinct.")
    if "match" in variants:
        w(f"- Variant match: `issuer update EHR --identifier-system {MATCH_SYSTEM}`, `target add "
          f"http://127.0.0.1:PORT/fhir --name hospital-m --match-identifier {MATCH_SYSTEM}`, a trust for it. Its "
          "ID tokens name patients no link or earlier match knows (a distinct range per round and for the "
          "warm-up), with `patient_identifier` of that system.")
    if {"user-as-is", "user-mapped", "user-match"} & set(variants):
        w("- Variants user-as-is and user-mapped: `target add https://fhir.d.example/fhir` (as-is) and "
          "`target add https://fhir.e.example/fhir --users mapped`, trusts with `patient/*.rs user/*.rs`, the "
          "same patient links for each, and for the mapped one `user-link import` of 997 table user links (the "
          "Practitioners pr-0..pr-996 the ID tokens name); their requests ask `patient/Observation.rs "
          "user/Observation.rs`. Variant user-match: `issuer update EHR --user-identifier-system "
          "http://hl7.org/fhir/sid/us-npi`, `target add http://127.0.0.1:PORT/fhir-u --users mapped "
          "--user-match-identifier ...`; its ID tokens name users no link knows, with `fhirUser_identifier`, "
          "and ask `user/Observation.rs`.")
    if "dpop" in variants:
        w("- Variant dpop: the round's bodies, each sent with a DPoP header: a proof (ES256, one client key, "
          "a fresh jti, `htm` POST, `htu` the token endpoint, `iat` the time it was made) signed by the benchmark "
          "right before the run (a proof is good for 60 s), on the same database as the RS256 service.")
    if "es256" in variants:
        w("- Variant es256: a copy of the set-up database (SQLite backup, or PostgreSQL's CREATE DATABASE ... "
          "TEMPLATE), then `keys stage --alg ES256` and "
          "`keys rotate` on it; the service run with `TOKEN_EXCHANGE_DATABASE_URL` pointing at the copy.")
    for imp in imports:
        w(f"- `link import` of {imp['rows']:,} rows: {imp['seconds']:.1f} s, peak RSS of the CLI process "
          f"{imp['peak_rss_mib']:.0f} MiB ({imp['output']}).")
    w(f"- Fake EHR: RSA-2048 key; its JWKS served by the benchmark process on loopback. Tokens as in the smoke "
      f"harness (access token: iss, sub, aud, client_id, scope `{EHR_SCOPE}`, iat, exp, jti; ID token: iss, sub, "
      "aud, azp, iat, exp, fhirUser, patient, source), `sub` distinct per pair, patients drawn at random from "
      "all linked patients.")
    w(f"- Request bodies: {sizes['per_run']:,} distinct token pairs per round (shared by that round's floor and "
      f"service runs; more than the crypto ceiling allows in {args.duration:g} s), a separate warm-up set of "
      f"{sizes['warmup']:,} pairs; each run also restarts gunicorn, so no cache of verified tokens can help. "
      f"Request: `POST /token`, form {TE} with subject_token (access token), actor_token (ID token, "
      f"`{IDT}`), resource={TARGET}, scope={REQ_SCOPE}.")
    w("- Service: `gunicorn -w 2 -b 127.0.0.1:PORT wsgi:app` (cwd the project, with the two env vars). "
      "Floor: `gunicorn -w 2 -b 127.0.0.1:PORT --chdir bench floor_app:app` with "
      "`FLOOR_EHR_PEM`. Same bodies, same wrk script (`bench/token.lua`).")
    w("")
    return L


def _checks(checks, problems) -> list[str]:
    """The end-of-run checks and the problems found."""
    L: list[str] = []
    w = L.append
    w("## Checks\n")
    for c in checks:
        w(f"- {c}")
    if problems:
        w("\n## Problems found\n")
        for p in problems:
            w(f"- {p}")
    w("")
    return L


# -- the end of a run --------------------------------------------------------------
def end_checks(args, info, bench, counts, ehr, fhir) -> list[str]:
    """What the databases (`counts`, World.audit_counts) and the counters of `bench` (the
    measured Runs) say at the end, as the report's Checks; what is wrong is added to
    bench.problems."""
    checks = []
    granted = counts["audit"].get("granted", 0)
    refused = counts["audit"].get("refused", 0)
    table_links = counts["links"].get(f"{TARGET} table", 0)
    checks.append(f"patient links for {TARGET} at the end: {table_links:,} (expected {args.big_links:,}).")
    if table_links != args.big_links:
        bench.problems.append(f"patient_link holds {table_links} rows for {TARGET}, not {args.big_links}")
    if fhir and "user-match" in args.variants:
        users = counts["links"].get(f"users {fhir.user_base} matched", 0)
        checks.append(f"variant user-match: {fhir.user_searches:,} Practitioner searches at the fake target, "
                      f"{users:,} user links stored with origin matched.")
        if users != fhir.user_searches:
            bench.problems.append(f"variant user-match: {fhir.user_searches} searches but {users} matched user links")
    if fhir and "match" in args.variants:
        matched = counts["links"].get(f"{fhir.base} matched", 0)
        match_ok = sum(r["ok"] for r in bench.runs if r["app"] == "service-match")
        checks.append(f"variant match: {fhir.searches:,} searches at the fake target, {matched:,} links "
                      f"stored with origin matched, {match_ok:,} 2xx answers in the kept measured match "
                      "runs (the searches also count warm-ups, hand-sent exchanges and dropped runs; each "
                      "search stored one link).")
        if matched != fhir.searches:
            bench.problems.append(f"variant match: {fhir.searches} searches but {matched} matched links")
    checks.append(f"audit records: {granted:,} granted, {refused:,} refused; 2xx answers this script saw "
                  f"from the service (wrk and the hand-sent exchanges): {bench.service_2xx_seen:,}, non-2xx "
                  f"{bench.service_non2xx_seen:,}. Granted records may exceed the 2xx count by the requests "
                  "in flight when each wrk run stopped (at most one per connection per run); fewer would "
                  "mean a token without its audit record.")
    if granted < bench.service_2xx_seen:
        bench.problems.append(f"only {granted} granted audit records for {bench.service_2xx_seen} 2xx answers")
    codes = sorted({r["code"] for r in bench.runs if r["app"] == "service"})
    checks.append(f"service code (sha256 of token_exchange/*.py and wsgi.py) at each service run: "
                  f"{', '.join(codes)}; commit {info['git_head']} at the start.")
    if len(codes) > 1:
        bench.problems.append("the service's code changed while the benchmark ran (someone edited "
                              "token_exchange/), so its runs measured different code: "
                              + ", ".join(f"{r['phase']} r{r['round']}: {r['code']}"
                                          for r in bench.runs if r["app"] == "service"))
    wrapped = sum(r["wrapped"] for r in bench.runs)
    checks.append(f"token re-use: {'none' if not wrapped else wrapped} (a body file running out would "
                  "re-send tokens).")
    non2xx_svc = sum(r["non2xx"] for r in bench.runs if r["app"] == "service")
    checks.append(f"service non-2xx in measured runs: {non2xx_svc}; wrk's own 'Non-2xx or 3xx' count: "
                  f"{sum(r['wrk_non2xx_or_3xx'] for r in bench.runs if r['app'] == 'service')}.")
    checks.append(f"EHR JWKS fetches during the benchmark: {ehr.jwks_hits} "
                  "(the service caches the issuer's keys; about one fetch per worker per run is expected).")
    return checks


def print_summary(args, crypto, summaries, variants, problems) -> None:
    """The headline figures on the console, and the problems found."""
    s = summaries["small"]
    print(f"\nservice ÷ floor = {s['ratio']:.2f} (CPU-cost ratio {s['cpu_ratio']:.2f})   service {s['service_rate']:.0f}/s "
          f"(p50 {s['service_p50']:.1f} ms, p99 {s['service_p99']:.1f} ms)   floor {s['floor_rate']:.0f}/s   "
          f"ceiling {crypto['ceiling_per_s']:.0f}/s")
    if summaries["big"]:
        b = summaries["big"]
        print(f"at {args.big_links:,} links: service {b['service_rate']:.0f}/s (p50 {b['service_p50']:.1f} ms, "
              f"p99 {b['service_p99']:.1f} ms), service ÷ floor = {b['ratio']:.2f}")
    for v, vs in variants.items():
        if vs:
            print(f"variant {v}: {vs['rate']:.0f}/s, ÷ floor {statistics.median(vs['floor_ratios']):.2f}, "
                  f"÷ RS256 service {statistics.median(vs['service_ratios']):.2f}")
    if problems:
        print("\nPROBLEMS:\n- " + "\n- ".join(problems))
