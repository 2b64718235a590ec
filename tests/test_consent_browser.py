"""The consent flow in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against the service served over HTTP (a
threaded werkzeug server of create_app), the OpenID Connect provider of
tests/oidc_provider.py as the EHR, and an app's loopback redirect URI.

exchange -> consent_required -> the consent_uri -> Continue -> sign in at the EHR ->
the approval page (screenshot) -> Allow -> the app's redirect URI with
consent=granted&state -> exchange granted; then Deny; then Withdraw at /consent ->
consent_required again and the earlier token introspects inactive.

Skipped with a plain message where Chromium, chromedriver or selenium is missing;
failed instead under TOKEN_EXCHANGE_TEST_REQUIRE_ALL=1 (CI installs them).
"""
from __future__ import annotations

import base64
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from conftest import AT, IDT, TARGET_SECRET, TE, VENDOR_SECRET, browser_unavailable, build_consent_world
from fakes import TARGET, free_port
from fhirserver import require_all

DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "consent-approval.png"
WAIT = 20  # seconds a page may take to appear on a loaded 2-core machine


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    reason = browser_unavailable()
    if reason:
        (pytest.fail if require_all() else pytest.skip)(reason)


class AppRedirect:
    """The app's registered redirect URI on loopback: records each query it receives."""

    def __init__(self):
        self.hits: list[dict] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if urlsplit(self.path).path == "/app/consent-done":  # not the browser's /favicon.ico
                    hits.append(parse_qs(urlsplit(self.path).query))
                body = b'<!doctype html><html lang="en"><title>Acme Health</title><h1>Back in Acme Health</h1></html>'
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/app/consent-done"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Service:
    """create_app served over real HTTP on loopback (threaded, as a browser needs)."""

    def __init__(self, env):
        from werkzeug.serving import make_server

        from token_exchange import create_app
        self.app = create_app(env=env)
        self.server = make_server("127.0.0.1", int(urlsplit(env["TOKEN_EXCHANGE_ISSUER"]).port), self.app,
                                  threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        ext = self.app.extensions["token_exchange"]
        ext.store.close()
        ext.engine.dispose()


@pytest.fixture
def stack(cli, op, env):
    url = f"http://127.0.0.1:{free_port()}"
    app_redirect = AppRedirect()
    env = dict(env, TOKEN_EXCHANGE_ISSUER=url)
    cli.env = env
    build_consent_world(cli, op, service=url, app_redirect=app_redirect.url)
    service = Service(env)
    yield url, app_redirect
    service.stop()
    app_redirect.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--window-size=820,720"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def exchange(base, op, scope="patient/Observation.rs"):
    data = {"grant_type": TE, "subject_token": op.access_token(scope="patient/*.cruds user/*.rs openid fhirUser"),
            "subject_token_type": AT, "actor_token": op.id_token(), "actor_token_type": IDT, "resource": TARGET,
            "scope": scope}
    return requests.post(base + "/token", data=data, auth=("vendor", VENDOR_SECRET), timeout=WAIT)


def consent_uri(r) -> str:
    body = r.json()
    assert r.status_code == 400 and body["error"] == "consent_required", body
    return body["consent_uri"]


def introspect(base, token):
    auth = "Basic " + base64.b64encode(f"hospital-b:{TARGET_SECRET}".encode()).decode()
    return requests.post(base + "/introspect", data={"token": token}, headers={"Authorization": auth},
                         timeout=WAIT).json()


def wait_for(driver, css):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def click(driver, css):
    wait_for(driver, css).click()


def wait_until_at(driver, url_prefix):
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, WAIT).until(ec.url_contains(url_prefix))


def test_consent_flow_in_a_real_browser(stack, op, browser, tmp_path):
    from selenium.webdriver.common.by import By
    base, app = stack

    # 1. the app's exchange needs consent; it opens the consent_uri with its redirect URI and state
    uri = consent_uri(exchange(base, op, scope="patient/Observation.rs patient/Condition.rs"))
    browser.get(uri + "?" + urlencode({"redirect_uri": app.url, "state": "app-state-1"}))
    assert "Acme Health" in wait_for(browser, "h1").text
    click(browser, "#continue")

    # 2. the EHR's own sign-in form
    wait_until_at(browser, op.issuer + "/authorize")
    wait_for(browser, "#username").send_keys("patient")
    browser.find_element(By.ID, "password").send_keys("patient-pw")
    click(browser, "#signin")

    # 3. the approval page, in plain words
    wait_until_at(browser, base + "/consent/approve")
    heading = wait_for(browser, "h1").text
    assert heading.startswith("Allow Acme Health"), heading
    text = browser.find_element(By.TAG_NAME, "main").text
    assert "read your observations" in text and "read your conditions and problems" in text
    assert "hospital-b" in text and TARGET in text and "a-123" in text
    assert browser.find_element(By.CSS_SELECTOR, "label[for=days-30]").text == "30 days"
    shot = tmp_path / "consent-approval.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if not DOCS_SCREENSHOT.exists():  # committed once, for the README
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    click(browser, "#allow")

    # 4. back at the app, then the exchange goes through silently
    wait_until_at(browser, app.url + "?")
    assert app.hits[-1] == {"consent": ["granted"], "state": ["app-state-1"]}
    r = exchange(base, op)
    assert r.status_code == 200, r.json()
    token = r.json()["access_token"]
    assert introspect(base, token)["active"] is True

    # 5. asked for more, the user denies (signed in at the EHR already: no password)
    uri = consent_uri(exchange(base, op, scope="patient/Observation.rs patient/Appointment.cruds"))
    browser.get(uri + "?" + urlencode({"redirect_uri": app.url, "state": "app-state-2"}))
    click(browser, "#continue")
    wait_until_at(browser, base + "/consent/approve")
    assert "read and write your appointments" in wait_for(browser, "ul.scopes").text
    click(browser, "#deny")
    wait_until_at(browser, app.url + "?consent=denied")
    assert app.hits[-1] == {"consent": ["denied"], "state": ["app-state-2"]}
    assert exchange(base, op).status_code == 200  # the earlier consent stands

    # 6. the user withdraws at /consent
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(base + "/consent")
    signin = wait_for(browser, "form button[type=submit]")  # Sign in at the EHR (single sign-on)
    signin.click()
    WebDriverWait(browser, WAIT).until(ec.staleness_of(signin))
    wait_for(browser, "section.consent")
    assert "Acme Health" in browser.find_element(By.TAG_NAME, "main").text
    withdraw = wait_for(browser, "section.consent button")
    withdraw.click()
    WebDriverWait(browser, WAIT).until(ec.staleness_of(withdraw))  # the page after the POST, not the old one
    wait_for(browser, "main p:not(.who)")
    assert browser.find_elements(By.CSS_SELECTOR, "section.consent") == []
    assert "no active approvals" in browser.find_element(By.TAG_NAME, "main").text
    assert exchange(base, op).json()["error"] == "consent_required"
    assert introspect(base, token) == {"active": False}


def test_consent_page_in_a_frame_is_refused_by_the_browser(stack, op, browser, tmp_path):
    """frame-ancestors 'none': a page framing the consent_uri shows nothing of it."""
    from selenium.webdriver.common.by import By
    base, app = stack
    uri = consent_uri(exchange(base, op))
    page = tmp_path / "framer.html"
    page.write_text(f'<!doctype html><html lang="en"><title>framer</title><iframe id="f" src="{uri}"></iframe></html>')
    browser.get(page.as_uri())
    frame = wait_for(browser, "#f")
    browser.switch_to.frame(frame)
    assert browser.find_elements(By.ID, "continue") == []
    browser.switch_to.default_content()
