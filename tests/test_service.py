"""The daemon around the watchers: readiness, hot reload, retrain subprocess, signals, end to end.

The first tests use a fake model loader and fake watchers (the service's seams) to pin down the
lifecycle exactly; the last one runs the real thing: Dovecot, the tiny model, MailboxWatcher.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailtriage import metrics

from mailtriage.model import backend as model_backend
from mailtriage.model import modeldir
from mailtriage.config import AccountConfig, Config, ModelConfig
from mailtriage.errors import ConfigError, LabelMismatchError, ModelError
from mailtriage.core.labels import LabelSet
from mailtriage.service.app import Service
from mailtriage.testing.builders import account, mail, make_config
from mailtriage.testing.fakes import KeywordClassifier
from mailtriage.testing.waits import async_wait_for

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
LABELS = tuple(CATEGORIES)


# -- helpers ------------------------------------------------------------------------------------


def fake_loader(path: Path) -> KeywordClassifier:
    """Like load_classifier: refuses a label mismatch and a version marked broken."""
    labels = LabelSet.load(path)
    labels.check_matches(LABELS, where=f"model version {str(path)!r}")
    if (path / "BROKEN").exists():
        raise ModelError(f"{path}: adapter weights are unreadable")
    time.sleep(0.05)  # a load takes time: batches queued meanwhile must wait, not fail
    return KeywordClassifier(labels.labels, {}, version=path.name, miss=0.99)  # every text: the first label


def make_version(model_dir: Path, name: str, labels: Sequence[str] = LABELS, broken: bool = False) -> Path:
    version = model_dir / name
    version.mkdir(parents=True)
    LabelSet(tuple(labels)).save(version)
    if broken:
        (version / "BROKEN").write_text("x")
    return version


class FakeWatcher:
    """Classifies one text every few ms from its own thread, recording the model versions it saw."""

    instances: list[FakeWatcher] = []

    def __init__(self, account: AccountConfig, mailbox: str, config: Config, state: Any, classify: Any) -> None:
        self.mailbox, self.classify = mailbox, classify
        self.versions: list[str] = []
        self.thread: threading.Thread | None = None
        FakeWatcher.instances.append(self)

    def run(self, stop: threading.Event) -> None:
        self.thread = threading.current_thread()
        while not stop.wait(0.01):
            predictions, version = self.classify(["hello"])
            assert len(predictions) == 1
            self.versions.append(version)


def fake_config(tmp_path: Path, mailboxes: tuple[str, ...] = ("INBOX", "Support/New"), schedule: str = "") -> Config:
    models = str(tmp_path / "models")
    return make_config(
        tmp_path, categories=CATEGORIES,
        accounts=[account(port=1, username="u", password="x", secret_dir=tmp_path, mailboxes=list(mailboxes))],
        model={"path": models, "device": "cpu"}, training={"schedule": schedule, "model_dir": models},
    )


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """A real NOTIFY_SOCKET read by a thread (as systemd would); the function returns all received."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    received: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()

    def messages() -> list[str]:
        return list(received)  # what the reader has got so far: wait for what a test expects

    yield messages
    done.set()
    thread.join()
    sock.close()


