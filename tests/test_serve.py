"""`token-exchange serve` as operators run it (issue "Operators and admins"): metrics
that add up across workers, start-up and shut-down lines, and warnings about unsafe
or inconsistent settings."""
from __future__ import annotations

import json
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from test_scaleout import Instance


def decisions(base) -> dict:
    text = requests.get(base + "/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "token_exchange_requests_total":
                out[(s.labels["outcome"], s.labels["error"])] = s.value
    return out


def test_every_scrape_under_two_workers_reports_the_sum_over_all_workers(env, world, ehr, tmp_path):
    server = Instance(env, tmp_path)
    try:
        granted = refused = 0
        for i in range(12):
            if i % 3 == 0:
                assert server.exchange(ehr, data={"resource": "https://unknown.example/fhir"}).status_code == 400
                refused += 1
            else:
                assert server.exchange(ehr).status_code == 200
                granted += 1
        scrapes = [decisions(server.base) for _ in range(12)]  # each may be answered by either worker
        for s in scrapes:
            assert s == {("granted", ""): granted, ("refused", "invalid_target"): refused}, scrapes
    finally:
        server.stop()
    # each decision was one JSON line in the server's log, as `serve` writes them
    lines = [json.loads(x) for x in (tmp_path / f"serve-{server.port}.log").read_text().splitlines()
             if x.startswith("{")]
    made = [x for x in lines if x["logger"] == "token_exchange.decision"]
    assert sorted(x["msg"] for x in made) == ["granted"] * granted + ["refused"] * refused
    for x in made:
        assert x["level"] == "info" and x["client_id"] == "vendor" and len(x["request_id"]) == 32 and x["time"]
    assert {x["error"] for x in made if x["msg"] == "refused"} == {"invalid_target"}


def test_serve_logs_one_line_at_start_and_one_at_shutdown_without_the_database_password(env, world, tmp_path):
    server = Instance(env, tmp_path)
    server.stop()
    lines = [json.loads(line) for line in (tmp_path / f"serve-{server.port}.log").read_text().splitlines()
             if line.startswith("{")]
    (start,) = [rec for rec in lines if rec["msg"] == "starting"]
    assert start["address"] == f"127.0.0.1:{server.port}" and start["workers"] == 2
    assert start["issuer"] == env["TOKEN_EXCHANGE_ISSUER"] and "database" in start
    assert any(rec["msg"] == "stopped" for rec in lines)


def _serve_once(env, tmp_path, *args):
    """Run serve until it is ready (or exits) and return its log lines."""
    import os
    import signal
    import subprocess
    from test_scaleout import BIN
    from fakes import free_port
    port = free_port()
    log = tmp_path / f"serve-{port}.txt"
    with open(log, "w") as out:
        p = subprocess.Popen([str(BIN / "token-exchange"), "serve", "--port", str(port), "--workers", "1", *args],
                             env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and p.poll() is None:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.1)  # polling the start
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
            code = p.wait(20)
    return code, port, log.read_text().splitlines()


def _warnings(lines):
    return [json.loads(x)["msg"] for x in lines if x.startswith("{") and json.loads(x)["level"] == "warning"]


def test_serve_warns_when_the_issuer_names_another_port_and_when_no_key_secret_is_set(env, world, tmp_path):
    env = dict(env, TOKEN_EXCHANGE_ISSUER="http://127.0.0.1:8000")
    env.pop("TOKEN_EXCHANGE_KEY_SECRET", None)
    _, port, lines = _serve_once(env, tmp_path)
    warnings = _warnings(lines)
    assert any("names port 8000" in w and f"listens on {port}" in w for w in warnings), warnings
    assert any("TOKEN_EXCHANGE_KEY_SECRET is not set" in w for w in warnings), warnings


def test_serve_warns_when_it_listens_beyond_loopback_with_an_http_issuer(env, world, tmp_path):
    _, _, lines = _serve_once(dict(env, TOKEN_EXCHANGE_KEY_SECRET="k" * 40), tmp_path, "--host", "0.0.0.0")
    warnings = _warnings(lines)
    assert any("beyond loopback" in w for w in warnings), warnings
    assert any("were stored before TOKEN_EXCHANGE_KEY_SECRET" in w for w in warnings), warnings


def test_serve_with_a_secret_and_a_matching_https_issuer_warns_of_nothing(env, world, tmp_path, cli):
    env = dict(env, TOKEN_EXCHANGE_KEY_SECRET="k" * 40)
    from conftest import CLI
    CLI(env)("keys", "reseal")  # the key and the EHR's secret sealed under it
    env["TOKEN_EXCHANGE_ISSUER"] = "https://te.example"
    _, _, lines = _serve_once(env, tmp_path)
    assert _warnings(lines) == []


def test_invalid_settings_refuse_to_start_with_one_line_naming_the_variable(env, world, tmp_path):
    for name, value in (("TOKEN_EXCHANGE_METRICS", "maybe"), ("TOKEN_EXCHANGE_TOKEN_TTL", "soon"),
                        ("TOKEN_EXCHANGE_REDIS_URL", "http://cache"), ("TOKEN_EXCHANGE_ISSUER", "te.example")):
        code, _, lines = _serve_once(dict(env, **{name: value}), tmp_path)
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines


def test_a_worker_killed_under_load_loses_no_audit_record_of_a_token_it_answered(env, world, ehr, tmp_path):
    """Every answered token has its committed audit record, also when a worker dies by
    SIGKILL mid-load (threaded workers commit audit records together, never after answering)."""
    import base64
    import os
    import signal
    import subprocess
    import threading

    from conftest import audit_rows
    server = Instance(env, tmp_path)
    jtis, killed, errors = [], threading.Event(), []
    lock = threading.Lock()

    def client(n):
        session = requests.Session()
        for _ in range(n):
            try:
                r = server.exchange(ehr)
            except requests.RequestException:
                continue  # a connection the killed worker held
            if r.status_code == 200:
                payload = r.json()["access_token"].split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                with lock:
                    jtis.append(claims["jti"])
                    if len(jtis) == 40 and not killed.is_set():  # well into the load: kill a worker
                        kids = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                              text=True).stdout.split()
                        os.kill(int(kids[0]), signal.SIGKILL)
                        killed.set()
            elif r.status_code != 503:
                errors.append(r.status_code)
        session.close()
    try:
        threads = [threading.Thread(target=client, args=(30,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert killed.is_set() and len(jtis) > 60 and errors == []
    recorded = {row["jti"] for row in audit_rows(world, "--outcome", "granted")}
    assert set(jtis) <= recorded, f"{len(set(jtis) - recorded)} answered tokens have no audit record"


def test_every_line_serve_and_gunicorn_write_is_json_and_the_master_s_warnings_survive(env, world, tmp_path):
    """gunicorn's own lines (a malformed request, the master seeing a worker killed) are JSON
    lines like ours, never '--- Logging error ---' tracebacks."""
    import os
    import signal
    import socket
    import subprocess
    from test_scaleout import until
    server = Instance(env, tmp_path)
    try:
        for _ in range(5):  # a header line without a colon, and a header name with a space
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\nnocolon\r\n\r\n")
                s.recv(4096)
        kids = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(kids[0]), signal.SIGKILL)
        log = tmp_path / f"serve-{server.port}.log"
        assert until(10, lambda: "SIGKILL" in log.read_text()), "the master's line about the killed worker is missing"
        assert until(10, lambda: requests.get(server.base + "/healthz", timeout=2).status_code == 200)
    finally:
        server.stop()
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]
    records = [json.loads(x) for x in lines]
    (killed,) = [r for r in records if "SIGKILL" in r["msg"]]
    assert killed["logger"] == "gunicorn.error" and killed["level"] == "error"


def _raw_answer(port, request: bytes) -> tuple[str, dict, bytes]:
    """(status line, headers in lower case, body) of the answer to raw request bytes."""
    import socket
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")
    return status, {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}, body


def test_a_request_gunicorn_cannot_parse_is_answered_with_a_json_error_not_an_html_page(env, world, tmp_path):
    """Issue 26: a malformed request line or header is refused by gunicorn before the
    service sees it; its answer is the service's JSON error, with its status."""
    server = Instance(env, tmp_path)
    try:
        answers = [(raw, _raw_answer(server.port, raw)) for raw in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",  # a control byte in a header value
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x7fName: 1\r\n\r\n",  # an invalid byte in a header name
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
            b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",  # the request line
        )]
    finally:
        server.stop()
    for raw, (status, headers, body) in answers:
        assert status.startswith("HTTP/1.1 400 "), (raw, status, body)
        assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store", (raw, headers)
        assert int(headers["content-length"]) == len(body), (raw, headers, body)
        answer = json.loads(body)
        assert answer["error"] == "invalid_request" and answer["error_description"], (raw, answer)


