"""`token-exchange serve`: gunicorn with the application factory."""
from __future__ import annotations

from gunicorn.app.base import BaseApplication


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


def run(host: str, port: int, workers: int) -> None:
    _App({"bind": f"{host}:{port}", "workers": workers, "worker_class": "sync",
          "graceful_timeout": 20, "timeout": 30, "keepalive": 5,
          "accesslog": None, "errorlog": "-", "loglevel": "warning"}).run()