def run_async(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


# -- lifecycle with fakes -------------------------------------------------------------------------


@pytest.mark.component  # SIGTERM to the runner, an AF_UNIX notify socket
def test_ready_hot_reload_refusal_and_sigterm(
    tmp_path: Path, notify_socket: Callable[[], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = fake_config(tmp_path)
    models = Path(config.model.path)
    modeldir.promote(models, make_version(models, "v1"))
    reload_checks: list[Path] = []  # each reload check asks where `current` points

    def target(config: Config) -> Path:
        reload_checks.append(path := real_target(config))
        return path

    real_target = model_backend.target
    monkeypatch.setattr(model_backend, "target", target)
    FakeWatcher.instances.clear()
    service = Service(
        config, None, load_model=fake_loader, watcher_factory=FakeWatcher, state=object(), reload_interval=0.1
    )

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 10)
        await async_wait_for(lambda: "READY=1" in notify_socket(), 30, "READY")
        sent = notify_socket()
        assert "READY=1" in sent
        assert any(s.startswith("STATUS=model v1") for s in sent)
        assert service.model_version == "v1"
        assert metrics.REGISTRY.get_sample_value("mailtriage_model_info", {"version": "v1"}) == 1.0
        assert sorted(w.mailbox for w in FakeWatcher.instances) == ["INBOX", "Support/New"]
        await async_wait_for(lambda: all(w.versions for w in FakeWatcher.instances), 30, "watchers classifying")
        await async_wait_for(lambda: "WATCHDOG=1" in notify_socket(), 30, "a watchdog ping")

        # A new version promoted: picked up, and the watchers' batches move over to it.
        modeldir.promote(models, make_version(models, "v2"))
        await async_wait_for(lambda: service.model_version == "v2", 30, "hot reload to v2")
        await async_wait_for(lambda: all(w.versions[-1] == "v2" for w in FakeWatcher.instances), 30, "batches on v2")

        # A broken adapter and a label mismatch are refused; v2 keeps serving.
        with structlog.testing.capture_logs() as logs:
            modeldir.promote(models, make_version(models, "v3-broken", broken=True))
            await async_wait_for(lambda: any(e["event"] == "model_reload_refused" for e in logs), 30, "refusal")
            modeldir.promote(models, make_version(models, "v4-labels", labels=("billing", "login", "spam")))
            await async_wait_for(lambda: sum(e["event"] == "model_reload_refused" for e in logs) >= 2, 30, "2nd refusal")
            # Several more reload checks: a refused version is not retried.
            checked = len(reload_checks)
            await async_wait_for(lambda: len(reload_checks) >= checked + 5, 30, "five more reload checks")
        refusals = [e for e in logs if e["event"] == "model_reload_refused"]
        assert len(refusals) == 2, refusals
        assert "spam" in refusals[1]["error"] and refusals[1]["error_type"] == "LabelMismatchError"
        assert service.model_version == "v2"
        assert FakeWatcher.instances[0].versions[-1] == "v2"

        # Fixed: promoting a good version again works.
        modeldir.promote(models, make_version(models, "v5"))
        await async_wait_for(lambda: service.model_version == "v5", 30, "hot reload to v5")

        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)  # returns normally: exit status 0
        await async_wait_for(lambda: "STOPPING=1\nSTATUS=stopping" in notify_socket(), 30, "STOPPING")
        assert "STOPPING=1\nSTATUS=stopping" in notify_socket()
        assert all(w.thread is not None and not w.thread.is_alive() for w in FakeWatcher.instances)

    run_async(main)


@pytest.mark.pure
def test_startup_fails_fast_on_missing_model_and_label_mismatch(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    service = Service(config, None, load_model=fake_loader, watcher_factory=FakeWatcher, state=object())
    with pytest.raises(ModelError, match="does not exist"):
        run_async(service.run)

    models = Path(config.model.path)
    modeldir.promote(models, make_version(models, "v1", labels=("billing", "login", "spam")))
    FakeWatcher.instances.clear()
    service = Service(config, None, load_model=fake_loader, watcher_factory=FakeWatcher, state=object())
    with pytest.raises(LabelMismatchError, match="spam"):
        run_async(service.run)
    assert FakeWatcher.instances == []  # no watcher started on a model that cannot serve


@pytest.mark.pure
def test_no_accounts_is_a_config_error(tmp_path: Path) -> None:
    import dataclasses

    with pytest.raises(ConfigError, match="accounts"):
        Service(dataclasses.replace(fake_config(tmp_path), accounts=()), None)


@pytest.mark.pure
def test_crashing_watcher_is_restarted_and_stop_works(tmp_path: Path) -> None:
    config = fake_config(tmp_path, mailboxes=("INBOX",))
    models = Path(config.model.path)
    modeldir.promote(models, make_version(models, "v1"))
    calls: list[float] = []

    class Crashing:
        def __init__(self, *args: Any) -> None:
            pass

        def run(self, stop: threading.Event) -> None:
            calls.append(time.monotonic())
            raise RuntimeError("boom")

    service = Service(config, None, load_model=fake_loader, watcher_factory=Crashing, state=object())

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 10)
        await async_wait_for(lambda: len(calls) >= 2, 30, "a restart after the crash")
        service.stop()
        await asyncio.wait_for(task, 5)

    run_async(main)


# -- retrain subprocess ---------------------------------------------------------------------------


@pytest.mark.component  # runs a subprocess
def test_retrain_logs_each_line_and_never_overlaps(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "print('harvesting 12 messages', flush=True)\n"
        "sys.stdout.write('epoch 1: 50%\\repoch 1: 100%\\n'); sys.stdout.flush()\n"
        "time.sleep(0.5)\n"  # a retrain that takes a while: the second call comes while it runs
        "print('promoted', flush=True)\n"
    )
    service = Service(fake_config(tmp_path), None, retrain_command=[sys.executable, "-c", script])

    async def main() -> None:
        with structlog.testing.capture_logs() as logs:
            first, second = await asyncio.gather(service.retrain(), service.retrain())
        assert sorted([first, second], key=str) == [0, None]  # the second was skipped, not run
        lines = [e["line"] for e in logs if e["event"] == "retrain_output"]
        assert lines == ["harvesting 12 messages", "epoch 1: 50%", "epoch 1: 100%", "promoted"]
        assert any(e["event"] == "retrain_skipped" for e in logs)
        assert any(e["event"] == "retrain_finished" for e in logs)

    run_async(main)


@pytest.mark.component  # runs a subprocess
def test_retrain_failure_is_logged_not_raised(tmp_path: Path) -> None:
    service = Service(
        fake_config(tmp_path), None, retrain_command=[sys.executable, "-c", "import sys; print('no data'); sys.exit(3)"]
    )

    async def main() -> None:
        with structlog.testing.capture_logs() as logs:
            assert await service.retrain() == 3
        assert any(e["event"] == "retrain_failed" and e["returncode"] == 3 for e in logs)

    run_async(main)


@pytest.mark.component  # runs a subprocess
def test_default_retrain_command_reaches_the_trainer(tmp_path: Path) -> None:
    import subprocess

    service = Service(fake_config(tmp_path), str(tmp_path / "config.toml"))
    argv = service.jobs.retrain_argv()
    assert argv is not None and argv[-2:] == ["--config", str(tmp_path / "config.toml")]
    out = subprocess.run([*argv[:-2], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout
    assert Service(fake_config(tmp_path), None).jobs.retrain_argv() is None


@pytest.mark.pure
def test_scheduler_registers_cron_retrain_and_interval_jobs(tmp_path: Path) -> None:
    config = fake_config(tmp_path, schedule="30 2 * * 1")
    models = Path(config.model.path)
    modeldir.promote(models, make_version(models, "v1"))
    service = Service(config, None, load_model=fake_loader, watcher_factory=FakeWatcher, state=object())

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 10)
        jobs = {job.id: job for job in service.jobs.scheduler.get_jobs()}
        assert set(jobs) == {"retrain", "corrections", "reload"}
        assert jobs["retrain"].max_instances == 1
        nxt = jobs["retrain"].next_run_time
        assert (nxt.weekday(), nxt.hour, nxt.minute) == (0, 2, 30)
        assert jobs["corrections"].trigger.interval.total_seconds() == config.correction_scan_interval
        service.stop()
        await asyncio.wait_for(task, 5)

    run_async(main)


@pytest.mark.pure
@pytest.mark.parametrize(
    ("field", "weekdays"),
    [
        ("0", {6}), ("7", {6}), ("1", {0}), ("1-5", {0, 1, 2, 3, 4}), ("*/2", {6, 1, 3, 5}),
        ("5-7", {4, 5, 6}), ("sun", {6}), ("mon-fri", {0, 1, 2, 3, 4}), ("0,6", {5, 6}),
    ],
)
def test_crontab_weekdays_follow_cron_not_apscheduler(field: str, weekdays: set[int]) -> None:
    """crontab says 0 = Sunday; APScheduler 3's from_crontab would say Monday (it numbers weekdays from Monday)."""
    from datetime import datetime, timedelta, timezone

    from mailtriage.service.jobs import crontab_trigger

    trigger = crontab_trigger(f"0 3 * * {field}")
    start = datetime(2026, 3, 2, tzinfo=timezone.utc)  # a Monday
    seen, now = set(), start
    for _ in range(10):
        fire = trigger.get_next_fire_time(None, now)
        seen.add(fire.weekday())  # Python: Monday = 0
        now = fire + timedelta(minutes=1)
    assert seen == weekdays


@pytest.mark.pure
@pytest.mark.parametrize("expr", ["0 3 * *", "0 3 * * 8", "0 3 * * funday"])
def test_crontab_trigger_rejects_bad_lines(expr: str) -> None:
    from mailtriage.service.jobs import crontab_trigger

    with pytest.raises(ValueError):
        crontab_trigger(expr)


# -- end to end: Dovecot + tiny model + MailboxWatcher --------------------------------------------


def _mail(n: int, body: str) -> bytes:
    return mail(body, f"help {n}", sender=f"customer{n}@example.com", linesep="\n")


@pytest.mark.component
def test_end_to_end_files_mail_hot_reloads_and_stops(
    dovecot: Any, imap_user: tuple[str, str], tiny_model_dir: Path, tmp_path: Path,
    notify_socket: Callable[[], list[str]],
) -> None:
    from mailtriage.store.state import StateDB

    user, password = imap_user
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models, symlinks=True)
    v1 = modeldir.current_version(models)
    assert v1 is not None
    config = make_config(
        tmp_path, categories=CATEGORIES, unsure_folder="Support/Unsure",
        accounts=[account(host=dovecot.host, port=dovecot.port, username=user, password=password, secret_dir=tmp_path)],
        model={"path": str(models), "threshold": 0.0, "device": "cpu", "batch_size": 4, "max_length": 64},
        training={"schedule": "", "model_dir": str(models)},
    )
    client = dovecot.client(user, password)
    for folder in (*CATEGORIES.values(), config.unsure_folder):
        client.create_folder(folder)
    client.logout()
    service = Service(config, None, reload_interval=0.2, join_timeout=10)

    def filed_versions() -> list[str | None]:
        return [r.model_version for r in StateDB(config.state_path).rows() if r.status == "done"]

    def inbox_count() -> int:
        c = dovecot.client(user, password)
        try:
            return int(c.select_folder("INBOX", readonly=True)[b"EXISTS"])
        finally:
            c.logout()

    def category_count() -> int:
        c = dovecot.client(user, password)
        try:
            return sum(int(c.folder_status(f, [b"MESSAGES"])[b"MESSAGES"]) for f in CATEGORIES.values())
        finally:
            c.logout()

    async def main() -> None:
        from mailtriage.testing.dovecot import load_messages

        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 120)
        await async_wait_for(lambda: "READY=1" in notify_socket(), 30, "READY")
        assert "READY=1" in notify_socket()
        assert service.model_version == v1.name

        load_messages(dovecot.client(user, password), "INBOX", [_mail(1, "My invoice is wrong, billing please fix")])
        await async_wait_for(lambda: inbox_count() == 0 and category_count() == 1, 30, "the first message filed")
        await async_wait_for(lambda: filed_versions() == [v1.name], 30, "the decision recorded")

        # Hot reload: a new version promoted while serving.
        v2 = models / "v2-hot"
        shutil.copytree(v1, v2)
        modeldir.promote(models, v2)
        await async_wait_for(lambda: service.model_version == "v2-hot", 60, "hot reload")
        load_messages(dovecot.client(user, password), "INBOX", [_mail(2, "I cannot login, password rejected")])
        await async_wait_for(lambda: category_count() == 2, 30, "the second message filed")
        await async_wait_for(lambda: filed_versions() == [v1.name, "v2-hot"], 30, "second decision on v2")

        # A bad adapter is refused; v2 keeps serving.
        bad = models / "v3-bad"
        shutil.copytree(v1, bad)
        (bad / modeldir.ADAPTER_CONFIG_FILE).unlink()
        with structlog.testing.capture_logs() as logs:
            modeldir.promote(models, bad)
            await async_wait_for(lambda: any(e["event"] == "model_reload_refused" for e in logs), 30, "refusal")
        assert service.model_version == "v2-hot"
        load_messages(dovecot.client(user, password), "INBOX", [_mail(3, "Refund for my returned order please")])
        await async_wait_for(lambda: category_count() == 3, 30, "the third message filed by the old model")

        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 20)
        assert time.monotonic() - started < 15
        await async_wait_for(lambda: any(s.startswith("STOPPING=1") for s in notify_socket()), 30, "STOPPING")
        assert any(s.startswith("STOPPING=1") for s in notify_socket())

    run_async(main)
    assert inbox_count() == 0 and category_count() == 3  # nothing lost, nothing duplicated


