"""The web dashboard served at ``GET /`` on the API port.

One self-contained page (inline script and style, no build step, nothing
fetched from elsewhere) so that it works on a host with no internet access
and ships as a plain package data file.  The page reads the same JSON
endpoints as the CLI, once a second, and follows the monitor stream for
member events, so a member that is suspect for less than a poll interval
still shows as such.
"""

from __future__ import annotations

import functools
from importlib import resources

#: The page only talks to the agent that served it; its script and style are inline.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = [
    ("content-type", "text/html; charset=utf-8"),
    ("cache-control", "no-store"),
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
]


@functools.cache
def page() -> bytes:
    """The page's bytes: read once, then kept (it is small and never changes while running)."""
    return resources.files("agent").joinpath("dashboard.html").read_bytes()
