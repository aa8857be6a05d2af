"""Durations as operators write them: a number of seconds, or Go-style "10s", "500ms", "1m30s".

Apart from agent/health.py, whose checks read them too, because the API and
the upstreams parse them where no check exists (and the check machinery is
loaded only with the first check).
"""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str | float | int) -> float:
    """Seconds from a number of seconds or a Go-style string: ``"10s"``, ``"500ms"``, ``"1m"``, ``"1m30s"``.

    A bare numeric string counts as seconds, like a bare number, so that a value
    read from an environment variable means the same as one read from JSON.
    """
    bad = f"bad duration {text!r}: use a number of seconds or a string like '10s', '500ms', '1m'"
    if isinstance(text, bool):  # bool is an int; True seconds is a config mistake, not a duration
        raise ValueError(bad)
    if isinstance(text, (int, float)):
        value = float(text)
    elif isinstance(text, str):
        s = text.strip()
        if _PLAIN_NUMBER.fullmatch(s):
            value = float(s)
        else:
            pos, value = 0, 0.0
            for m in _DURATION_PART.finditer(s):
                if m.start() != pos:
                    raise ValueError(bad)
                value += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos == 0 or pos != len(s):
                raise ValueError(bad)
    else:
        raise ValueError(bad)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad duration {text!r}: must be a finite number of seconds, not negative")
    return value