@pytest.mark.component
def test_serve_returns_zero_on_sigterm_with_real_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`serve()` is what the CLI runs: a real model, watchers that cannot connect, SIGTERM -> 0."""
    import dataclasses

    from mailtriage.service.app import serve

    config = dataclasses.replace(
        fake_config(tmp_path, mailboxes=("INBOX",)),
        model=ModelConfig(path=str(tiny_model_dir), device="cpu"),
    )
    timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert serve(config, None) == 0
    finally:
        timer.cancel()
    assert json.loads((tiny_model_dir / "current" / "labels.json").read_text())["labels"]


@pytest.mark.pure
def test_start_hook_shares_the_inference_worker_and_is_closed(tmp_path: Path) -> None:
    """The SMTP filter's seam: a hook on the loop classifies through the same single worker."""
    import dataclasses

    from mailtriage.config import SmtpConfig

    config = dataclasses.replace(fake_config(tmp_path), accounts=(), smtp=SmtpConfig(enabled=True))
    models = Path(config.model.path)
    modeldir.promote(models, make_version(models, "v1"))
    events: list[str] = []

    async def hook(service: Service) -> Callable[[], Awaitable[None]]:
        predictions, version = await service.classify_async(["hello", "world"])
        events.append(f"classified {len(predictions)} on {version}")

        async def close() -> None:
            events.append("closed")

        return close

    service = Service(config, None, load_model=fake_loader, state=object(), on_start=[hook])

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 10)
        service.stop()
        await asyncio.wait_for(task, 5)

    run_async(main)
    assert events == ["classified 2 on v1", "closed"]


