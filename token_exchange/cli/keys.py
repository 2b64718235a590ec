"""`keys stage|rotate|list|prune`: the service's signing keys."""
from __future__ import annotations

import time
from datetime import timedelta

import click

from .. import keys as keymod
from ..clock import aware, utcnow
from ..sealing import SEALED_PREFIX, opens, seal, unseal
from .common import Fail, cli, commit, emit, iso, json_option, pass_ctx, secret_from_env
from .database import new_key


@cli.group()
def keys():
    """The service's signing keys (staged -> active -> retired -> pruned)."""


alg_option = click.option("--alg", type=click.Choice(keymod.SIGNING_ALGS), default=None,
                          help="Signing algorithm of the new key (default: the active key's).")


def _active_alg(change):
    return change.active_key_alg() or keymod.DEFAULT_ALG


@keys.command("stage")
@alg_option
@pass_ctx
def keys_stage(ctx, alg):
    """Publish the next key in /jwks without signing with it yet."""
    with ctx.store.admin.change() as change:
        alg = alg or _active_alg(change)
        if change.staged_key() is not None:
            raise Fail("a key is already staged; `keys rotate` activates it")
        row = new_key(change, ctx, "staged", alg)
        commit(ctx, change, "keys.stage", f"{row.kid} ({alg})")
    click.echo(f"staged key {row.kid} ({alg}); run `keys rotate` to make it active")


@keys.command("rotate")
@alg_option
@pass_ctx
def keys_rotate(ctx, alg):
    """Activate the staged key; the active key retires into its grace period.

    Without a staged key, one is staged first and activated once every worker
    publishes it, so a target never meets a kid it cannot find.
    """
    with ctx.store.admin.change() as change:
        staged = change.staged_key()
        if staged is not None and alg and staged.alg != alg:
            raise Fail(f"the staged key {staged.kid} is {staged.alg}, not {alg}: rotate without --alg, "
                       f"or prune it after a rotation and stage a {alg} key")
        if staged is None:
            alg = alg or _active_alg(change)
            staged = new_key(change, ctx, "staged", alg)
            commit(ctx, change, "keys.stage", f"{staged.kid} ({alg})")
            # Every worker reloads within the reload interval (at once with Redis): wait
            # until the key is published everywhere before anyone signs with it.
            time.sleep(2 * ctx.settings.reload_interval + (0.5 if ctx.settings.reload_interval else 0))
        now = utcnow()
        for old in change.keys("active"):
            old.state, old.retired = "retired", now
        staged.state, staged.activated = "active", now
        change.flush()
        commit(ctx, change, "keys.rotate", f"{staged.kid} ({staged.alg})")
        warning = _cache_warning(ctx, staged, now)
    click.echo(f"active key is now {staged.kid} ({staged.alg})")
    if warning:
        click.echo(warning, err=True)


def _cache_warning(ctx, staged, now) -> str | None:
    """A verifier may hold /jwks for its max-age: a key published (by every worker within
    the reload interval of its staging) less than that long ago may be missing from its
    copy, and the tokens signed with it fail there until then."""
    max_age = keymod.jwks_max_age(ctx.settings.key_grace)
    safe = aware(staged.created) + timedelta(seconds=ctx.settings.reload_interval + max_age)
    if safe <= now:
        return None
    safe = (safe + timedelta(microseconds=999_999)).replace(microsecond=0)  # a whole second, not earlier
    return (f"warning: key {staged.kid} was staged {int((now - aware(staged.created)).total_seconds())} s ago and "
            f"targets may cache /jwks for {max_age} s (its Cache-Control max-age): it is safe to use from "
            f"{safe.strftime('%Y-%m-%dT%H:%M:%SZ')} (in {int((safe - now).total_seconds())} s); until then a "
            f"target holding an older copy may refuse tokens it signs. Stage keys at least {max_age} s before "
            "rotating.")


@keys.command("list")
@json_option
@pass_ctx
def keys_list(ctx, as_json):
    """List the keys (public facts only: kid, algorithm, state, times)."""
    with ctx.store.admin.change() as change:
        rows = [{"kid": k.kid, "alg": k.alg, "state": k.state, "created": iso(k.created),
                 "activated": iso(k.activated), "retired": iso(k.retired)}
                for k in change.keys()]
    emit(rows, as_json, ["kid", "alg", "state", "created", "retired"])


@keys.command("prune")
@pass_ctx
def keys_prune(ctx):
    """Delete retired keys past their grace period (TOKEN_EXCHANGE_KEY_GRACE)."""
    now = utcnow()
    removed = []
    with ctx.store.admin.change() as change:
        for k in change.keys("retired"):
            if (now - aware(k.retired)).total_seconds() > ctx.settings.key_grace:
                removed.append(k.kid)
                change.remove(k)
        if removed:
            commit(ctx, change, "keys.prune", ",".join(removed))
    click.echo(f"pruned {len(removed)} key(s)")


@keys.command("reseal")
@click.option("--old-secret-env", metavar="VAR",
              help="Environment variable holding the key secret the stored values were sealed under "
                   "(omit it to seal values stored before any key secret was set).")
@pass_ctx
def keys_reseal(ctx, old_secret_env):
    """Seal every stored private key and outbound secret under the current
    TOKEN_EXCHANGE_KEY_SECRET: after changing it (give the old one), or after
    setting it for the first time. All or nothing."""
    new = ctx.settings.key_secret
    if not new:
        raise Fail("TOKEN_EXCHANGE_KEY_SECRET is not set: set it to the key secret to seal under")
    old = secret_from_env(old_secret_env, "old key secret", "--old-secret-env") if old_secret_env else None
    moved, stuck = [], []
    with ctx.store.admin.change() as change:
        for what, row, attr in change.sealed():
            value = getattr(row, attr)
            if value.startswith(SEALED_PREFIX) and opens(value, new):
                continue  # sealed under the current key secret already
            key = next((k for k in (old, None) if opens(value, k)), False)  # None: stored unsealed
            if key is False:
                stuck.append(what)
                continue
            setattr(row, attr, seal(unseal(value, key), new))
            moved.append(what)
        if stuck:
            raise Fail(f"{len(stuck)} stored key(s) or secret(s) open under neither key secret "
                       f"({', '.join(stuck[:3])}{', ...' if len(stuck) > 3 else ''}); nothing was changed: "
                       "give --old-secret-env the variable holding the key secret they were sealed under")
        if moved:
            commit(ctx, change, "keys.reseal", f"{len(moved)} key(s) and secret(s)")
    click.echo(f"re-sealed {len(moved)} key(s) and secret(s) under the current TOKEN_EXCHANGE_KEY_SECRET")
    if old is not None:
        click.echo("warning: client and target secrets are hashed with the key secret as pepper and cannot be "
                   "re-sealed: give each a new one (`client rotate-secret`, `target update "
                   "--introspection-secret-env`)", err=True)
