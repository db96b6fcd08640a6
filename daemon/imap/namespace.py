"""Folder names as written in the config -> folder names as this IMAP server spells them.

The config writes folders with "/" between levels (``Support/Billing``). Servers differ: Dovecot's
default is "/" with no prefix, Cyrus (Debian's default config), Courier and many hosted servers use
"." and keep every personal folder under ``INBOX.``, so the same folder is ``INBOX.Support.Billing``
there. The server says which in its NAMESPACE answer (RFC 2342), or at least its separator in
``LIST "" ""``. ``to_server`` is the one rule, a pure function; ``server_folder`` applies it with the
namespace read once per connection, at every point where a configured name meets the server.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from mailtriage.errors import MailboxError

__all__ = ["CONFIG_SEPARATOR", "Namespace", "namespace_of", "read_namespace", "server_folder", "to_server"]

CONFIG_SEPARATOR = "/"  # how the config writes hierarchy, whatever the server uses


@dataclass(frozen=True)
class Namespace:
    """What a server told us about its folder names.

    ``separator``: its hierarchy delimiter (None: a flat server without levels). ``prefix``: the
    personal namespace's prefix, e.g. "INBOX." ("" when personal folders sit at the top).
    ``others``: the non-empty prefixes of other users' and shared namespaces (a name starting with
    one is not a personal folder and is left alone).
    """

    separator: str | None = CONFIG_SEPARATOR
    prefix: str = ""
    others: tuple[str, ...] = ()

    def describe(self) -> str:
        sep = "no hierarchy separator" if self.separator is None else f"{self.separator!r} as separator"
        return f"this server uses {sep}" + (f" under {self.prefix!r}" if self.prefix else "")


def _is_inbox(part: str) -> bool:
    return part.upper() == "INBOX"  # the one case-insensitive name (RFC 3501 5.1)


def _starts_with(name: str, prefix: str) -> bool:
    # "inbox." and "INBOX." are one prefix: INBOX is case-insensitive, the rest of a name is not.
    if prefix[:5].upper() == "INBOX" and len(prefix) > 5:
        return _is_inbox(name[:5]) and name[5:].startswith(prefix[5:])
    return name.startswith(prefix)


def to_server(name: str, ns: Namespace) -> str:
    """The server's name for the configured folder ``name``; idempotent (a server name maps to itself).

    ``name`` may use "/" between levels, or already the server's separator, with or without the
    personal prefix: on a "." server under "INBOX.", ``Support/Billing``, ``Support.Billing``,
    ``INBOX/Support/Billing`` and ``INBOX.Support.Billing`` all name ``INBOX.Support.Billing``.
    Raises MailboxError naming what to write when the name cannot be read one way only.
    """
    sep = ns.separator
    if _is_inbox(name):
        return "INBOX"
    if any(_starts_with(name, other) for other in ns.others):
        return name  # another user's or a shared folder, written as the server spells it
    if sep is None:
        if CONFIG_SEPARATOR in name:
            raise MailboxError(
                f"folder {name!r}: {ns.describe()} (a flat server: no sub-folders); name a top-level "
                f"folder instead, e.g. {name.replace(CONFIG_SEPARATOR, '-')!r}",
                folder=name,
            )
        return ns.prefix + name if ns.prefix and not _starts_with(name, ns.prefix) else name
    if sep != CONFIG_SEPARATOR and CONFIG_SEPARATOR in name and sep in name:
        # "Support/v1.2" on a "." server: is ".2" a sub-folder? The server would say yes.
        suggestion = ns.prefix + name.replace(CONFIG_SEPARATOR, sep) if not _starts_with(name, ns.prefix) else ""
        raise MailboxError(
            f"folder {name!r} mixes '/' with {sep!r}, and {ns.describe()}: every {sep!r} would start "
            "a sub-folder there. Write the name with the server's separator only"
            + (f" (e.g. {suggestion!r} if each {sep!r} is meant as a level)" if suggestion else "")
            + f", or rename the folder without {sep!r}",
            folder=name,
        )
    parts = name.split(CONFIG_SEPARATOR) if CONFIG_SEPARATOR in name else name.split(sep)
    if any(part == "" for part in parts):
        raise MailboxError(
            f"folder {name!r} has an empty level (a leading, trailing or doubled separator); "
            f"{ns.describe()}: write e.g. {ns.prefix + sep.join(p for p in parts if p)!r}",
            folder=name,
        )
    prefix_parts = [p for p in ns.prefix.split(sep) if p] if ns.prefix else []
    if prefix_parts and len(parts) > len(prefix_parts) and all(
        (_is_inbox(a) and _is_inbox(b)) or a == b for a, b in zip(parts, prefix_parts)
    ):
        parts = parts[len(prefix_parts):]  # the prefix was written already (maybe with "/")
    if _is_inbox(parts[0]):
        parts[0] = "INBOX"
    return ns.prefix + sep.join(parts)


def read_namespace(client: Any) -> Namespace:
    """Ask the server: NAMESPACE when offered, else the separator of ``LIST "" ""`` (no prefix)."""
    if client.has_capability("NAMESPACE"):
        personal, other, shared = client.namespace()
        prefix, sep = (personal[0] if personal else ("", None))
        if sep is None and not personal:
            sep = _list_separator(client)
        others = tuple(p for group in (other, shared) if group for p, _s in group if p)
        return Namespace(separator=sep or None, prefix=prefix or "", others=others)
    return Namespace(separator=_list_separator(client))


def _list_separator(client: Any) -> str | None:
    # LIST "" "" answers one line whose delimiter is the root's hierarchy separator (RFC 3501 6.3.8).
    for _flags, delim, _name in client.list_folders("", ""):
        if delim:
            return delim.decode() if isinstance(delim, bytes) else str(delim)
        return None
    return CONFIG_SEPARATOR  # no answer at all: assume the common case, names stay as written


_cache: weakref.WeakKeyDictionary[Any, Namespace] = weakref.WeakKeyDictionary()


def namespace_of(client: Any) -> Namespace:
    """The namespace of ``client``'s server, read once per connection."""
    ns = _cache.get(client)
    if ns is None:
        ns = _cache[client] = read_namespace(client)
    return ns


def server_folder(client: Any, name: str) -> str:
    """``to_server(name)`` for the server ``client`` is logged in to."""
    return to_server(name, namespace_of(client))
