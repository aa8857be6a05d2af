"""host:port addresses as people write them and as the code holds them.

Kept apart from the wire format so that the CLI, which speaks only HTTP to
the agent, can parse ``--api`` without importing the protocol (and msgpack).
"""

from __future__ import annotations

Address = tuple[str, int]


def format_addr(addr: Address) -> str:
    """host:port, with IPv6 hosts in brackets (RFC 3986 section 3.2.2)."""
    host, port = addr
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_addr(text: str, default_port: int | None = None) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or (with a default port) ``host``."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest == "" and default_port is not None:
            return (host, default_port)
        if not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [host]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" not in text and default_port is not None:
        return (text, default_port)
    else:
        raise ValueError(f"bad address {text!r}: expected host:port")
    if not host:
        raise ValueError(f"bad address {text!r}: empty host")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"bad address {text!r}: port is not a number")
    port = int(port_text)
    if not 0 <= port < 65536:
        raise ValueError(f"bad address {text!r}: port out of range")
    return (host, port)
