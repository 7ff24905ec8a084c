"""UTC times typed by a user (``--start``/``--end`` of ``query`` and ``plot``) and written back.

One parser for every command, so ``2026-08-09T21:00Z``, ``2026-08-09T23:00+02:00`` and a bare
``2026-08-09`` mean the same instant everywhere; no zone means UTC, never the machine's zone.
"""

from __future__ import annotations

from datetime import UTC, datetime


class TimeError(ValueError):
    """A time that cannot be parsed: one line naming the flag, for the user."""


def parse_utc(text: str, flag: str) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC ``datetime`` (``Z`` or an offset allowed)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise TimeError(f"{flag}: {text!r} is not an ISO 8601 date or time, like 2026-08-09T21:00Z") from None
    return as_utc(value)


def is_bare_date(text: str) -> bool:
    """``2026-08-09`` (a whole day), as opposed to a moment."""
    return len(text.strip()) == 10


def as_utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_text(value: datetime) -> str:
    """``2026-08-09T21:00:00Z``: whole seconds, for messages and command lines."""
    return f"{as_utc(value):%Y-%m-%dT%H:%M:%SZ}"
