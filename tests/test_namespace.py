"""namespace.to_server, table-style: configured folder names -> the server's names, for the
hierarchies real servers use (Dovecot "/", Cyrus and Courier "." under "INBOX.", flat servers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailtriage.errors import MailboxError
from mailtriage.imap.namespace import Namespace, read_namespace, to_server

pytestmark = pytest.mark.pure

DOVECOT = Namespace("/", "")
CYRUS = Namespace(".", "INBOX.", ("user.",))
DOT_TOP = Namespace(".", "")           # "." at the top level (e.g. Dovecot with separator = .)
SLASH_INBOX = Namespace("/", "INBOX/")  # Dovecot with prefix = INBOX/
FLAT = Namespace(None, "")


@pytest.mark.parametrize(("ns", "name", "expected"), [
    (DOVECOT, "Support/Billing", "Support/Billing"),
    (DOVECOT, "INBOX", "INBOX"),
    (DOVECOT, "inbox", "INBOX"),
    (DOVECOT, "INBOX/Support", "INBOX/Support"),
    (DOVECOT, "Support.Billing", "Support.Billing"),    # a "." is an ordinary character there
    (CYRUS, "Support/Billing", "INBOX.Support.Billing"),
    (CYRUS, "Support/Unsure", "INBOX.Support.Unsure"),
    (CYRUS, "Archive", "INBOX.Archive"),
    (CYRUS, "INBOX", "INBOX"),
    (CYRUS, "Inbox", "INBOX"),
    (CYRUS, "INBOX.Support.Billing", "INBOX.Support.Billing"),  # already the server's name
    (CYRUS, "inbox.Support.Billing", "INBOX.Support.Billing"),
    (CYRUS, "INBOX/Support/Billing", "INBOX.Support.Billing"),  # prefix written with "/"
    (CYRUS, "Support.Billing", "INBOX.Support.Billing"),        # the server's separator, no prefix
    (CYRUS, "user.bob.Support", "user.bob.Support"),            # another user's folder: left alone
    (DOT_TOP, "Support/Billing", "Support.Billing"),
    (DOT_TOP, "Support.Billing", "Support.Billing"),
    (SLASH_INBOX, "Support/Billing", "INBOX/Support/Billing"),
    (SLASH_INBOX, "INBOX/Support/Billing", "INBOX/Support/Billing"),
    (FLAT, "Billing", "Billing"),
    (FLAT, "INBOX", "INBOX"),
])
def test_to_server(ns: Namespace, name: str, expected: str) -> None:
    assert to_server(name, ns) == expected


@pytest.mark.parametrize(("ns", "name", "says"), [
    # "." would start a sub-folder on the server: say what to write instead
    (CYRUS, "Support/v1.2", ["'.'", "'INBOX.'", "'INBOX.Support.v1.2'"]),
    (CYRUS, "INBOX.Support/Billing", ["mixes", "'.'"]),
    (CYRUS, "Support//Billing", ["empty level", "'INBOX.Support.Billing'"]),
    (DOVECOT, "Support/Billing/", ["empty level", "'Support/Billing'"]),
    (FLAT, "Support/Billing", ["no hierarchy separator", "'Support-Billing'"]),
])
def test_ambiguous_names_say_what_to_write(ns: Namespace, name: str, says: list[str]) -> None:
    with pytest.raises(MailboxError) as err:
        to_server(name, ns)
    for text in says:
        assert text in str(err.value)
    assert err.value.folder == name and not err.value.transient


_level = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_ "), min_size=1, max_size=8)


@given(st.lists(_level, min_size=1, max_size=4), st.sampled_from([DOVECOT, CYRUS, DOT_TOP, SLASH_INBOX]))
def test_mapping_is_idempotent_and_keeps_the_levels(levels: list[str], ns: Namespace) -> None:
    """A server name maps to itself, so a name mapped twice (config, then an action) is unchanged."""
    once = to_server("/".join(levels), ns)
    assert to_server(once, ns) == once
    assert once.startswith(ns.prefix) or once == "INBOX"
    if levels[0].upper() != "INBOX" and once != "INBOX":
        assert once[len(ns.prefix):].split(ns.separator or "/")[-len(levels):] == levels


class _Answers:
    """The two answers read_namespace reads, as imapclient returns them (pure: no socket)."""

    def __init__(self, caps: set[str], namespace: tuple | None = None, root_delim: bytes | None = b"/") -> None:
        self.caps, self._ns, self._root = caps, namespace, root_delim

    def has_capability(self, name: str) -> bool:
        return name in self.caps

    def namespace(self) -> tuple:
        return self._ns

    def list_folders(self, directory: str = "", pattern: str = "*") -> list:
        assert (directory, pattern) == ("", "")
        return [((b"\\Noselect",), self._root, "")]


@pytest.mark.parametrize(("answers", "expected"), [
    (_Answers({"NAMESPACE"}, ((("INBOX.", "."),), (("user.", "."),), (("", "."),))), CYRUS),
    (_Answers({"NAMESPACE"}, ((("", "/"),), None, None)), DOVECOT),
    (_Answers(set(), root_delim=b"."), DOT_TOP),                 # no NAMESPACE: LIST "" "" gives the separator
    (_Answers(set(), root_delim=None), FLAT),
    (_Answers({"NAMESPACE"}, (None, None, None), root_delim=b"/"), DOVECOT),
])
def test_read_namespace(answers: _Answers, expected: Namespace) -> None:
    assert read_namespace(answers) == expected
