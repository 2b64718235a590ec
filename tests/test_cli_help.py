"""Every command and every option of `token-exchange` says what it is for (its --help)."""
from __future__ import annotations

import click

from token_exchange.cli import cli


def walk(group, path=()):
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from walk(cmd, path + (name,))


def test_every_command_and_option_has_help_text():
    missing = []
    for path, cmd in walk(cli):
        if not (cmd.help or "").strip():
            missing.append(" ".join(path))
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert missing == []
