"""`token-exchange serve`: gunicorn with the application factory.

The server owns a private directory for the workers' metrics (prometheus_client's
multiprocess mode), so a scrape answered by any worker reports the sum over all;
it logs one line at start (address, issuer, database without its password,
workers) and one at shut-down.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from gunicorn.app.base import BaseApplication

log = logging.getLogger("token_exchange.server")


class _App(BaseApplication):
    def __init__(self, options):
        self.options = options
        super().__init__()

    def load_config(self):
        for k, v in self.options.items():
            self.cfg.set(k, v)

    def load(self):
        from . import create_app
        return create_app()


def _child_exit(server, worker):
    """A worker's live gauges go with it; its counts stay in the sum."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def run(host: str, port: int, workers: int, settings=None) -> None:
    from . import logs
    logs.configure()
    metrics_dir = tempfile.mkdtemp(prefix="token-exchange-metrics-")  # 0700, empty: counts start at zero
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    master = os.getpid()

    def remove_metrics_dir():
        if os.getpid() == master:  # workers are forked inside run(): they must not remove it on their exit
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if settings is not None:
        from sqlalchemy.engine import make_url
        log.info("starting", extra={"address": f"{host}:{port}", "issuer": settings.issuer, "workers": workers,
                                    "database": make_url(settings.database_url).render_as_string(hide_password=True)})

    def on_exit(server):
        remove_metrics_dir()
        log.info("stopped", extra={"address": f"{host}:{port}"})
    try:
        _App({"bind": f"{host}:{port}", "workers": workers, "worker_class": "sync",
              "graceful_timeout": 20, "timeout": 30, "keepalive": 5,
              "accesslog": None, "errorlog": "-", "loglevel": "warning",
              "child_exit": _child_exit, "on_exit": on_exit}).run()
    finally:
        remove_metrics_dir()
