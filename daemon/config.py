"""The only code that reads the TOML config: frozen, validated dataclasses.

Every mistake becomes one ConfigError naming the key, the value found and what is allowed,
so an admin can fix the file without reading code. Secrets never live in the TOML: an account
names a ``password_file``, a ``password_env`` variable or a systemd ``password_credential``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailtriage.core.cron import crontab_trigger
from mailtriage.core.identity import login_id
from mailtriage.core.training import (
    AUTO_FILED_CHOICES, AUTO_FILED_DAYS_DEFAULT, AUTO_FILED_DEFAULT, SERVE_SETTINGS, TrainParams,
)
from mailtriage.errors import ConfigError

Action = Literal["move", "keyword", "header", "label"]
TlsMode = Literal["implicit", "starttls", "none"]
AuthMethod = Literal["login", "plain", "xoauth2", "oauthbearer"]
OAuthProvider = Literal["microsoft", "google", "custom"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Backend = Literal["local", "http"]
InferenceApi = Literal["tei", "vllm"]
Quantize = Literal["auto", "none", "int8"]
Runtime = Literal["auto", "torch", "onnxruntime"]

# The allowed values, once: argparse's choices= and the model loader read them from here.
DEVICES: tuple[str, ...] = typing.get_args(Device)
QUANTIZE_CHOICES: tuple[str, ...] = typing.get_args(Quantize)
RUNTIME_CHOICES: tuple[str, ...] = typing.get_args(Runtime)

# Keys that would put a secret into the config file; refused with a pointer to the safe ways.
_SECRET_KEYS = {"password", "token", "oauth_token", "secret"}


@dataclass(frozen=True)
class ModelConfig:
    path: str = "/var/lib/mailtriage/models/current"
    threshold: float = 0.6
    device: Device = "auto"
    # 8, not 16: on a CPU 8 real-length mails per pass were faster and peaked 100 MiB lower
    # (onnxruntime int8 54 vs 45 msg/s, 602 vs 703 MiB; torch fp32 21 vs 18 msg/s). A GPU wants 64-256.
    batch_size: int = 8
    # How long a classify pass that is not full waits for more callers to join it (SMTP sessions,
    # milter callbacks arriving together); requests that arrived while the worker was busy join anyway.
    batch_wait_ms: float = 5.0
    max_length: int = 256
    # "local": load `path` in this process; "http": ask the inference server at `url`.
    backend: Backend = "local"
    url: str | None = None
    api: InferenceApi = "tei"
    remote_model: str | None = None
    timeout: float = 30.0
    # CPU speed-ups of the local backend: "int8" serves a dynamically quantized copy; "onnxruntime"
    # serves the model exported to a fused ONNX graph; threads 0 = the runtime's default. "auto"
    # (both): onnxruntime int8 on a CPU where the version's manifest says int8 kept its holdout
    # accuracy, else torch (fp32 on a CPU, bf16 on a GPU).
    quantize: Quantize = "auto"
    threads: int = 0
    runtime: Runtime = "auto"
    # GPU speed-up of the local backend: torch.compile fuses the elementwise work between the matrix
    # products (about 1.4x on an H200; benchmarks/RESULTS.md §3) for a one-off compile at start-up.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(
                f"model.threads = {self.threads!r} is negative: use 0 for torch's default (one thread per "
                "core) or the number of CPU threads inference may use"
            )
        if self.backend == "http" and (self.quantize not in ("auto", "none") or self.threads
                                       or self.runtime not in ("auto", "torch") or self.compile):
            raise ConfigError(
                f"model.quantize = {self.quantize!r} / model.threads = {self.threads!r} / model.runtime = "
                f"{self.runtime!r}{' / model.compile = true' if self.compile else ''} tune the local model, but "
                "model.backend = \"http\" runs it on the inference server: remove them, or use backend = \"local\""
            )
        if self.backend == "http":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"model.backend = \"http\" needs model.url, the inference server's base URL "
                    f"(e.g. \"http://127.0.0.1:8080\"), found {self.url!r}"
                )
        elif self.url is not None:
            raise ConfigError(
                f"model.url = {self.url!r} is set but model.backend = {self.backend!r}: set backend = \"http\" "
                "to use the inference server, or remove url"
            )
        if not 0 < self.timeout <= 600:
            raise ConfigError(f"model.timeout = {self.timeout!r} seconds: allowed 0 < timeout <= 600")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"model.threshold = {self.threshold!r} is outside 0..1: it is the softmax "
                "confidence below which mail goes to the unsure folder (0.6 is a sound start; --threshold "
                "takes the same values)"
            )
        _positive("model.batch_size", self.batch_size)
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(
                f"model.batch_wait_ms = {self.batch_wait_ms!r}: allowed 0..1000 milliseconds (0 = never wait; "
                "a few ms let concurrent SMTP sessions share one forward pass)"
            )
        _positive("model.max_length", self.max_length)


@dataclass(frozen=True)
class AccountConfig:
    name: str
    host: str
    username: str
    port: int = 993
    tls: TlsMode = "implicit"
    verify_tls: bool = True
    ca_file: str | None = None
    auth: AuthMethod = "login"
    password_file: str | None = None
    password_env: str | None = None
    password_credential: str | None = None
    oauth_token_command: str | None = None
    oauth_token_file: str | None = None
    # Built-in sign-in (`mailtriage auth NAME`): tokens kept and refreshed by mailtriage itself.
    oauth_provider: OAuthProvider | None = None
    oauth_client_id: str | None = None
    oauth_client_secret_file: str | None = None
    oauth_tenant: str | None = None
    oauth_scope: str | None = None
    oauth_token_url: str | None = None
    oauth_device_url: str | None = None
    oauth_authorize_url: str | None = None
    oauth_token_store: str | None = None  # default: oauth-NAME.json beside state_path
    mailboxes: tuple[str, ...] = ("INBOX",)
    action: Action = "move"
    # action = "label" (Gmail, X-GM-EXT-1): false keeps the message in the watched mailbox with the
    # category's label added; true also removes the watched mailbox's label (\Inbox for INBOX),
    # which is what Gmail's own "Move to" does.
    label_archive: bool = False
    keyword_prefix: str = "mt_"
    dry_run: bool = False
    idle_timeout: int = 1500
    poll_interval: int = 60
    fetch_batch: int = 50
    reconnect_max: int = 300
    # The most bytes held of any one message: the header action leaves larger messages untouched,
    # and a server literal larger than this is read to its end but kept only to this length.
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        where = f"accounts[{self.name!r}]"
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port = {self.port!r} is not a TCP port (1..65535)")
        if not self.mailboxes:
            raise ConfigError(f"{where}.mailboxes is empty: name at least one folder to watch, e.g. [\"INBOX\"]")
        if not 30 <= self.idle_timeout <= 29 * 60 - 1:
            raise ConfigError(
                f"{where}.idle_timeout = {self.idle_timeout!r} seconds: must be 30..1739, because "
                "RFC 2177 servers may drop an IDLE after 29 minutes (1500 is the default)"
            )
        _positive(f"{where}.poll_interval", self.poll_interval)
        _positive(f"{where}.fetch_batch", self.fetch_batch)
        _positive(f"{where}.reconnect_max", self.reconnect_max)
        if self.max_message_bytes < 1024 * 1024:
            raise ConfigError(
                f"{where}.max_message_bytes = {self.max_message_bytes!r}: must be at least 1048576 (1 MiB); "
                "it bounds the memory one message may take, and mail is rarely smaller than its headers plus a page"
            )
        if self.auth in ("login", "plain"):
            given = [k for k in ("password_file", "password_env", "password_credential") if getattr(self, k)]
            if len(given) != 1:
                raise ConfigError(
                    f"{where}: auth = {self.auth!r} needs exactly one of password_file, password_env "
                    f"or password_credential, found {given or 'none'}"
                )
        else:
            given = [k for k in ("oauth_token_command", "oauth_token_file", "oauth_provider") if getattr(self, k)]
            if len(given) != 1:
                raise ConfigError(
                    f"{where}: auth = {self.auth!r} needs exactly one of oauth_provider (sign in with "
                    f"`mailtriage auth {self.name}`), oauth_token_command or oauth_token_file, found {given or 'none'}"
                )
            if self.oauth_provider and not self.oauth_client_id:
                raise ConfigError(
                    f"{where}: oauth_provider = {self.oauth_provider!r} needs oauth_client_id, the application "
                    "(client) id registered in Entra ID (Azure) or the Google Cloud console"
                )
            if self.oauth_provider == "custom" and not (self.oauth_token_url and self.oauth_scope):
                raise ConfigError(f"{where}: oauth_provider = \"custom\" needs oauth_token_url and oauth_scope")
        if self.label_archive and self.action != "label":
            raise ConfigError(
                f"{where}.label_archive = true only applies to action = \"label\" (Gmail), found action = "
                f"{self.action!r}: remove label_archive, or set action = \"label\""
            )
        if not self.keyword_prefix or any(c in self.keyword_prefix for c in " ()]{%*\"\\"):
            raise ConfigError(
                f"{where}.keyword_prefix = {self.keyword_prefix!r} is not a valid IMAP atom prefix "
                "(letters, digits, '_' and '-' are safe)"
            )


@dataclass(frozen=True)
class SmtpConfig:
    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = 10025
    next_hop_host: str = "127.0.0.1"
    next_hop_port: int = 10026
    max_message_size: int = 50 * 1024 * 1024
    max_connections: int = 100
    idle_timeout: float = 300.0
    session_lifetime: float = 1800.0
    relay_timeout: float = 300.0
    max_bytes_in_flight: int = 0  # 0: derived from max_message_size and the host's memory

    def __post_init__(self) -> None:
        _positive("smtp.max_message_size", self.max_message_size)
        _positive("smtp.max_connections", self.max_connections)
        _positive_seconds("smtp.idle_timeout", self.idle_timeout)
        _positive_seconds("smtp.session_lifetime", self.session_lifetime)
        _positive_seconds("smtp.relay_timeout", self.relay_timeout)
        if self.relay_timeout >= 600:
            raise ConfigError(
                f"smtp.relay_timeout = {self.relay_timeout!r}: the sender waits 10 minutes for the reply to "
                "its message (RFC 5321 4.5.3.2.6) and retries after that, delivering a second copy; "
                "use less than 600 (default 300)"
            )
        if self.max_bytes_in_flight < 0 or 0 < self.max_bytes_in_flight < self.max_message_size:
            raise ConfigError(
                f"smtp.max_bytes_in_flight = {self.max_bytes_in_flight!r}: must hold at least one message "
                f"of max_message_size ({self.max_message_size}) bytes; use 0 for the default"
            )
        for key in ("listen_port", "next_hop_port"):
            port = getattr(self, key)
            if not 0 < port < 65536:
                raise ConfigError(f"smtp.{key} = {port!r} is not a TCP port (1..65535)")


# Postfix waits milter_content_timeout (300 s) for the answer at end of message; ours must come first.
_POSTFIX_CONTENT_TIMEOUT = 300.0


@dataclass(frozen=True)
class MilterConfig:
    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = 10027
    # "tempfail": a 451 when the model or the daemon is in trouble (the sender retries);
    # "accept": the message goes on untagged (forged X-Mailtriage-* fields still removed).
    on_error: Literal["tempfail", "accept"] = "tempfail"
    max_message_size: int = 10 * 1024 * 1024  # held per message; a longer one is classified on its prefix
    classify_timeout: float = 60.0
    idle_timeout: float = 600.0
    max_connections: int = 200

    def __post_init__(self) -> None:
        _positive("milter.max_message_size", self.max_message_size)
        _positive("milter.max_connections", self.max_connections)
        _positive("milter.idle_timeout", self.idle_timeout)
        if not 0 < self.classify_timeout < _POSTFIX_CONTENT_TIMEOUT:
            raise ConfigError(
                f"milter.classify_timeout = {self.classify_timeout!r} seconds: allowed 0 < classify_timeout < 300, "
                "below Postfix's milter_content_timeout (300 s), or Postfix gives up first and applies "
                "milter_default_action"
            )
        if not 0 < self.listen_port < 65536:
            raise ConfigError(f"milter.listen_port = {self.listen_port!r} is not a TCP port (1..65535)")


@dataclass(frozen=True)
class TrainingConfig:
    base_model: str = "all-MiniLM-L6-v2"
    model_dir: str = "/var/lib/mailtriage/models"
    schedule: str = "0 3 * * 0"
    min_examples_per_class: int = 10
    holdout_fraction: float = 0.2
    epochs: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 16
    lora_r: int = 16
    seed: int = 13
    serve: str = "auto"
    refit_all: bool = False
    calibrate: bool = True
    target_accuracy: float = 0.0
    truncation: str = "head"
    chunks: int = 1
    precision: str = "auto"
    # Mail the daemon filed into a category folder and nobody moved: "include", "exclude" or
    # "after_days" (only filings at least auto_filed_days old); see mailtriage_trainer.origins.
    auto_filed: str = AUTO_FILED_DEFAULT
    auto_filed_days: int = AUTO_FILED_DAYS_DEFAULT

    def __post_init__(self) -> None:
        if self.auto_filed not in AUTO_FILED_CHOICES:
            raise ConfigError(
                f"training.auto_filed = {self.auto_filed!r} (or --auto-filed): expected \"include\" (train on mail "
                "the daemon filed and nobody moved), \"exclude\" (only mail staff sorted or corrected) or "
                "\"after_days\" (the daemon's filings once they are training.auto_filed_days old)")
        if isinstance(self.auto_filed_days, bool) or not isinstance(self.auto_filed_days, int) \
                or not 1 <= self.auto_filed_days <= 3650:
            raise ConfigError(
                f"training.auto_filed_days = {self.auto_filed_days!r} (or --auto-filed-days): expected whole days "
                "from 1 to 3650 that staff get to move a wrong filing before it counts as a label, e.g. 7")
        if not isinstance(self.calibrate, bool):
            raise ConfigError(f"training.calibrate = {self.calibrate!r}: expected true or false")
        # The trainer puts its flags over this table, so one message serves the key and the flag.
        if self.target_accuracy and not 0.5 <= self.target_accuracy < 1.0:
            raise ConfigError(f"training.target_accuracy = {self.target_accuracy!r} (or --target-accuracy): expected "
                              "0 (off) or a share between 0.5 and 1, e.g. 0.98 for 98% of automatically filed mail right")
        if self.serve not in SERVE_SETTINGS:
            raise ConfigError(f"training.serve = {self.serve!r} (or --serve): expected \"auto\" (the best on held-out "
                              "mail), \"model\", \"baseline\" or \"ensemble\"")
        if not isinstance(self.refit_all, bool):
            raise ConfigError(f"training.refit_all = {self.refit_all!r}: expected true or false")
        if self.schedule:
            try:  # the scheduler's own parser, so `check` refuses what `serve` would
                crontab_trigger(self.schedule, timezone="UTC")
            except ValueError as exc:
                raise ConfigError(
                    f"training.schedule = {self.schedule!r} is not a 5-field cron expression ({exc}); write "
                    "minute hour day month weekday, e.g. \"0 3 * * 0\" for Sundays 03:00; \"\" disables it"
                ) from exc
        if not 0.05 <= self.holdout_fraction <= 0.5:
            raise ConfigError(f"training.holdout_fraction = {self.holdout_fraction!r} (or --holdout-fraction): "
                              "allowed 0.05..0.5 (0.2 is usual)")
        _positive("training.min_examples_per_class (or --min-examples)", self.min_examples_per_class)
        self.params()  # epochs, learning_rate, batch_size, lora_r, seed, truncation, chunks, precision: TrainParams' one validator

    def params(self, **overrides: Any) -> TrainParams:
        """The fine-tune's parameters from this table (``overrides``: the trainer's flags), validated."""
        wanted: dict[str, Any] = {"epochs": self.epochs, "learning_rate": self.learning_rate,
                                  "batch_size": self.batch_size, "lora_r": self.lora_r, "seed": self.seed,
                                  "truncation": self.truncation, "chunks": self.chunks, "precision": self.precision}
        wanted.update({k: v for k, v in overrides.items() if v is not None})
        return TrainParams(**wanted)


@dataclass(frozen=True)
class WebConfig:
    """[web]: the support lead's console (``mailtriage web``, or inside ``serve`` when enabled)."""

    enabled: bool = False
    # 127.0.0.1: the console is meant to sit behind the host's reverse proxy (TLS, the proxy's sign-in).
    listen_host: str = "127.0.0.1"
    listen_port: int = 8025
    # scrypt hash written by `mailtriage web --hash-password FILE`; one "user:hash" line per person.
    password_file: str = ""
    # A header (e.g. "X-Remote-User") naming the user the reverse proxy signed in. Off unless set:
    # anyone who can reach the port could send it, so it is believed only from trusted_proxies.
    trusted_user_header: str = ""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # The session cookie gets Secure (sent over https only): true behind a TLS proxy.
    secure_cookies: bool = False
    # A file with the key that signs session cookies (kept across restarts); "" = a new key per start.
    session_secret_file: str = ""
    session_hours: float = 8.0
    # Read-only unless true: "file as CATEGORY", promote and roll back change mail and the model.
    allow_actions: bool = False
    # Characters of each queued message's text shown in Queues (0: none).
    snippet_chars: int = 160
    # Failed sign-ins per client address within login_window seconds before it is refused (429).
    login_attempts: int = 5
    login_window: float = 900.0

    def __post_init__(self) -> None:
        if not 0 < self.listen_port < 65536:
            raise ConfigError(f"web.listen_port = {self.listen_port!r} is not a TCP port (1..65535)")
        if self.enabled and not self.password_file and not self.trusted_user_header:
            raise ConfigError(
                "web.enabled = true but nobody can sign in: set web.password_file (write it with "
                "`mailtriage web --hash-password FILE`) or web.trusted_user_header behind a reverse proxy"
            )
        if self.trusted_user_header and not self.trusted_proxies:
            raise ConfigError(
                f"web.trusted_user_header = {self.trusted_user_header!r} needs web.trusted_proxies, the "
                "addresses of the reverse proxy that sets it (e.g. [\"127.0.0.1\"])"
            )
        if not 0 <= self.snippet_chars <= 2000:
            raise ConfigError(f"web.snippet_chars = {self.snippet_chars!r}: allowed 0..2000")
        _positive("web.login_attempts", self.login_attempts)
        _positive_seconds("web.login_window", self.login_window)
        _positive_seconds("web.session_hours", self.session_hours)


