"""What every ``mesh-agent`` command shares: the --api and --json options, errors, and output.

Apart from cli/main.py so that cli/commands.py can use them without importing
cli/main.py, which ``python -m cli.main`` runs as ``__main__``: a second copy
of it would hold a second command group.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from cli import client
from cli.client import ApiError, call

DEFAULT_API = "127.0.0.1:7947"
STATUSES = ("alive", "suspect", "dead", "left")


def _segment(value: str) -> str:
    """``value`` as one path segment of an API URL: percent-encoded, "/" included."""
    # urllib.parse (with ipaddress) loads only for the commands that build such URLs, not for
    # `members` or `info`, which operators and their scripts call all day.
    from urllib.parse import quote

    return quote(value, safe="")


def _query(fields: dict[str, Any]) -> str:
    """``fields`` as a URL query string (no leading "?")."""
    from urllib.parse import urlencode

    return urlencode(fields)

_api_address = click.option(
    "--api", envvar="MESH_API", default=DEFAULT_API, show_default=True, show_envvar=True,
    help="Address of the local agent's API.",
)


def _set_token_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        client.token_file = value


_token_file = click.option(
    "--token-file", envvar="MESH_API_TOKEN_FILE", expose_value=False, callback=_set_token_file,
    type=click.Path(dir_okay=False),
    help="File holding the API token (or set MESH_API_TOKEN); the agent's own user on its host needs none.",
)


def api_option(f: Any) -> Any:
    """--api and --token-file, on every command that talks to the agent."""
    return _api_address(_token_file(f))
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON only.")


class OneLineErrors(click.Command):
    """A command whose bad flags get one line (no usage block), as the project's CLI promises."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.ctx = None  # without a context, click prints only "Error: ..."
            raise


def _fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"mesh-agent: {msg}", err=True)
    sys.exit(code)


def _call(api: str, method: str, path: str, body: Any = None) -> Any:
    try:
        return call(api, method, path, body)
    except ApiError as exc:
        _fail(str(exc))


def _emit(data: Any, as_json: bool, text: str) -> None:
    """A command's answer: the API's JSON with --json, else one line for people."""
    if as_json:
        _print_json(data)
    else:
        click.echo(text)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
