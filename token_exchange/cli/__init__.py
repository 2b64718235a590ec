"""The `token-exchange` admin CLI: one click group per noun, one module each."""
from . import (  # noqa: F401
               audit,
               clients,
               config,
               consent,
               database,
               explain,
               issuer_check,
               issuers,
               keys,
               links,
               targets,  # each module registers its commands
               tokens,
               trusts,
               user_links,
)
from .common import cli, main

__all__ = ["cli", "main"]