@dataclass(frozen=True)
class Config:
    # category name -> IMAP folder it is filed into; order is the label order shown in reports
    categories: Mapping[str, str]
    unsure_folder: str = "Support/Unsure"
    # A refused action (STATUS/MOVE/STORE/APPEND) is retried retry_attempts times, the first after
    # retry_backoff seconds, doubling, at most an hour apart; then the message is moved to
    # quarantine_folder ("" = unsure_folder).
    retry_attempts: int = 5
    retry_backoff: float = 60.0
    quarantine_folder: str = ""
    state_path: str = "/var/lib/mailtriage/state.sqlite3"
    correction_scan_interval: int = 600
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Add X-Mailtriage-Why (a one-line summary of the decision's explanation) wherever mailtriage
    # writes headers: the SMTP filter, the milter and the IMAP header action.
    why_header: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    accounts: tuple[AccountConfig, ...] = ()
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def __post_init__(self) -> None:
        if len(self.categories) < 2:
            raise ConfigError(
                f"[categories] has {len(self.categories)} entries: a classifier needs at least 2 "
                "(one line per category: name = \"Folder/Name\")"
            )
        for name, folder in self.categories.items():
            if not isinstance(folder, str) or not folder.strip():
                raise ConfigError(f"categories.{name} = {folder!r}: expected the IMAP folder name as a string")
        folders = list(self.categories.values())
        dupes = sorted({f for f in folders if folders.count(f) > 1})
        if dupes:
            raise ConfigError(f"[categories] maps several categories to the same folder {dupes}: each needs its own")
        if self.unsure_folder in folders:
            raise ConfigError(f"unsure_folder = {self.unsure_folder!r} is also a category folder; pick a separate one")
        # Each OAuth account's token store lives in the state directory unless the account names one.
        state_dir = Path(self.state_path).parent
        object.__setattr__(self, "accounts", tuple(
            dataclasses.replace(a, oauth_token_store=str(state_dir / f"oauth-{a.name}.json"))
            if a.oauth_provider and not a.oauth_token_store else a
            for a in self.accounts
        ))
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ConfigError(f"[[accounts]] names must be unique, found {names}")
        if "smtp" in names:
            raise ConfigError(
                "[[accounts]] name = \"smtp\" is reserved: the state database records the SMTP content "
                "filter's decisions under that name; give the account another name"
            )
        if "milter" in names:
            raise ConfigError(
                "[[accounts]] name = \"milter\" is reserved: the state database records the milter's "
                "decisions under that name; give the account another name"
            )
        if (self.smtp.enabled and self.milter.enabled and self.smtp.listen_port == self.milter.listen_port
                and self.smtp.listen_host == self.milter.listen_host):
            raise ConfigError(
                f"milter.listen_port = {self.milter.listen_port} is also smtp.listen_port: the SMTP filter and "
                "the milter each need their own port"
            )
        if not Path(self.state_path).is_absolute():
            raise ConfigError(
                f"state_path = {self.state_path!r} is relative: it would land wherever the service happens to "
                "start (systemd starts it in /), and `check`, `stats` and `learn` would each open another file. "
                "Give an absolute path, e.g. \"/var/lib/mailtriage/state.sqlite3\""
            )
        _check_folder_case(self)
        _check_roles(self)
        _positive("retry_attempts", self.retry_attempts)
        if not self.retry_backoff > 0:
            raise ConfigError(f"retry_backoff = {self.retry_backoff!r}: must be a positive number of seconds")
        _positive("correction_scan_interval", self.correction_scan_interval)
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port = {self.metrics_port!r}: allowed 0 (off) or 1..65535")

    def quarantine(self) -> str:
        """Where a message goes whose action kept being refused."""
        return self.quarantine_folder or self.unsure_folder

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.categories)


