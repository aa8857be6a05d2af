"""``mesh-agent``: run an agent, or talk to the local one through its API.

The group and ``agent`` live here; every other command (cli/commands.py, and
stat and tap from cli/traffic.py) is attached the first time one of them, or
the help that lists them, is asked for.  An agent is started often (every
rollout, every test) and runs ``agent`` alone: it then builds none of the
thirty-odd others, their options and their code.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cli.common import OneLineErrors, _fail, api_option, json_option


class _Commands(click.Group):
    """The command group; its commands other than ``agent`` are attached on first need."""

    _complete = False

    def _attach_all(self) -> None:
        if self._complete:
            return
        self._complete = True
        from cli import commands, traffic

        for command in commands.COMMANDS:
            self.add_command(command)
        traffic.register(self, api_option, json_option, OneLineErrors)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._attach_all()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._attach_all()
        return super().list_commands(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mesh-agent")
def main() -> None:
    """mesh-agent: a decentralized service mesh agent (SWIM gossip, no control plane)."""


@main.command(cls=OneLineErrors, epilog="Every flag may also be set as an environment variable MESH_<FLAG> "
              "(upper case, dashes as underscores: MESH_KEY, MESH_JOIN=a:7946,b:7946) or as a key of the "
              "--config TOML file; a flag wins over the environment, which wins over the file.")
@click.option("--name", help="Unique node name (default: host name).")
@click.option("--bind", help="Gossip address, UDP and TCP [0.0.0.0:7946].")
@click.option("--advertise", help="Address peers should use, when --bind is not reachable.")
@click.option("--join", multiple=True, help="Seed to join through (repeatable).")
@click.option("--api", "api_addr", help="Local HTTP API address [127.0.0.1:7947].")
@click.option("--tunnel", help="Encrypted tunnel address [bind host:7948].")
@click.option("--key", help="Cluster key, base64 of 32 bytes (see `mesh-agent keygen`).")
@click.option("--key-file", type=click.Path(dir_okay=False), help="File holding the cluster key.")
@click.option("--insecure", is_flag=True, default=None, help="Run gossip without encryption (not for production).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Directory for persistent state.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--profile", type=click.Choice(["lan", "local", "wan"]), help="Timing profile [lan].")
@click.option("--log-format", type=click.Choice(["console", "json"]),
              help="Log lines for people or machines [console].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least level logged [info].")
@click.option("--api-token", "--token", "api_token",
              help="Token that lets other users and hosts use the API (prefer --api-token-file).")
@click.option("--api-token-file", "--token-file", "api_token_file", type=click.Path(dir_okay=False),
              help="File holding the API token.")
@click.option("--api-allow-host", multiple=True,
              help="Another host name the API may be addressed by (repeatable; DNS rebinding guard).")
@click.option("--dns", help="DNS server address, UDP and TCP, or 'off' [127.0.0.1:8600, skipped when taken].")
@click.option("--enable-script-checks", is_flag=True, default=None,
              help="Allow exec checks registered over the API (config-file exec checks need nothing).")
def agent(api_addr: str | None, config_file: str | None, **flags: Any) -> None:
    """Run an agent in the foreground; SIGINT/SIGTERM leave gracefully."""
    import gc

    # No cyclic collection while the agent's modules load: every agent of a node pays the
    # collector's passes over the import's young objects at each start, for the little they
    # would free (import-time cycles, kept and frozen with the rest; docs/footprint.md has
    # both figures).
    gc.disable()
    from agent import lean

    # First, before anything imports hashlib or trio: see agent/lean.py.
    lean.import_trio()
    import trio

    from agent.config import ConfigError, resolve

    flags["api"] = api_addr
    flags["config"] = config_file
    try:
        cfg = resolve(flags)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    from agent import log
    from agent.runner import Agent, StartupError

    log.configure(cfg.log_format, cfg.log_level)
    # Everything imported so far lives as long as the process: keep it out of
    # the cyclic collector's full passes, which would otherwise walk it again
    # and again on a busy agent.
    gc.freeze()
    gc.enable()

    async def _main() -> None:
        await Agent(cfg).run()

    try:
        trio.run(_main)
    except StartupError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
