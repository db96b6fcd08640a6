"""Config loading: the example loads, and every class of mistake gets one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailtriage.config import TrainingConfig, load_config, parse_config
from mailtriage.credentials import read_secret
from mailtriage.errors import ConfigError

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
CATS = {"billing": "Support/Billing", "refunds": "Support/Refunds"}
ACCOUNT = {"name": "support", "host": "imap.example.com", "username": "u", "password_file": "/etc/pw"}


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "config.example.toml")
    assert len(cfg.labels) == 15
    assert cfg.accounts[0].action == "move"
    assert cfg.accounts[0].verify_tls is True
    assert cfg.model.threshold == 0.6
    assert cfg.why_header is False  # opt-in: it tells every recipient how the model decided
    # The documented default is the code's default (the simulation in benchmarks/auto_filed.py chose it).
    assert (cfg.training.auto_filed, cfg.training.auto_filed_days) == (
        TrainingConfig().auto_filed, TrainingConfig().auto_filed_days)


def test_defaults_fill_in() -> None:
    cfg = parse_config({"categories": CATS, "accounts": [ACCOUNT]})
    assert cfg.accounts[0].mailboxes == ("INBOX",)
    assert cfg.accounts[0].port == 993
    assert cfg.labels == ("billing", "refunds")


def _with(**overrides: object) -> dict[str, object]:
    return {"categories": CATS, "accounts": [ACCOUNT], **overrides}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # missing or thin label set
        ({"accounts": [ACCOUNT]}, r"\[categories\] is missing"),
        ({"categories": {"billing": "A"}}, r"at least 2"),
        ({"categories": {"a": "X", "b": "X"}}, r"same folder \['X'\]"),
        (_with(unsure_folder="Support/Billing"), r"unsure_folder = 'Support/Billing' is also a category folder"),
        # wrong type, out of range, not one of the allowed values
        (_with(model={"threshold": 1.5}), r"model.threshold = 1.5 is outside 0..1"),
        (_with(model={"batch_size": "8"}), r"model.batch_size = '8': expected an integer"),
        (_with(model={"device": "tpu"}), r"model.device = 'tpu' is not allowed: expected one of 'auto', 'cpu'"),
        (_with(model={"quantize": "int4"}), r"model.quantize = 'int4' is not allowed: expected one of 'auto', 'none', 'int8'"),
        (_with(model={"threads": -2}), r"model.threads = -2 is negative"),
        (_with(model={"backend": "http", "url": "http://127.0.0.1:8080", "quantize": "int8"}),
         r"model.quantize = 'int8' / model.threads = 0 / model.runtime = 'auto' tune the local model"),
        (_with(model={"backend": "http", "url": "http://127.0.0.1:8080", "runtime": "onnxruntime"}),
         r"model.runtime = 'onnxruntime' tune the local model"),
        (_with(model={"runtime": "tensorrt"}), r"model.runtime = 'tensorrt' is not allowed: expected one of 'auto', 'torch', 'onnxruntime'"),
        (_with(metrics_port=70000), r"metrics_port = 70000"),
        # typos get a suggestion
        (_with(model={"treshold": 0.5}), r"model.treshold: unknown key.*Did you mean 'threshold'"),
        (_with(stat_path="/x"), r"stat_path: unknown key.*Did you mean 'state_path'"),
        # account mistakes
        ({"categories": CATS, "accounts": [{**ACCOUNT, "action": "copy"}]}, r"accounts\[0\].action = 'copy' is not allowed"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "port": 0}]}, r"accounts\['support'\].port = 0"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "idle_timeout": 3600}]}, r"idle_timeout = 3600.*29 minutes"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "mailboxes": []}]}, r"mailboxes is empty"),
        ({"categories": CATS, "accounts": [{k: v for k, v in ACCOUNT.items() if k != "host"}]}, r"accounts\[0\].host is required"),
        ({"categories": CATS, "accounts": [ACCOUNT, ACCOUNT]}, r"names must be unique"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "name": "smtp"}]}, r"name = \"smtp\" is reserved"),
        ({"categories": CATS, "accounts": {"name": "x"}}, r"\[\[accounts\]\]"),
        # secrets never inline; exactly one secret source
        ({"categories": CATS, "accounts": [{**ACCOUNT, "password": "hunter2"}]}, r"password: secrets never live in the config file"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "password_env": "PW"}]}, r"exactly one of password_file.*found \['password_file', 'password_env'\]"),
        ({"categories": CATS, "accounts": [{**ACCOUNT, "auth": "xoauth2"}]}, r"needs exactly one of oauth_provider"),
        # training
        (_with(training={"epochs": 0}), r"training parameter epochs = 0: must be a whole number >= 1"),
        (_with(training={"learning_rate": 2.0}), r"training parameter learning_rate = 2.0: allowed 0 < lr < 1"),
        (_with(training={"schedule": "every sunday"}), r"training.schedule = 'every sunday' is not a 5-field cron"),
        (_with(training={"holdout_fraction": 0.9}), r"holdout_fraction = 0.9"),
        # what a retrain does with the daemon's own filings
        (_with(training={"auto_filed": "always"}),
         r"training.auto_filed = 'always' \(or --auto-filed\): expected \"include\".*\"exclude\".*\"after_days\""),
        (_with(training={"auto_filed": True}), r"training.auto_filed = True: expected a string"),
        (_with(training={"auto_filed_days": 0}), r"training.auto_filed_days = 0 \(or --auto-filed-days\): expected whole days from 1"),
        (_with(training={"auto_filed_days": 7.5}), r"training.auto_filed_days = 7.5: expected an integer"),
        # the scheduler's own parser: out-of-range fields were accepted here and refused by `serve`
        (_with(training={"schedule": "61 25 * * 9"}), r"training.schedule = '61 25 \* \* 9' is not a 5-field cron"),
        (_with(training={"schedule": "0 3 * * 8"}), r"day-of-week field '8'"),
        (_with(training={"schedule": "0 3 32 * *"}), r"training.schedule = '0 3 32 \* \*'.*maximum value \(31\)"),
        # a relative state_path lands wherever the process starts
        (_with(state_path="state.sqlite3"), r"state_path = 'state.sqlite3' is relative.*absolute path"),
        (_with(state_path=""), r"state_path = '' is relative"),
        # retries of refused actions
        (_with(retry_attempts=0), r"retry_attempts = 0: must be a positive number"),
        (_with(retry_backoff=0), r"retry_backoff = 0(.0)?: must be a positive number of seconds"),
    ],
)
def test_bad_config_names_key_and_fix(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*config.example.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nthreshold = 0.5\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(bad)


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = parse_config({"categories": CATS, "accounts": [{**ACCOUNT, "password_file": str(pw)}]})
    assert read_secret(cfg.accounts[0]) == "s3cret"

    monkeypatch.setenv("MT_PW", "from-env")
    acc = {k: v for k, v in ACCOUNT.items() if k != "password_file"}
    cfg = parse_config({"categories": CATS, "accounts": [{**acc, "password_env": "MT_PW"}]})
    assert read_secret(cfg.accounts[0]) == "from-env"

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "imap-password").write_text("from-systemd")
    cfg = parse_config({"categories": CATS, "accounts": [{**acc, "password_credential": "imap-password"}]})
    assert read_secret(cfg.accounts[0]) == "from-systemd"

    cfg = parse_config({"categories": CATS, "accounts": [{**acc, "password_file": str(tmp_path / "missing")}]})
    with pytest.raises(ConfigError, match=r"cannot read secret file"):
        read_secret(cfg.accounts[0])
    monkeypatch.delenv("MT_PW")
    cfg = parse_config({"categories": CATS, "accounts": [{**acc, "password_env": "MT_PW"}]})
    with pytest.raises(ConfigError, match=r"MT_PW is not set"):
        read_secret(cfg.accounts[0])


def test_failing_oauth_token_command_never_echoes_the_command(tmp_path: Path) -> None:
    """The command line (and its output) may carry a client secret."""
    acc = {k: v for k, v in ACCOUNT.items() if k != "password_file"}
    secret = "client_secret=TOPSECRET42"
    for command, why in (
        (f"echo {secret} >&2; echo {secret}; exit 7", "exited with status 7"),
        (f"/nonexistent/helper --{secret}", "exited with status 127"),
    ):
        cfg = parse_config({"categories": CATS, "accounts": [{**acc, "auth": "xoauth2", "oauth_token_command": command}]})
        with pytest.raises(ConfigError) as info:
            read_secret(cfg.accounts[0])
        import traceback

        text = "".join(traceback.format_exception(info.value))
        assert why in str(info.value) and "TOPSECRET42" not in text, text
    ok = parse_config({"categories": CATS, "accounts": [{**acc, "auth": "xoauth2", "oauth_token_command": "echo tok"}]})
    assert read_secret(ok.accounts[0]) == "tok"


def test_exposed_secret_file_is_read_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailtriage.credentials import secret_file_exposure

    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    for mode, expected in ((0o600, None), (0o400, None), (0o640, "group-readable"), (0o604, "world-readable")):
        pw.chmod(mode)
        assert secret_file_exposure(pw) == expected, oct(mode)
    cfg = parse_config({"categories": CATS, "accounts": [{**ACCOUNT, "password_file": str(pw)}]})
    assert read_secret(cfg.accounts[0]) == "s3cret"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # One mailbox, two watchers (they raced: 20 messages became 36 copies)
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "INBOX"]}]), r"'INBOX' is watched twice"),
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "inbox"]}]), r"'inbox' is watched twice"),
        (_with(accounts=[ACCOUNT, {**ACCOUNT, "name": "other", "host": "IMAP.example.com"}]),
         r"accounts\['other'\].mailboxes: 'INBOX' is watched twice \(accounts\['support'\] and accounts\['other'\]"),
        # A mailbox in two roles
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "Support/Billing"]}]),
         r"'Support/Billing' is also categories.billing, a folder mail is filed into"),
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["Support/Unsure"]}]), r"'Support/Unsure' is also unsure_folder"),
        (_with(unsure_folder="INBOX"), r"unsure_folder = \"INBOX\": mail is filed out of the watched mailbox"),
        (_with(categories={**CATS, "other": "inbox"}), r"categories.other = \"INBOX\""),
        (_with(quarantine_folder="INBOX"), r"quarantine_folder = \"INBOX\""),
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "Quarantine"]}], quarantine_folder="Quarantine"),
         r"'Quarantine' is also quarantine_folder"),
    ],
)
def test_overlapping_mailboxes_and_roles_are_refused(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_with(categories={"billing": "Support/Billing", "other": "support/billing"}),
         r"categories.other = 'support/billing' and categories.billing = 'Support/Billing' differ only in case"),
        (_with(unsure_folder="support/billing"), r"unsure_folder = 'support/billing' and categories.billing"),
        (_with(quarantine_folder="support/unsure"), r"quarantine_folder = 'support/unsure' and unsure_folder"),
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "support/refunds"]}]),
         r"accounts\['support'\].mailboxes = 'support/refunds' and categories.refunds = 'Support/Refunds'"),
        (_with(accounts=[{**ACCOUNT, "action": "keyword", "mailboxes": ["support/billing"]}]), r"differ only in case"),
        (_with(accounts=[{**ACCOUNT, "mailboxes": ["Support/New", "support/new"]}]), r"differ only in case"),
    ],
)
def test_folder_names_differing_only_in_case_are_refused(data: dict[str, object], expected: str) -> None:
    """Exchange and Gmail compare folder names without case: these are one folder there."""
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


def test_inbox_in_any_case_and_same_folder_in_other_accounts_are_fine() -> None:
    other = {**ACCOUNT, "name": "other", "username": "v", "mailboxes": ["inbox", "Support/New"]}
    cfg = parse_config(_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "Support/New"]}, other]))
    assert [a.mailboxes for a in cfg.accounts] == [("INBOX", "Support/New"), ("inbox", "Support/New")]


def test_distinct_mailboxes_and_keyword_watch_of_a_category_folder_are_fine() -> None:
    other_user = {**ACCOUNT, "name": "other", "username": "v"}
    cfg = parse_config(_with(accounts=[{**ACCOUNT, "mailboxes": ["INBOX", "Support/New"]}, other_user]))
    assert [a.mailboxes for a in cfg.accounts] == [("INBOX", "Support/New"), ("INBOX",)]
    # The keyword action files nothing, so watching a category folder re-files nothing.
    parse_config(_with(accounts=[{**ACCOUNT, "action": "keyword", "mailboxes": ["Support/Billing"]}]))
