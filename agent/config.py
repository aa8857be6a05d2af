"""Agent configuration: flags > MESH_* environment > TOML file > defaults.

The contract (shared/CONTRACT.md) fixes the flag names; every one of them can
also come from the environment or the file, so the same agent runs from a
shell, a unit file or a container without a wrapper script.  Every problem is
reported as one :class:`ConfigError` line, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.dns_settings import DEFAULT_DNS, DnsSettings, settings_from
from gossip.config import PROFILES, GossipConfig
from gossip.keyring import KeyError_, decode_key
from gossip.wire import MAX_TAGS_BYTES, Address, format_addr, parse_addr

DEFAULT_GOSSIP_PORT = 7946
DEFAULT_API = "127.0.0.1:7947"
DEFAULT_TUNNEL_PORT = 7948

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """A configuration problem, worded for the user as one line."""


#: flag name -> (kind, default).  Kinds: str, list, bool.
FLAGS: dict[str, tuple[str, Any]] = {
    "name": ("str", None),
    "bind": ("str", f"0.0.0.0:{DEFAULT_GOSSIP_PORT}"),
    "advertise": ("str", None),
    "join": ("list", []),
    "api": ("str", DEFAULT_API),
    "tunnel": ("str", None),
    "key": ("str", None),
    "key_file": ("str", None),
    "insecure": ("bool", False),
    "data_dir": ("str", None),
    "profile": ("str", "lan"),
    "log_format": ("str", "console"),
    "log_level": ("str", "info"),
    "api_token": ("str", None),
    "api_token_file": ("str", None),
    "api_allow_host": ("list", []),
    "enable_script_checks": ("bool", False),
    # None: the default address (agent.dns.DEFAULT_DNS), given up when taken; "off" turns DNS off.
    "dns": ("str", None),
}


@dataclass
class AgentConfig:
    name: str
    bind: Address
    advertise: Address
    join: list[Address]
    api: Address
    tunnel: Address
    key: bytes | None
    data_dir: Path | None
    profile: str
    gossip: GossipConfig
    log_format: str
    log_level: str
    tags: dict[str, str] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    upstreams: list[dict[str, Any]] = field(default_factory=list)
    intentions: list[dict[str, Any]] = field(default_factory=list)
    #: The config file's ``[[config]]`` tables: mesh-wide config entries (agent.config_entries).
    config_entries: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The bearer token that lets a caller other than the agent's own user use the API (agent.access).
    api_token: str | None = None
    #: Host names, beyond localhost and the API's own addresses, that requests may be addressed to.
    api_allow_hosts: list[str] = field(default_factory=list)
    #: Whether exec checks may be registered over the API (Consul's enable_script_checks).
    enable_script_checks: bool = False
    #: The DNS server's address (None: off), whether it was asked for explicitly, and [dns_config].
    dns: Address | None = None
    dns_explicit: bool = False
    dns_settings: DnsSettings = field(default_factory=DnsSettings)

    @property
    def insecure(self) -> bool:
        return self.key is None


def _env_value(kind: str, raw: str) -> Any:
    if kind == "list":
        return [p.strip() for p in raw.split(",") if p.strip()]
    if kind == "bool":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return raw


def _file_values(path: str) -> dict[str, Any]:
    import tomllib  # only an agent started with a config file reads TOML

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return data


def _check_kind(name: str, kind: str, value: Any, where: str) -> Any:
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of host:port strings")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string")
    return value


def _advertise_host(bind_host: str) -> str:
    """When bound to a wildcard, advertise an address peers can reach."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        host = socket.gethostbyname(socket.gethostname())
        if not host.startswith("127."):
            return host
    except OSError:
        pass
    return "127.0.0.1" if bind_host != "::" else "::1"


def _addr(text: str, what: str, default_port: int | None = None) -> Address:
    try:
        return parse_addr(text, default_port)
    except ValueError as exc:
        raise ConfigError(f"--{what}: {exc}") from None


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def _local_addr(text: str, what: str, default_port: int) -> Address:
    """An address this agent binds: its host must resolve now (a seed's may not, yet)."""
    addr = _addr(text, what, default_port)
    if _is_ip(addr[0]):
        return addr  # what getaddrinfo would say, without loading the idna codec it encodes names with
    try:
        socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ConfigError(f"--{what} {text!r}: {addr[0]!r} is not an address or a name this host resolves") from None
    return addr