def test_a_body_not_sent_in_time_is_answered_408_as_a_json_error(env, world, tmp_path):
    server = Instance(dict(env, TOKEN_EXCHANGE_REQUEST_READ_TIMEOUT="1"), tmp_path)
    try:  # the body stops short of its Content-Length; the server answers at the read deadline
        status, headers, body = _raw_answer(server.port, b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                            b"application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nab")
    finally:
        server.stop()
    assert status.startswith("HTTP/1.1 408 ") and headers["content-type"] == "application/json", (status, headers)
    assert json.loads(body) == {"error": "invalid_request", "error_description": "The request was not sent in time."}


def test_the_whole_service_killed_under_load_loses_no_audit_record_of_a_token_it_answered(env, world, ehr,
                                                                                          tmp_path):
    """SIGKILL to the master and every worker at once, mid-load (threaded workers commit
    audit records together): every token the service answered has its committed record."""
    import base64
    import os
    import signal
    import threading

    from conftest import audit_rows
    server = Instance(env, tmp_path)
    jtis, killed, errors = [], threading.Event(), []
    lock = threading.Lock()

    def client(n):
        for _ in range(n):
            if killed.is_set():
                return
            try:
                r = server.exchange(ehr)
            except requests.RequestException:
                continue  # the service is gone
            if r.status_code == 200:
                payload = r.json()["access_token"].split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                with lock:
                    jtis.append(claims["jti"])
                    if len(jtis) == 40 and not killed.is_set():  # well into the load: kill them all
                        os.killpg(server.proc.pid, signal.SIGKILL)
                        killed.set()
            elif r.status_code != 503:
                errors.append(r.status_code)
    threads = [threading.Thread(target=client, args=(30,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.proc.wait(20)
    server.log.close()
    assert killed.is_set() and len(jtis) >= 40 and errors == []
    recorded = {row["jti"] for row in audit_rows(world, "--outcome", "granted")}
    assert set(jtis) <= recorded, f"{len(set(jtis) - recorded)} answered tokens have no audit record"


def test_serve_freezes_what_the_master_imported_before_each_fork(env, monkeypatch):
    """The master's objects (every module `serve` imported) go to the collector's permanent
    generation before a worker forks: a worker's collections, including the ones at its exit,
    never walk the inherited heap (which used to keep an idle worker busy for seconds after
    SIGTERM, copying every shared page as it went)."""
    import gc

    from token_exchange import logs, wsgi_server
    from token_exchange.settings import Settings
    options = {}

    class Captured:
        def __init__(self, opts):
            options.update(opts)

        def run(self):
            pass
    monkeypatch.setattr(wsgi_server, "_App", Captured)
    monkeypatch.setattr(logs, "configure", lambda: None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # run() sets it; restored after the test
    wsgi_server.run("127.0.0.1", 0, 2, settings=Settings.from_env(env))
    before = gc.get_freeze_count()
    try:
        options["pre_fork"](None, None)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
