"""Test mail and test configurations, built one way for every test, the demo and the benchmarks.

Each test file once had its own copy of "a message with this subject" and "a config for this
Dovecot"; the copies drifted (line endings, MIME headers, which fields were set). Here there is
one of each, with keyword arguments for what a test really varies.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Iterable, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from mailtriage.config import Config, parse_config

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}


# -- mail ---------------------------------------------------------------------------------------------


def mail(
    body: str = "Hello, please help.",
    subject: str = "help",
    *,
    sender: str = "customer@example.com",
    to: str = "support@example.com",
    message_id: str | None = None,
    date: str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = "text/plain",
    encode: bool = True,
    prepend: bytes = b"",
    linesep: str = "\r\n",
) -> bytes:
    """One RFC 822 message as bytes.

    ``message_id``: None makes a unique one, "" leaves the field out. ``date``: None leaves it out,
    "now" is the current time. ``headers`` come after the standard fields; ``prepend`` is raw bytes
    put before all of them (a forged or hostile field the test wants verbatim).
    ``encode`` (the default) lets the stdlib add MIME headers and a transfer encoding where a line
    is too long; ``encode=False`` writes the body as given (lines over 998 bytes stay, as a DKIM or
    pass-through test needs), declared us-ascii.
    """
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    if date is not None:
        msg["Date"] = email.utils.formatdate() if date == "now" else date
    if message_id is None:
        message_id = f"<mail-{time.time_ns()}@example.com>"
    if message_id:
        msg["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        msg[name] = value
    policy = msg.policy.clone(linesep=linesep)
    if encode:
        msg.set_content(body, subtype=content_type.partition("/")[2])
        return prepend + msg.as_bytes(policy=policy)
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f"{content_type}; charset=us-ascii"
    head = msg.as_bytes(policy=policy)  # the header section and the empty line that ends it
    return prepend + head + body.encode().replace(b"\n", linesep.encode())


# -- configuration ------------------------------------------------------------------------------------


def account(
    name: str = "support", *, host: str = "127.0.0.1", port: int = 143, username: str = "staff",
    password: str | None = None, secret_dir: Path | None = None, **fields: Any,
) -> dict[str, Any]:
    """An [[accounts]] table for a test IMAP server (plain text on localhost).

    With ``password`` and ``secret_dir`` the password is written to ``secret_dir/<username>.pw``
    and the table points ``password_file`` at it; ``fields`` add or override any other key.
    """
    table: dict[str, Any] = {"name": name, "host": host, "port": port, "tls": "none", "username": username}
    if password is not None:
        if secret_dir is None:
            raise ValueError("account(password=...) needs secret_dir: the password goes into a file")
        secret = Path(secret_dir) / f"{username}.pw"
        secret.write_text(password)
        secret.chmod(0o600)  # as an operator keeps it
        table["password_file"] = str(secret)
    table.update(fields)
    return table


def relay_table(listen_port: int, next_hop_port: int, **fields: Any) -> dict[str, Any]:
    """An [smtp] table for a content filter between two local ports."""
    return {"enabled": True, "listen_host": "127.0.0.1", "listen_port": listen_port, "next_hop_host": "127.0.0.1",
            "next_hop_port": next_hop_port, **fields}


def config_data(
    state_dir: Path | str | None = None, *, categories: Mapping[str, str] = CATEGORIES,
    accounts: Iterable[Mapping[str, Any]] = (), **settings: Any,
) -> dict[str, Any]:
    """A config as the parsed TOML document: ``state_path`` in ``state_dir`` (when given),
    ``settings`` as top-level keys and tables (``model={"threshold": 0.6}``, ``smtp={...}``)."""
    data: dict[str, Any] = {"categories": dict(categories)}
    if state_dir is not None:
        data["state_path"] = str(Path(state_dir) / "state.sqlite3")
    data.update(settings)
    listed = [dict(a) for a in accounts]
    if listed:
        data["accounts"] = listed
    return data


def make_config(state_dir: Path | str | None = None, **kwargs: Any) -> Config:
    """``config_data`` validated as the loader validates a file (``parse_config``)."""
    return parse_config(config_data(state_dir, **kwargs))


def config_toml(state_dir: Path | str | None = None, **kwargs: Any) -> str:
    """``config_data`` as TOML text, for tests that run the command line on a file."""
    return to_toml(config_data(state_dir, **kwargs))


def write_config(path: Path, state_dir: Path | str | None = None, **kwargs: Any) -> Path:
    """Write ``config_toml`` to ``path``; returns ``path``."""
    path.write_text(config_toml(state_dir, **kwargs))
    return path


def to_toml(data: Mapping[str, Any]) -> str:
    """The small TOML writer a config needs: scalars, lists of scalars, tables, arrays of tables."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not _is_table(value)]
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{key}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())]
        elif _is_table(value):
            for table in value:
                lines += ["", f"[[{key}]]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, list) and bool(value) and isinstance(value[0], Mapping))


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")