def load_key(key: str | None, key_file: str | None, insecure: bool, warnings: list[str],
             keyring_file: Path | None = None) -> bytes | None:
    if key and key_file:
        raise ConfigError("give either --key or --key-file, not both")
    if insecure and (key or key_file):
        raise ConfigError("--insecure cannot be combined with --key or --key-file")
    if key_file:
        try:
            mode = os.stat(key_file).st_mode
            text = Path(key_file).read_text()
        except FileNotFoundError:
            raise ConfigError(f"key file {key_file} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read key file {key_file}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"key file {key_file} is readable by others; chmod 600 it")
        key = text.strip()
    if key:
        try:
            return decode_key(key)
        except KeyError_ as exc:
            raise ConfigError(f"unusable cluster key: {exc} (make one with `mesh-agent keygen`)") from None
    if insecure:
        return None
    if keyring_file is not None and keyring_file.exists():
        # The data dir's keyring (agent.keys) is the agent's own record of the cluster's keys, rotations
        # included: with it, no key need be given again.
        try:
            return decode_key(json.loads(keyring_file.read_text())["keys"][0])
        except (OSError, ValueError, KeyError, IndexError, TypeError, KeyError_) as exc:
            raise ConfigError(f"keyring {keyring_file} is unreadable ({type(exc).__name__}): "
                              "pass --key or --key-file") from None
    raise ConfigError(
        "gossip is encrypted by default: pass --key or --key-file "
        "(make one with `mesh-agent keygen`), or --insecure to run without encryption"
    )


#: Shortest API token accepted: 16 bytes of randomness, as `mesh-agent keygen` makes 32.
MIN_TOKEN_LEN = 16


def load_api_token(token: str | None, token_file: str | None, warnings: list[str]) -> str | None:
    if token and token_file:
        raise ConfigError("give either --api-token or --api-token-file, not both")
    if token_file:
        try:
            mode = os.stat(token_file).st_mode
            token = Path(token_file).read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"API token file {token_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read API token file {token_file}: {getattr(exc, 'strerror', exc)}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"API token file {token_file} is readable by others; chmod 600 it")
    if token is None or token == "":
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_LEN or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"the API token must be at least {MIN_TOKEN_LEN} printable characters with no spaces "
                          "(make one with `mesh-agent keygen`)")
    return token


