"""One exception tree for everything mailtriage raises on purpose.

    MailtriageError
    ├── ConfigError          the config file or a flag is wrong; the message names key and fix
    ├── ModelError           a model directory cannot be loaded or used
    │   ├── LabelMismatchError   the adapter's labels differ from the configured categories
    │   └── InferenceError       an external inference server answered something unusable for this input
    │       └── InferenceUnavailable the server cannot answer now (down, 5xx/429, past the deadline): retry later
    ├── MailboxError         an IMAP server refused, vanished or lacks something we need
    ├── StateError           the state database cannot be opened, or has another schema version
    └── TrainingDataError    the training data cannot make a sound model (too few, unreadable)

Wrap at the boundary: ``raise MailboxError(f"MOVE uid={uid} to {folder!r} failed") from exc``.
"""

from __future__ import annotations


class MailtriageError(Exception):
    """Base of every error mailtriage raises deliberately; the CLI prints these without a traceback."""


class ConfigError(MailtriageError):
    """The configuration is invalid: says which key, what was found and what is allowed."""


class ModelError(MailtriageError):
    """A model directory is missing, incomplete or cannot be loaded."""


class ModelDirBusyError(ModelError):
    """Another mailtriage-train holds the model directory's lock (a retrain or a promote)."""


class LabelMismatchError(ModelError):
    """The adapter was trained on a different label set than the config names."""


class InferenceError(ModelError):
    """An external inference server ([model] backend = "http") answered nonsense: junk, a redirect, a body
    over the byte cap, scores that are not a probability distribution, an HTTP 4xx.

    The SMTP filter answers 451. The watcher treats it like any classifier failure of one message: when
    the model still classifies a test text, the message is poison and goes to quarantine.
    """


class InferenceUnavailable(InferenceError):
    """The inference server cannot answer now: refused or reset connection, past the call's deadline,
    HTTP 5xx or 429, or the service is stopping. Nothing is wrong with the message: retry it later,
    never quarantine it for this.
    """


class InferenceUnavailable(InferenceError):
    """The inference server is down, slow or overloaded: retry later; the message is not at fault."""


class MailboxError(MailtriageError):
    """An IMAP operation failed or a server lacks a capability or folder we need.

    ``transient``: True when the same command may succeed later (a refusal such as [INUSE] or
    [UNAVAILABLE], or one the server gave no reason for), so a caller may retry with backoff; False
    when retrying cannot help until someone changes the server or the config (a missing folder,
    [NOPERM], a missing capability). ``folder``: the mailbox the refusal is about, if known.
    """

    def __init__(self, message: str, *, transient: bool = False, folder: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.folder = folder


class StateError(MailtriageError):
    """The state database cannot be opened or read, or its schema version is not this one's."""


class TrainingDataError(MailtriageError):
    """Training data is unreadable or too thin to train on."""
