"""The `token-exchange` admin CLI: one click group per noun, one module each."""
from . import (audit, clients, consent, database, explain, issuer_check, issuers, keys, links,  # noqa: F401
               targets, trusts)  # each module registers its commands
from .common import cli, main

__all__ = ["cli", "main"]