def resolve(flags: dict[str, Any], environ: dict[str, str] | None = None) -> AgentConfig:
    """Merge flags, environment and config file into a checked AgentConfig.

    ``flags`` holds only what the user actually passed (None means unset).
    """
    env = os.environ if environ is None else environ
    config_path = flags.get("config") or env.get("MESH_CONFIG")
    file_data: dict[str, Any] = _file_values(config_path) if config_path else {}

    values: dict[str, Any] = {}
    for name, (kind, default) in FLAGS.items():
        flag_value = flags.get(name)
        if flag_value is not None and flag_value != () and flag_value is not False:
            values[name] = list(flag_value) if kind == "list" else flag_value
            continue
        env_raw = env.get("MESH_" + name.upper())
        if env_raw is not None and env_raw != "":
            values[name] = _env_value(kind, env_raw)
            continue
        file_key = name if name in file_data else name.replace("_", "-")
        if file_key in file_data:
            values[name] = _check_kind(name, kind, file_data[file_key], f"config file {config_path}")
            continue
        values[name] = default

    known = set(FLAGS) | {n.replace("_", "-") for n in FLAGS} | {"timing", "tags", "service", "upstream", "intention",
                                                                   "config", "dns_config"}
    unknown = sorted(set(file_data) - known)
    if unknown:
        raise ConfigError(f"config file {config_path}: unknown setting {unknown[0]!r}")

    warnings: list[str] = []
    name = values["name"] or socket.gethostname()
    if not NAME_RE.match(name):
        raise ConfigError(
            f"--name {name!r}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    profile = values["profile"]
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    gossip = PROFILES[profile]
    timing = file_data.get("timing", {})
    if not isinstance(timing, dict):
        raise ConfigError(f"config file {config_path}: [timing] must be a table")
    try:
        gossip = gossip.with_overrides(timing)
    except ValueError as exc:
        raise ConfigError(f"config file {config_path}: {exc}") from None

    bind = _local_addr(values["bind"], "bind", DEFAULT_GOSSIP_PORT)
    advertise = (
        _addr(values["advertise"], "advertise", bind[1])
        if values["advertise"]
        else (_advertise_host(bind[0]), bind[1])
    )
    join = [_addr(j, "join", DEFAULT_GOSSIP_PORT) for j in values["join"]]
    api = _local_addr(values["api"], "api", 7947)
    tunnel = (
        _local_addr(values["tunnel"], "tunnel", DEFAULT_TUNNEL_PORT)
        if values["tunnel"]
        else (bind[0], DEFAULT_TUNNEL_PORT)
    )
    if values["log_format"] not in ("console", "json"):
        raise ConfigError(f"--log-format {values['log_format']!r}: choose console or json")
    if values["log_level"] not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level {values['log_level']!r}: choose debug, info, warning or error")

    from agent.keys import KEYRING_FILE

    data_dir = Path(values["data_dir"]) if values["data_dir"] else None
    key = load_key(values["key"], values["key_file"], bool(values["insecure"]), warnings,
                   None if data_dir is None else data_dir / KEYRING_FILE)
    api_token = load_api_token(values["api_token"], values["api_token_file"], warnings)
    from agent.peercred import is_loopback

    if not is_loopback(api[0]) and api_token is None:
        raise ConfigError(f"--api {format_addr(api)} is not a loopback address: anyone who reaches it could "
                          "use the API, so give a token with --api-token-file (or keep --api on 127.0.0.1)")

    tags = file_data.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise ConfigError(f"config file {config_path}: [tags] must map strings to strings")

    if sum(len(k.encode()) + len(v.encode()) for k, v in tags.items()) > MAX_TAGS_BYTES:
        raise ConfigError(f"config file {config_path}: [tags] exceed {MAX_TAGS_BYTES} bytes in all")

    services = file_data.get("service", [])
    if not isinstance(services, list) or not all(isinstance(s, dict) for s in services):
        raise ConfigError(f"config file {config_path}: [[service]] must be an array of tables")
    from agent.services import ServiceError, validate

    seen: set[str] = set()
    for i, raw in enumerate(services):
        try:
            reg = validate(raw, name, advertise[0], source="config")
        except ServiceError as exc:
            raise ConfigError(f"config file {config_path}: service #{i + 1}: {exc}") from None
        if reg.id in seen:
            raise ConfigError(f"config file {config_path}: service #{i + 1}: duplicate id {reg.id!r}")
        seen.add(reg.id)

    upstreams = file_data.get("upstream", [])
    if not isinstance(upstreams, list) or not all(isinstance(u, dict) for u in upstreams):
        raise ConfigError(f"config file {config_path}: [[upstream]] must be an array of tables")
    if upstreams:  # agent.upstreams brings the data plane's modules (agent/plane.py): only for a config with some
        from agent.upstreams import validate as validate_upstream

        for i, raw in enumerate(upstreams):
            try:
                validate_upstream(raw)
            except ServiceError as exc:
                raise ConfigError(f"config file {config_path}: upstream #{i + 1}: {exc}") from None

    intentions = file_data.get("intention", [])
    if not isinstance(intentions, list) or not all(isinstance(r, dict) for r in intentions):
        raise ConfigError(f"config file {config_path}: [[intention]] must be an array of tables")
    from agent.intentions import validate as validate_intention

    pairs: set[tuple[str, str]] = set()
    for i, raw in enumerate(intentions):
        try:
            rule = validate_intention(raw)
        except ServiceError as exc:
            raise ConfigError(f"config file {config_path}: intention #{i + 1}: {exc}") from None
        if (rule.source, rule.destination) in pairs:
            raise ConfigError(f"config file {config_path}: intention #{i + 1}: a second rule from "
                              f"{rule.source!r} to {rule.destination!r} (one rule per pair)")
        pairs.add((rule.source, rule.destination))

    config_entries = file_data.get("config", [])
    if not isinstance(config_entries, list) or not all(isinstance(r, dict) for r in config_entries):
        raise ConfigError(f"config file {config_path}: [[config]] must be an array of tables")
    from agent.entry_kinds import validate as validate_entry

    # Each entry is checked against those before it in the file: an order that writes cleanly.
    earlier: dict[tuple[str, str], dict[str, Any]] = {}
    for i, raw in enumerate(config_entries):
        kind, name = raw.get("kind"), raw.get("name")
        try:
            body = {k: v for k, v in raw.items() if k not in ("kind", "name")}
            earlier[(str(kind), str(name))] = validate_entry(kind, name, body,
                                                             lambda k, n: earlier.get((k, n)))
        except ServiceError as exc:
            raise ConfigError(f"config file {config_path}: config entry #{i + 1}: {exc}") from None

    dns_explicit = values["dns"] is not None and values["dns"].strip().lower() != "off"
    dns = None if (values["dns"] or "").strip().lower() == "off" else \
        _local_addr(values["dns"] or DEFAULT_DNS, "dns", 8600)
    try:
        dns_settings = settings_from(file_data.get("dns_config", {}))
    except ValueError as exc:
        raise ConfigError(f"config file {config_path}: {exc}") from None

    if data_dir is not None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"--data-dir {data_dir}: {exc.strerror}") from None
    return AgentConfig(
        name=name,
        bind=bind,
        advertise=advertise,
        join=join,
        api=api,
        tunnel=tunnel,
        key=key,
        data_dir=data_dir,
        profile=profile,
        gossip=gossip,
        log_format=values["log_format"],
        log_level=values["log_level"],
        tags=dict(tags),
        services=[dict(s) for s in services],
        upstreams=[dict(u) for u in upstreams],
        intentions=[dict(r) for r in intentions],
        config_entries=[dict(r) for r in config_entries],
        warnings=warnings,
        api_token=api_token,
        api_allow_hosts=list(values["api_allow_host"]),
        enable_script_checks=bool(values["enable_script_checks"]),
        dns=dns,
        dns_explicit=dns_explicit,
        dns_settings=dns_settings,
    )


def describe(cfg: AgentConfig) -> dict[str, Any]:
    """What the agent logs at start: everything but secrets."""
    return {
        "name": cfg.name,
        "bind": format_addr(cfg.bind),
        "advertise": format_addr(cfg.advertise),
        "api": format_addr(cfg.api),
        "join": [format_addr(j) for j in cfg.join],
        "profile": cfg.profile,
        "encrypted": not cfg.insecure,
        "api_token": cfg.api_token is not None,
        "script_checks": cfg.enable_script_checks,
        "dns": None if cfg.dns is None else format_addr(cfg.dns),
    }
