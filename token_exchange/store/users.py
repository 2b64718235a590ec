"""User links (contract, "The user at the target"): (source user URL, target) -> the
target's reference for that user, as stored: table, matched or blocked. The request
path's lookup runs precompiled on the hot path (``HotPath.find_user_link``); a match
is stored insert-if-absent, so concurrent first exchanges on any number of instances
store one row. The CLI's reads and writes are here too (``UserLinkAdmin``)."""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from ..models import Target, UserLink
from .admin import bump_conn
from .hotpath import HotPath
from .requests import KeptLinks, drop_matched_row, store_matched_row


class UserLinks:
    """The request path's user links."""

    def __init__(self, engine, hot: HotPath):
        self.engine, self._hot = engine, hot
        self._kept = KeptLinks()

    def find(self, user: str, target_id: int, generation: int | None = None):
        """(target_user, origin, matched_at) or None: one indexed lookup (the unique index),
        or none for a table link or block read under the snapshot ``generation`` already
        (``KeptLinks``, as for patient links)."""
        key = (user, target_id)
        row = self._kept.get(key, generation)
        if row is not None:
            return row
        row = self._hot.run(self._hot.find_user_link, {"user": user, "target_id": target_id}, fetch=True)
        if row is not None and row[2] is not None and not isinstance(row[2], datetime):
            row = (row[0], row[1], self._hot.matched_at_result(row[2]))  # SQLite's DBAPI gives the stored text
        self._kept.keep(key, row, generation)
        return row

    def store_matched(self, user: str, target_id: int, target_user: str, system: str, replace: bool, actor: str,
                      detail: str) -> tuple:
        """Store a matched user link (insert if absent, ``store_matched_row``); return the row
        now stored as (target_user, origin)."""
        return store_matched_row(self.engine, UserLink, {"user": user, "target_id": target_id}, "target_user",
                                 target_user, system, replace, actor, "user-link.match", detail)

    def drop_matched(self, user: str, target_id: int, matched_before, actor: str, detail: str) -> None:
        """Delete a matched user link (a rematch found none or several): ``drop_matched_row``."""
        drop_matched_row(self.engine, UserLink, {"user": user, "target_id": target_id}, matched_before, actor,
                         "user-link.unmatch", detail)


class DuplicateUserLink(Exception):
    """A user link in the file is already stored (stored meanwhile): the import is refused."""


class UserLinkImport:
    """`user-link import`'s one transaction: matched links give way, table links and
    blocks refuse the file."""

    def __init__(self, conn):
        self.conn = conn

    def stored(self, user: str, target_id: int) -> str | None:
        return self.conn.execute(select(UserLink.origin).where(UserLink.user == user,
                                                               UserLink.target_id == target_id)).scalar()

    def remove_matched(self, user: str, target_id: int) -> None:
        self.conn.execute(delete(UserLink).where(UserLink.user == user, UserLink.target_id == target_id,
                                                 UserLink.origin == "matched"))

    def insert(self, rows: list) -> None:
        try:
            with self.conn.begin_nested():
                self.conn.execute(insert(UserLink), [dict(r, origin="table") for r in rows])
        except IntegrityError:
            raise DuplicateUserLink() from None

    def finish(self, actor: str, action: str, detail: str) -> None:
        bump_conn(self.conn, actor, action, detail)


class UserLinkAdmin:
    """The CLI's reads and writes of user links."""

    def __init__(self, engine):
        self.engine = engine

    @contextmanager
    def importing(self):
        with self.engine.begin() as conn:
            yield UserLinkImport(conn)

    @contextmanager
    def rows(self, target_id=None, origins=None, user=None):
        """(user, target base URL, target_user, origin, system, matched_at), in the order stored."""
        q = (select(UserLink.user, Target.base_url, UserLink.target_user, UserLink.origin, UserLink.system,
                    UserLink.matched_at).join(Target, UserLink.target_id == Target.id).order_by(UserLink.id))
        if target_id is not None:
            q = q.where(UserLink.target_id == target_id)
        if origins:
            q = q.where(UserLink.origin.in_(origins))
        if user is not None:
            q = q.where(UserLink.user == user)
        with self.engine.connect() as conn:
            yield conn.execute(q)


def user_link(change, user: str, target_id: int) -> UserLink | None:
    """A user link in an admin change (store.admin.AdminChange)."""
    return change.session.scalars(select(UserLink).where(UserLink.user == user,
                                                         UserLink.target_id == target_id)).first()