@pytest.mark.component
def test_serve_comes_up_during_an_imap_outage_and_files_mail_once_the_server_is_back(
    tmp_path: Path, notify_socket: Callable[[], list[str]]
) -> None:
    """An IMAP server that is down at boot must not fail the start (systemd would
    give up after its start limit); `serve` reports READY, backs off, and files mail when it is back."""
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import Dovecot, load_messages

    with socket.socket() as probe:  # a port nobody listens on yet: the server is "down"
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    models = tmp_path / "models"
    modeldir.promote(models, make_version(models, "v1"))
    config = make_config(
        tmp_path, categories=CATEGORIES,
        accounts=[account(port=port, username="support", password="secret", secret_dir=tmp_path, reconnect_max=1)],
        model={"path": str(models), "device": "cpu", "threshold": 0.0},
        training={"schedule": "", "model_dir": str(models)},
    )
    service = Service(config, None, load_model=fake_loader, join_timeout=10)
    server = Dovecot(port=port)

    async def main() -> None:
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(service.run())
            await asyncio.wait_for(service.ready.wait(), 30)
            await async_wait_for(lambda: "READY=1" in notify_socket(), 30, "READY")
            assert "READY=1" in notify_socket()
            await async_wait_for(lambda: sum(e["event"] == "imap_reconnect_scheduled" for e in logs) >= 2, 20, "retries")
            assert not task.done()
            server.start()
            client = server.client("support", "secret")
            for folder in CATEGORIES.values():
                client.create_folder(folder)
            client.create_folder(config.unsure_folder)
            load_messages(client, "INBOX", [_mail(1, "my invoice is wrong")])

            def filed() -> bool:
                return [r.status for r in StateDB(config.state_path).rows()] == ["done"]

            await async_wait_for(filed, 30, "the message filed after the outage")
            service.stop()
            await asyncio.wait_for(task, 20)

    try:
        run_async(main)
        c = server.client("support", "secret")
        assert int(c.folder_status("Support/Billing", [b"MESSAGES"])[b"MESSAGES"]) == 1
        assert int(c.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"]) == 0
        c.logout()
    finally:
        server.stop()
