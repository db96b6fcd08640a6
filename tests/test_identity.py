"""Which login an account reaches (core/identity.py), and the config refusing two accounts that
reach one login under different spellings."""

from __future__ import annotations

import pytest

from mailtriage.config import parse_config
from mailtriage.core.identity import login_id, server_id
from mailtriage.errors import ConfigError

pytestmark = pytest.mark.pure

CATS = {"billing": "Support/Billing", "login": "Support/Login"}
ACCOUNT = {"name": "support", "host": "127.0.0.1", "port": 143, "username": "support", "password_file": "/etc/pw"}


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("127.1", "loopback"), ("LocalHost.", "loopback"),
        ("::1", "loopback"), ("[::1]", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("0x7f.1", "loopback"),
        ("imap.Example.COM.", "imap.example.com"), ("10.1", "10.0.0.1"), ("::ffff:10.0.0.1", "10.0.0.1"),
        ("1mail.example.com", "1mail.example.com"),
    ],
)
def test_server_id_spells_one_server_one_way(host: str, expected: str) -> None:
    assert server_id(host) == expected


def test_login_id_ignores_username_case() -> None:
    assert login_id("Support", "localhost") == login_id("support ", "127.0.0.1") == "support@loopback"
    assert login_id("support", "imap.a.example") != login_id("support", "imap.b.example")


@pytest.mark.parametrize(
    "other",
    [
        {"host": "localhost"},
        {"host": "127.1"},
        {"port": 993, "tls": "implicit"},
        {"username": "SUPPORT"},
    ],
)
def test_two_accounts_reaching_one_login_are_refused(other: dict[str, object]) -> None:
    """They were accepted: every message of the shared mailbox was filed twice (header action:
    20 messages became 40 copies)."""
    data = {"categories": CATS, "accounts": [ACCOUNT, {**ACCOUNT, "name": "other", **other}]}
    with pytest.raises(ConfigError, match=r"'INBOX' is watched twice .*reach login 'support@loopback'"):
        parse_config(data)


def test_two_logins_on_one_server_are_fine() -> None:
    parse_config({"categories": CATS, "accounts": [ACCOUNT, {**ACCOUNT, "name": "other", "username": "sales"}]})