def mailbox_id(name: str) -> str:
    """A mailbox name as the server compares it: INBOX is case-insensitive (RFC 3501 §5.1)."""
    return "INBOX" if name.upper() == "INBOX" else name


def _check_folder_case(config: Config) -> None:
    """Refuse folder names that differ only in case: Exchange and Gmail treat them as one folder, so
    a category and the unsure folder (or a watched mailbox) would silently be the same mailbox."""
    named = [(f"categories.{n}", f) for n, f in config.categories.items()]
    named.append(("unsure_folder", config.unsure_folder))
    if config.quarantine_folder:
        named.append(("quarantine_folder", config.quarantine_folder))
    for account in config.accounts or (None,):
        seen: dict[str, tuple[str, str]] = {}
        watched = [(f"accounts[{account.name!r}].mailboxes", m) for m in account.mailboxes] if account else []
        for key, folder in named + watched:
            first = seen.setdefault(mailbox_id(folder).casefold(), (key, folder))
            if mailbox_id(first[1]) != mailbox_id(folder):
                raise ConfigError(
                    f"{key} = {folder!r} and {first[0]} = {first[1]!r} differ only in case: Exchange and Gmail "
                    "treat them as one folder. Spell the same folder the same way everywhere, or pick distinct names"
                )


def _check_roles(config: Config) -> None:
    """Each mailbox has one role. Two watchers on one mailbox race each other (20 messages became 36
    copies); watching a folder we file into re-files what staff sorted there; filing into INBOX
    feeds the watcher its own output."""
    filed = {mailbox_id(f): f"categories.{n}" for n, f in config.categories.items()}
    filed[mailbox_id(config.unsure_folder)] = "unsure_folder"
    if config.quarantine_folder:
        filed.setdefault(mailbox_id(config.quarantine_folder), "quarantine_folder")
    if "INBOX" in filed:
        raise ConfigError(
            f"{filed['INBOX']} = \"INBOX\": mail is filed out of the watched mailbox, never into INBOX "
            "(the watcher would classify its own output again). Name a separate folder, e.g. \"Support/Unsure\""
        )
    watchers: dict[tuple[str, str], str] = {}
    for account in config.accounts:
        where = f"accounts[{account.name!r}]"
        for mailbox in account.mailboxes:
            mid = mailbox_id(mailbox)
            # The same login on the same server sees the same mailbox, whatever the account is called,
            # however the host is spelled (localhost / 127.0.0.1 / 127.1) and on either port.
            who = (login_id(account.username, account.host), mid)
            if who in watchers:
                other = watchers[who]
                raise ConfigError(
                    f"{where}.mailboxes: {mailbox!r} is watched twice ({other} and {where}, both reach login "
                    f"{who[0]!r}: {account.username!r} on {account.host}:{account.port}); two watchers on one "
                    "mailbox race and file messages twice. List each mailbox once, in one account"
                )
            watchers[who] = where
            if mid in filed and account.action in ("move", "header", "label"):
                raise ConfigError(
                    f"{where}.mailboxes: {mailbox!r} is also {filed[mid]}, a folder mail is filed into; watching "
                    "it would re-file what was sorted there. Watch only incoming mailboxes (e.g. INBOX)"
                )


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key} = {value!r}: must be a positive number")


