"""IMAP refusals -> MailboxError, written once (like httpx's ``map_httpcore_exceptions``).

A NO or BAD answer becomes a MailboxError that says what was refused, about which folder, and
whether a retry may help (``transient``). An abort (BYE, EOF, a dead socket) is a connection error
and passes through unchanged, so the watcher reconnects and finishes the job from the state DB.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from imapclient import exceptions as imap_exc

from mailtriage.errors import MailboxError

# RFC 3501 / RFC 5530 response codes after which the same command cannot succeed until someone
# changes the server or the config. Every other refusal (INUSE, UNAVAILABLE, LIMIT, SERVERBUG,
# EXPUNGEISSUE, OVERQUOTA or no code at all) is taken as transient: retried with backoff, and after
# the configured number of attempts the message is given up on, never retried forever.
PERMANENT_CODES = frozenset(
    {"TRYCREATE", "NONEXISTENT", "NOPERM", "CANNOT", "AUTHORIZATIONFAILED", "AUTHENTICATIONFAILED",
     "ALREADYEXISTS", "CLIENTBUG", "READ-ONLY", "PRIVACYREQUIRED", "EXPIRED"}
)
_CODE = re.compile(r"\[([A-Z][A-Z0-9-]*)")
_MISSING = ("mailbox doesn't exist", "does not exist", "no such mailbox", "unknown mailbox")


def is_refusal(exc: BaseException) -> bool:
    """A NO/BAD answer; an abort (BYE, EOF) is a connection error and must pass through."""
    return isinstance(exc, imap_exc.IMAPClientError) and not isinstance(exc, imap_exc.IMAPClientAbortError)


def response_code(text: str) -> str | None:
    """The bracketed response code of a refusal's text ("[TRYCREATE] ..." -> "TRYCREATE"), if any."""
    m = _CODE.search(text.upper())
    return m.group(1) if m else None


def refusal_error(what: str, exc: BaseException, folder: str | None = None) -> MailboxError:
    """The MailboxError for one refusal: what failed, the server's words, retry or not."""
    text = str(exc)
    code = response_code(text)
    missing = code in ("TRYCREATE", "NONEXISTENT") or any(m in text.lower() for m in _MISSING)
    if folder is not None and missing:
        return MailboxError(
            f"{what} failed: destination folder {folder!r} does not exist ({text}). Create it on the "
            "server or fix [categories] / unsure_folder in the config",
            transient=False, folder=folder,
        )
    transient = not missing and code not in PERMANENT_CODES and " BAD " not in f" {text} "
    return MailboxError(f"{what} failed: {text}", transient=transient, folder=folder)


@contextmanager
def map_refusals(what: str, folder: str | None = None) -> Iterator[None]:
    """Turn an IMAP refusal inside the block into a MailboxError about ``what``/``folder``;
    connection errors and everything else pass through untouched."""
    try:
        yield
    except Exception as exc:
        if is_refusal(exc):
            raise refusal_error(what, exc, folder) from exc
        raise
