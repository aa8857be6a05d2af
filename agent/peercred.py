"""Which local user owns the other end of a loopback TCP connection.

The API trusts the agent's own user (and root) without a token, as a Unix
socket with file permissions would, but over TCP, so that the CLI, the
compose sidecars and ``curl`` keep working with nothing but ``--api``.
TCP has no SO_PEERCRED; Linux records the uid that created every socket
(``sk_uid``, the creator's fsuid) and shows it to anyone through sock_diag,
the netlink interface behind ``ss -e``.  An exact lookup by the connection's
4-tuple asks the kernel for one socket: its cost does not grow with the
number of sockets on the host, so a local user cannot make each lookup
slower by opening many.  Where netlink is refused (a seccomp profile, a
kernel without inet_diag), ``/proc/net/tcp`` and ``tcp6`` tell the same
(RFC-free; both formats are the kernel's: ``Documentation/networking/proc_net_tcp.rst``).

Only loopback peers are looked up: a remote host's socket is not in this
network namespace, and trusting a lookup across a NAT is not worth the risk.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

NETLINK_INET_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
#: struct nlmsghdr: length, type, flags, sequence, port id.
_NLMSGHDR = struct.Struct("=IHHII")
#: struct inet_diag_req_v2 with its inet_diag_sockid: family, protocol, ext, pad, states,
#: then sport and dport (big-endian), src[16], dst[16], interface, cookie[2].
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
#: Offset of idiag_uid in struct inet_diag_msg: 4 bytes of header, the 48-byte
#: sockid, then expires, rqueue and wqueue (4 bytes each).
_UID_OFFSET = 4 + 48 + 12
_TCP_ALL_STATES = 0xFFFFFFFF

Sockaddr = tuple[str, int]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or the name localhost) can be reached only from this host."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _packed(host: str) -> tuple[int, bytes]:
    """The family and the 16-byte address field sock_diag compares (IPv4 in the first 4)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return socket.AF_INET, ip.packed + bytes(12)
    return socket.AF_INET6, ip.packed


def uid_by_sock_diag(peer: Sockaddr, local: Sockaddr) -> int | None:
    """The uid of the TCP socket whose own address is ``peer`` and whose remote is ``local``.

    None when the kernel knows no such socket (the client has gone).  OSError
    when netlink itself is not usable here.
    """
    family, src = _packed(peer[0])
    family2, dst = _packed(local[0])
    if family != family2:
        return None
    req = (_REQ.pack(family, socket.IPPROTO_TCP, 0, _TCP_ALL_STATES)
           + _SOCKID.pack(peer[1], local[1], src, dst)
           + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_INET_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSGHDR.size:
        raise OSError("short sock_diag answer")
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind == NLMSG_ERROR:
        (errno_neg,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        if -errno_neg == 2:  # ENOENT: no such socket
            return None
        raise OSError(-errno_neg, os.strerror(-errno_neg))
    if kind != SOCK_DIAG_BY_FAMILY or len(data) < _NLMSGHDR.size + _UID_OFFSET + 4:
        raise OSError(f"unexpected sock_diag answer type {kind}")
    (uid,) = struct.unpack_from("=I", data, _NLMSGHDR.size + _UID_OFFSET)
    return int(uid)


def _proc_hex(host: str, port: int) -> tuple[str, str]:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, then the port."""
    family, packed = _packed(host)
    raw = packed[:4] if family == socket.AF_INET else packed
    words = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    text = "".join(struct.pack("=I", int.from_bytes(w, "big")).hex().upper() for w in words)
    return ("tcp" if family == socket.AF_INET else "tcp6"), f"{text}:{port:04X}"


def uid_by_proc(peer: Sockaddr, local: Sockaddr, root: str = "/proc/net") -> int | None:
    table, want_local = _proc_hex(*peer)
    table2, want_remote = _proc_hex(*local)
    if table != table2:
        return None
    with open(os.path.join(root, table)) as fh:
        next(fh, None)  # the header line
        for line in fh:
            fields = line.split()
            if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                return int(fields[7])
    return None


def loopback_peer_uid(peer: Sockaddr, local: Sockaddr) -> int | None:
    """The uid owning the client end of an accepted loopback connection, or None when unknown."""
    if not (is_loopback(peer[0]) and is_loopback(local[0])):
        return None
    peer = (_unmapped(peer[0]), peer[1])
    local = (_unmapped(local[0]), local[1])
    try:
        return uid_by_sock_diag(peer, local)
    except (OSError, ValueError):
        pass
    try:
        return uid_by_proc(peer, local)
    except (OSError, ValueError):
        return None


def _unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 client) as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host