def _positive_seconds(key: str, value: float) -> None:
    # TOML reads nan and inf: a NaN timeout compares False with everything (never fires, or
    # always), inf never ends a session; neither is a duration.
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} = {value!r}: must be a finite number of seconds above 0")


# ---- generic TOML table -> dataclass, with messages that name the key -----------------------


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if isinstance(hint, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            hint.__name__, f"a table ({hint.__name__})"
        )
    return str(hint)


def _convert(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(key, value, args[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {_describe(hint)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected {_describe(hint)}")
        inner = typing.get_args(hint)[0]
        return tuple(_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, found {value!r}")
        return _build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key} = {value!r}: expected {_describe(hint)}")
    return value


def _build(cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    dot = f"{prefix}." if prefix else ""
    for key in table:
        if key in _SECRET_KEYS:
            raise ConfigError(
                f"{dot}{key}: secrets never live in the config file. Put it in a file readable only by "
                "the service and set password_file (or oauth_token_file), or use password_env, or "
                "systemd LoadCredential= with password_credential"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{dot}{key}: unknown key. Known keys: {', '.join(sorted(known))}.{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in table:
            kwargs[f.name] = _convert(f"{dot}{f.name}", table[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dot}{f.name} is required but missing")
    return cls(**kwargs)


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate an already-parsed TOML document (tests use this directly)."""
    table = dict(data)
    categories = table.pop("categories", None)
    if not isinstance(categories, dict):
        raise ConfigError(
            "[categories] is missing: add one line per category, name = \"IMAP folder\", e.g. "
            "billing = \"Support/Billing\""
        )
    if "accounts" in table and not isinstance(table["accounts"], list):
        raise ConfigError("accounts: write each account as an [[accounts]] table")
    accounts = table.get("accounts", [])
    for i, acc in enumerate(accounts):
        if isinstance(acc, dict) and "name" not in acc:
            acc["name"] = acc.get("username", f"account{i}")
    table["categories"] = "placeholder"  # validated below, not by the generic builder
    hints = dict(typing.get_type_hints(Config))
    hints["categories"] = str
    cfg_kwargs: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Config)}
    for key, value in table.items():
        if key in _SECRET_KEYS or key not in known:
            _build(Config, {key: value}, "")  # raises the uniform unknown/secret message
        if key != "categories":
            cfg_kwargs[key] = _convert(key, value, hints[key])
    return Config(categories=dict(categories), **cfg_kwargs)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; any problem is one ConfigError naming the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config {str(p)!r}: {exc.strerror}. Start from config.example.toml"
        ) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(p)!r} is not valid TOML: {exc}") from exc
    return parse_config(data)
