"""The one clock helper: timezone-aware UTC datetimes (a database may hand back naive ones)."""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """``dt`` as UTC-aware: a naive value (SQLite gives them) is read as UTC; None stays None."""
    return dt if dt is None or dt.tzinfo else dt.replace(tzinfo=timezone.utc)
