"""The `token-exchange` admin CLI: one click group per noun, one module each."""
from . import audit, clients, consent, database, explain, issuers, keys, links, targets, trusts  # noqa: F401 - register commands
from .common import cli, main

__all__ = ["cli", "main"]
