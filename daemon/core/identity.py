"""Which server and login an account really reaches, whatever it is called: the key for the
mailbox lock, for claims and for refusing two accounts on one mailbox.

An account's name is a label in our config; the server does not know it. Two accounts reaching one
login (``127.0.0.1`` / ``localhost`` / ``127.1``, port 143 / 993, ``Support`` / ``support``), or one
account renamed between two daemons on one state database, would otherwise file every message
twice. Pure (no DNS): a key must be the same in every process and on every run.
"""

from __future__ import annotations

import ipaddress
import socket


def server_id(host: str) -> str:
    """One spelling per server we can recognise without DNS: loopback in any form is "loopback",
    IPv4/IPv6 literals normalised (``127.1`` and ``0x7f.0.0.1`` as the resolver reads them), names
    lowercased without the root dot. The port is left out: 143 and 993 are one server."""
    h = host.strip().lower().rstrip(".").strip("[]")
    if h == "localhost" or h.endswith(".localhost"):  # RFC 6761: always loopback
        return "loopback"
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(h)
    except ValueError:
        if not h or not all(part and part[0].isdigit() for part in h.split(".")):
            return h  # a name: a word in it starts with a letter
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return h
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return "loopback" if ip.is_loopback else str(ip)


def login_id(username: str, host: str) -> str:
    """The login an account reaches: username (IMAP servers compare it without case) at server."""
    return f"{username.strip().lower()}@{server_id(host)}"
