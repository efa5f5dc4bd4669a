"""The one way a time is written for people and tools: RFC 3339 in UTC with `Z`.

`/status`, `inspect`, `check` and log fields all write times through `rfc3339`, so a time
copied from one can be searched for in another (the log's own `ts` has milliseconds too,
in the same form).
"""

from __future__ import annotations

import datetime as dt


def rfc3339(t: dt.datetime) -> str:
    """`2026-12-07T04:38:16Z`; a naive time is taken as UTC (cryptography's `_utc` ones)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_default(value: object) -> object:
    """For json.dumps(default=...): times as rfc3339, anything else as str."""
    return rfc3339(value) if isinstance(value, dt.datetime) else str(value)
