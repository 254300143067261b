"""Durations on the command line: 30d, 12h, 15m (a whole number and a unit)."""

from __future__ import annotations

import re

UNITS = {"d": 86400, "h": 3600, "m": 60}
_DURATION = re.compile(r"\A([0-9]{1,9})([dhm])\Z")


class BadDuration(ValueError):
    """Not a duration we accept; the message is one line for people."""


def parse(text: str | None, what: str = "duration") -> int:
    """Seconds in `text` ('30d', '12h', '15m'); BadDuration for anything else,
    zero included (a window or an age of nothing is always a mistake)."""
    found = _DURATION.match(text or "")
    if not found or int(found.group(1)) == 0:
        raise BadDuration(
            "%s %r is not a duration: write a whole number of days, hours "
            "or minutes, e.g. 30d, 12h or 15m" % (what, text)
        )
    return int(found.group(1)) * UNITS[found.group(2)]
