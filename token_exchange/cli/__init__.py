"""The `token-exchange` admin CLI: one click group per noun, one module each."""
from . import (audit, clients, database, explain, issuer_check, issuers, keys, links, targets,  # noqa: F401
               trusts)  # each module registers its commands
from .common import cli, main

__all__ = ["cli", "main"]
