"""The HTTP Classifier ([model] backend = "http") against a real local HTTP server on 127.0.0.1.

The stub speaks the two wire formats (TEI /predict, vLLM /classify) and can be told to fail, answer
junk, stall, trickle bytes, answer a huge body or a redirect, scores that are no distribution, or
serve a model with other labels. The daemon runs on it too: Dovecot, MailboxWatcher, Service (a
server outage leaves the mail in INBOX and it is filed once it is back), and `mailtriage serve` /
the Service with a server that hangs (SIGTERM still ends it; the watchdog stops being fed).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import Config, ModelConfig, parse_config
from mailtriage.errors import ConfigError, InferenceError, InferenceUnavailable, LabelMismatchError
from mailtriage.model import backend
from mailtriage.model.remote import APIS, HttpClassifier
from mailtriage.testing.httpstub import HttpStub, JsonHandler
from mailtriage.testing.builders import account, config_toml, mail, make_config, relay_table
from mailtriage.testing.waits import async_wait_for, port_open, wait_for
from tests.test_relay import (  # noqa: F401 - next_hop is a fixture
    LoopThread, NextHop, NextHopHandler, SmtpFilter, free_port, next_hop, relay_config, send,
)
from tests.test_service import notify_socket  # noqa: F401 - notify_socket is a fixture

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
LABELS = tuple(CATEGORIES)


def _scores_for(text: str, labels: tuple[str, ...]) -> list[float]:
    """Deterministic 'model': the label whose name occurs in the text gets 0.8."""
    hit = next((i for i, label in enumerate(labels) if label in text), 0)
    rest = 0.2 / (len(labels) - 1)
    return [0.8 if i == hit else rest for i in range(len(labels))]


# Scores the hostile modes answer instead of a softmax (per text, in label order).
NOT_A_DISTRIBUTION = {
    "ones": [1.0, 1.0, 1.0],           # every label certain: was filed at confidence 1.0
    "half": [0.2, 0.2, 0.1],           # sums to 0.5
    "logits": [3.2, -1.5, 0.3],        # raw scores, not probabilities
    "negative": [1.2, -0.1, -0.1],     # sums to 1, out of range
    "nan": [float("nan"), 0.5, 0.5],   # NaN is valid JSON for Python's parser
}
HUGE = 100 << 20  # a 100 MB answer


class StubInference(HttpStub):
    """TEI- and vLLM-shaped classification server; ``mode`` switches its behaviour live.

    Modes: ok | 503 | 429 | 400 | junk | slow | hang (never answers) | trickle_body / trickle_status
    (one byte every 0.1 s for 15 s) | huge_length / huge_stream (100 MB with / without Content-Length) |
    redirect (302 to ``redirect_to``) | raw (200 with ``raw`` as the body) | a key of NOT_A_DISTRIBUTION.
    ``sent`` counts the bytes each hostile answer got out before the client hung up.
    """

    def __init__(self, labels: tuple[str, ...] = LABELS) -> None:
        self.labels = labels
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.redirect_to = ""
        self.raw = b""
        self.sent: list[int] = []
        self.closing = threading.Event()
        stub = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body})
                mode = stub.mode
                try:
                    self._answer(mode, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what a hostile server sees when it is refused

            def _answer(self, mode: str, body: Any) -> None:
                if mode in ("503", "429", "400"):
                    return self.send_json(int(mode), b'{"error": "model is loading"}')
                if mode == "junk":
                    return self.send_json(200, b"<html>proxy error</html>")
                if mode == "raw":
                    return self.send_json(200, stub.raw)
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", stub.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if mode == "hang":
                    stub.closing.wait(600)
                    return None
                if mode.startswith("trickle"):
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                    data = head + b" " * 100000 if mode == "trickle_status" else b" " * 100000
                    if mode == "trickle_body":
                        self.wfile.write(head)
                    for i in range(150):  # 15 s, then it hangs up: without a deadline a call lasts that long
                        if stub.closing.wait(0.1):
                            return None
                        self.wfile.write(data[i : i + 1])
                    return None
                if mode.startswith("huge"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if mode == "huge_length":
                        self.send_header("Content-Length", str(HUGE))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk, sent = b"[" + b" " * 65535, 0
                    try:
                        while sent < HUGE and not stub.closing.is_set():
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    finally:
                        stub.sent.append(sent)
                    return None
                if mode == "slow":
                    time.sleep(1.0)  # the scenario: a slow inference server
                texts = [t[0] for t in body["inputs"]] if self.path == "/predict" else body.get("input", [])
                scores = [NOT_A_DISTRIBUTION.get(mode) or _scores_for(t, stub.labels) for t in texts]
                if self.path == "/predict":
                    out = [
                        sorted(
                            ({"label": lab, "score": s} for lab, s in zip(stub.labels, row)),
                            key=lambda d: -d["score"],
                        )
                        for row in scores
                    ]
                    return self.send_json(200, json.dumps(out).encode())
                if self.path == "/classify":
                    data = []
                    for i, probs in enumerate(scores):
                        data.append({"index": i, "label": stub.labels[probs.index(max(probs))], "probs": probs,
                                     "num_classes": len(probs)})
                    data.reverse()  # answers may come in any order: the index says which is which
                    return self.send_json(200, json.dumps({"id": "classify-1", "data": data}).encode())
                return self.send_json(404, b'{"error": "not found"}')


        self.serve(Handler)

    def close(self) -> None:
        self.closing.set()
        super().close()


@pytest.fixture
def stub() -> Iterator[StubInference]:
    server = StubInference()
    try:
        yield server
    finally:
        server.close()


TEXTS = ["my login fails", "refunds please", "billing is wrong", "no keyword at all", "login again"]
EXPECTED = ["login", "refunds", "billing", "billing", "login"]


@pytest.mark.component
@pytest.mark.parametrize("api", ["tei", "vllm"])
def test_classifies_in_batches_and_keeps_order(stub: StubInference, api: str) -> None:
    clf = HttpClassifier(stub.url, LABELS, api=api, remote_model="support-v3", batch_size=2)
    preds = clf.classify(TEXTS)
    assert [p.label for p in preds] == EXPECTED
    assert all(p.confidence == pytest.approx(0.8) for p in preds)
    assert set(preds[0].scores) == set(LABELS) and sum(preds[0].scores.values()) == pytest.approx(1.0)
    assert len(stub.requests) == 3  # 5 texts in batches of 2
    assert clf.version == "http:support-v3"
    if api == "tei":
        assert stub.requests[0] == {"path": "/predict", "body": {"inputs": [["my login fails"], ["refunds please"]],
                                                                  "truncate": True, "raw_scores": False}}
    else:
        assert stub.requests[0]["body"] == {"model": "support-v3", "input": ["my login fails", "refunds please"]}


@pytest.mark.component
@pytest.mark.parametrize("api", ["tei", "vllm"])
def test_labels_outside_the_label_set_are_refused(api: str) -> None:
    server = StubInference(labels=("billing", "login", "spam"))
    try:
        clf = HttpClassifier(server.url, LABELS, api=api)
        with pytest.raises(LabelMismatchError) as err:
            clf.classify(["spam spam"])
    finally:
        server.close()
    assert "[categories]" in str(err.value)


@pytest.mark.component
def test_vllm_with_other_class_count_is_refused() -> None:
    server = StubInference(labels=("billing", "login"))
    try:
        with pytest.raises(LabelMismatchError, match="scores 2 classes but"):
            HttpClassifier(server.url, LABELS, api="vllm").classify(["login"])
    finally:
        server.close()


@pytest.mark.component
@pytest.mark.parametrize("mode,match", [("503", "HTTP 503"), ("429", "HTTP 429")])
def test_server_trouble_is_inference_unavailable(stub: StubInference, mode: str, match: str) -> None:
    # Transient: the watcher must retry the message later, never quarantine it for this.
    stub.mode = mode
    with pytest.raises(InferenceUnavailable, match=match):
        HttpClassifier(stub.url, LABELS).classify(["login"])


@pytest.mark.component
@pytest.mark.parametrize("mode,match", [("400", "HTTP 400"), ("junk", "non-JSON"), ("ones", "not a probability")])
def test_wrong_answers_are_inference_errors_not_unavailable(stub: StubInference, mode: str, match: str) -> None:
    stub.mode = mode
    with pytest.raises(InferenceError, match=match) as err:
        HttpClassifier(stub.url, LABELS).classify(["login"])
    assert not isinstance(err.value, InferenceUnavailable)


@pytest.mark.component
def test_timeout_and_refused_connection_are_inference_unavailable(stub: StubInference) -> None:
    stub.mode = "slow"
    with pytest.raises(InferenceUnavailable, match="0.2 s deadline"):
        HttpClassifier(stub.url, LABELS, timeout=0.2).classify(["login"])
    url = stub.url
    stub.close()
    with pytest.raises(InferenceUnavailable, match="is the inference server running"):
        HttpClassifier(url, LABELS).classify(["login"])


@pytest.mark.component
@pytest.mark.parametrize("mode", ["trickle_body", "trickle_status"])
def test_a_trickling_server_fails_within_the_deadline(stub: StubInference, mode: str) -> None:
    # One byte every 0.1 s: each socket read is quick, so only a deadline for the whole call ends it.
    stub.mode = mode
    started = time.monotonic()
    with pytest.raises(InferenceUnavailable, match="no complete answer within the 1 s deadline"):
        HttpClassifier(stub.url, LABELS, timeout=1.0).classify(["login"])
    # Not a speed goal: the bound the deadline promises (the trickle alone lasts 15 s).
    assert time.monotonic() - started < 10


@pytest.mark.component
def test_a_redirect_is_never_followed(stub: StubInference) -> None:
    elsewhere = StubInference()
    try:
        stub.mode, stub.redirect_to = "redirect", elsewhere.url
        for api in APIS:
            with pytest.raises(InferenceError, match="HTTP 302.*never follows redirects") as err:
                HttpClassifier(stub.url, LABELS, api=api).classify(["login"])
            assert not isinstance(err.value, InferenceUnavailable)
        assert elsewhere.requests == []  # its answer would have filed mail
    finally:
        elsewhere.close()


@pytest.mark.component
@pytest.mark.parametrize("mode,match", [("huge_length", "Content-Length 104857600, over the"),
                                        ("huge_stream", "more than the 1310720-byte cap")])
def test_a_huge_answer_is_refused_without_reading_it_whole(stub: StubInference, mode: str, match: str) -> None:
    stub.mode = mode
    clf = HttpClassifier(stub.url, LABELS, batch_size=1)
    assert clf.max_answer_bytes == 1310720  # 1 MiB + 256 KiB per text of a batch
    with pytest.raises(InferenceError, match=match):
        clf.classify(["login"])
    wait_for(lambda: stub.sent, 30, interval=0.01)  # the stub notices the hang-up on its next write
    # What got out before the client hung up: the cap plus what the kernel buffers, far from 100 MB.
    assert stub.sent and stub.sent[0] < 32 << 20, stub.sent


@pytest.mark.component
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", sorted(NOT_A_DISTRIBUTION))
def test_scores_that_are_not_a_distribution_are_refused(stub: StubInference, api: str, mode: str) -> None:
    stub.mode = mode
    with pytest.raises(InferenceError, match="not a probability distribution|expected") as err:
        HttpClassifier(stub.url, LABELS, api=api).classify(["login"])
    assert not isinstance(err.value, InferenceUnavailable)


# Hostile answers, one row each: the exception a classify must end in (never another kind, never a
# prediction). "deadline" rows use a 1 s deadline.
HOSTILE = [
    ("503", InferenceUnavailable), ("429", InferenceUnavailable), ("hang", InferenceUnavailable),
    ("trickle_body", InferenceUnavailable), ("trickle_status", InferenceUnavailable),
    ("400", InferenceError), ("junk", InferenceError), ("redirect", InferenceError),
    ("huge_length", InferenceError), ("huge_stream", InferenceError),
    *((mode, InferenceError) for mode in sorted(NOT_A_DISTRIBUTION)),
]


@pytest.mark.component
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode,expected", HOSTILE)
def test_hostile_inference_answers_table(stub: StubInference, api: str, mode: str, expected: type) -> None:
    stub.mode, stub.redirect_to = mode, "http://127.0.0.1:9"
    with pytest.raises(InferenceError) as err:
        HttpClassifier(stub.url, LABELS, api=api, timeout=1.0).classify(["login", "billing"])
    assert type(err.value) is expected, err.value
    assert str(err.value)


def _random_json(rng: Any, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.35:
        return rng.choice([0, 1, 0.5, -1, 1e308, 10**400, float("nan"), float("inf"), True, None, "billing", "x",
                           rng.random(), rng.uniform(-2, 2)])
    if pick < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["label", "score", "index", "probs", "data", "error", rng.choice(LABELS)]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _random_answer(rng: Any, api: str) -> bytes:
    """A well-shaped answer with random faults, or random JSON, or random bytes."""
    kind = rng.random()
    if kind < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind < 0.3:
        return json.dumps(_random_json(rng)).encode()
    rows = []
    for _ in range(rng.choice([1, 1, 1, 0, 2])):
        probs = [rng.choice([rng.random(), 1.0, 0.0, -0.5, 2.0, float("nan")]) for _ in range(rng.choice([3, 3, 2, 4]))]
        if rng.random() < 0.4:
            total = sum(p for p in probs if p == p) or 1.0
            probs = [p / total for p in probs]
        rows.append(probs)
    if api == "tei":
        return json.dumps([[{"label": rng.choice([*LABELS, "spam"]) if rng.random() < 0.1 else LABELS[i % 3],
                             "score": p} for i, p in enumerate(row)] for row in rows]).encode()
    return json.dumps({"data": [{"index": rng.choice([i, i, 0, 5, -1, "0"]), "probs": row} for i, row in enumerate(rows)]}).encode()


@pytest.mark.component
@pytest.mark.parametrize("api", APIS)
def test_fuzz_random_answers_file_only_distributions(stub: StubInference, api: str) -> None:
    import random

    rng = random.Random(20240616)
    stub.mode = "raw"
    clf = HttpClassifier(stub.url, LABELS, api=api)
    outcomes = {"filed": 0, "refused": 0}
    for _ in range(300):
        stub.raw = _random_answer(rng, api)
        try:
            [pred] = clf.classify(["login"])
        except (InferenceError, LabelMismatchError):
            outcomes["refused"] += 1
            continue
        # Anything filed is a real distribution over the configured labels.
        assert set(pred.scores) == set(LABELS) and pred.label in LABELS, stub.raw
        assert all(0 <= s <= 1 for s in pred.scores.values()) and abs(sum(pred.scores.values()) - 1) <= 0.01, stub.raw
        assert pred.confidence == max(pred.scores.values())
        outcomes["filed"] += 1
    assert outcomes["filed"] and outcomes["refused"], outcomes  # the fuzz reached both sides


@pytest.mark.component
def test_smtp_filter_answers_451_when_the_inference_server_is_unavailable(
    stub: StubInference, next_hop: tuple[NextHopHandler, int]
) -> None:
    import smtplib

    hop, hop_port = next_hop
    clf = HttpClassifier(stub.url, LABELS, timeout=1.0)

    async def classify(texts: Any) -> Any:
        return await asyncio.to_thread(clf.classify, texts), clf.version

    loop = LoopThread()
    server = SmtpFilter(relay_config(listen_port=1, next_hop_port=hop_port), classify, port=0, hostname="relay.test",
                        next_hop=NextHop("127.0.0.1", hop_port, timeout=5, local_hostname="relay.test"))
    loop.run(server.start())
    try:
        for mode in ("503", "hang"):
            stub.mode = mode
            with pytest.raises(smtplib.SMTPDataError) as err:
                send(server.port, mail("my login fails"))
            assert err.value.smtp_code == 451, err.value
        assert hop.received == []
        stub.mode = "ok"
        assert send(server.port, mail("my login fails")) == {}  # the sender's retry gets through
        assert len(hop.received) == 1
    finally:
        loop.run(server.close(grace=1))
        loop.stop()


@pytest.mark.pure
def test_config_selects_http_backend_and_validates_url() -> None:
    cfg = parse_config({"categories": CATEGORIES, "model": {"backend": "http", "url": "http://10.0.0.5:8080",
                                                            "api": "vllm", "timeout": 5}})
    assert cfg.model.backend == "http" and cfg.model.api == "vllm" and cfg.model.timeout == 5.0
    assert backend.target(cfg) == backend.target(cfg)  # constant: the service never "reloads" a remote server
    with pytest.raises(ConfigError, match="needs model.url"):
        parse_config({"categories": CATEGORIES, "model": {"backend": "http"}})
    with pytest.raises(ConfigError, match="backend"):
        parse_config({"categories": CATEGORIES, "model": {"url": "http://x"}})
    with pytest.raises(ConfigError, match="not allowed"):
        parse_config({"categories": CATEGORIES, "model": {"backend": "http", "url": "http://x", "api": "openai"}})


@pytest.mark.component
def test_backend_load_probes_the_server(stub: StubInference) -> None:
    cfg = Config(categories=CATEGORIES, model=ModelConfig(backend="http", url=stub.url))
    clf = backend.load(cfg)
    assert isinstance(clf, HttpClassifier) and len(stub.requests) == 1
    stub.mode = "503"
    with pytest.raises(InferenceError):
        backend.load(cfg)


@pytest.mark.component
def test_service_files_mail_through_http_backend_and_retries_outage(
    dovecot: Any, imap_user: tuple[str, str], stub: StubInference, tmp_path: Path
) -> None:
    from mailtriage.service.app import Service
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import load_messages

    user, password = imap_user
    config = make_config(
        tmp_path, categories=CATEGORIES,
        accounts=[account(host=dovecot.host, port=dovecot.port, username=user, password=password, secret_dir=tmp_path)],
        model={"path": str(tmp_path / "no-model-here"), "backend": "http", "url": stub.url, "threshold": 0.5},
        training={"schedule": ""},
    )
    client = dovecot.client(user, password)
    for folder in (*CATEGORIES.values(), config.unsure_folder):
        client.create_folder(folder)
    client.logout()

    def count(folder: str) -> int:
        c = dovecot.client(user, password)
        try:
            return int(c.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"])
        finally:
            c.logout()

    service = Service(config, None, reload_interval=0.2, join_timeout=10)

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        assert service.model_version == f"http:{stub.url}"
        stub.mode = "503"
        load_messages(dovecot.client(user, password), "INBOX", [mail("login broken: please help", "login broken",
                                                                     linesep="\n")])
        await async_wait_for(lambda: any(r["path"] == "/predict" for r in stub.requests[1:]), 30, "a classify attempt")
        # The watcher tries again after its backoff: by then the first attempt's failure was handled.
        await async_wait_for(lambda: sum(r["path"] == "/predict" for r in stub.requests[1:]) >= 2, 30, "a retry")
        assert count("INBOX") == 1  # the outage left the message where it was
        stub.mode = "ok"
        await async_wait_for(lambda: count("Support/Login") == 1 and count("INBOX") == 0, 30,
                             "the message filed after the outage")
        rows = [r for r in StateDB(config.state_path).rows() if r.status == "done"]
        assert [r.model_version for r in rows] == [f"http:{stub.url}"]
        service.stop()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())


# -- a hung inference server: the watchdog and SIGTERM ----------------------------------------------


def _smtp_settings(tmp_path: Path, url: str, listen: int, hop_port: int, timeout: float) -> dict[str, Any]:
    """The HTTP backend with the SMTP filter on, as keyword arguments of the config builders."""
    return {"categories": CATEGORIES,
            "model": {"path": str(tmp_path / "no-model-here"), "backend": "http", "url": url, "timeout": timeout},
            "smtp": relay_table(listen, hop_port), "training": {"schedule": ""}}


def _smtp_config(tmp_path: Path, stub: StubInference, listen: int, hop_port: int, timeout: float) -> Config:
    return make_config(tmp_path, **_smtp_settings(tmp_path, stub.url, listen, hop_port, timeout))


def _send_outcome(port: int) -> str:
    """What an MTA's delivery attempt ends in: '250', the code of a refusal, or 'dropped'."""
    import smtplib

    try:
        send(port, mail("my login fails"))
    except smtplib.SMTPResponseException as exc:
        return str(exc.smtp_code)
    except (smtplib.SMTPServerDisconnected, OSError):
        return "dropped"
    return "250"


@pytest.mark.component  # SIGTERM to the runner, an AF_UNIX notify socket, real HTTP and SMTP servers
def test_stuck_inference_stops_the_watchdog_and_sigterm_still_ends_the_service(
    stub: StubInference, next_hop: tuple[NextHopHandler, int], tmp_path: Path,
    notify_socket: Callable[[], list[str]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    import structlog

    from mailtriage.service.app import Service

    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    hop, hop_port = next_hop
    listen = free_port()
    # The hung call's deadline (300 s) is far past the worker's allowance and the shutdown grace.
    config = _smtp_config(tmp_path, stub, listen, hop_port, timeout=300)
    service = Service(config, None, inference_stuck_after=0.5, inference_grace=1.0)

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        await async_wait_for(lambda: "WATCHDOG=1" in notify_socket(), 5, "a watchdog ping")
        stub.mode = "hang"
        with structlog.testing.capture_logs() as logs:
            sender = asyncio.create_task(asyncio.to_thread(_send_outcome, listen))
            await async_wait_for(lambda: any(e["event"] == "inference_worker_stuck" for e in logs), 10, "the stall logged")
            await async_wait_for(lambda: any(s.startswith("STATUS=inference stuck") for s in notify_socket()), 5, "STATUS")
            seen = len(notify_socket())
            await asyncio.sleep(1.0)  # observing ten ping intervals in which nothing may come
            assert "WATCHDOG=1" not in notify_socket()[seen:]  # systemd would restart us after WatchdogSec

            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 120)
            stopped_in = time.monotonic() - started
            outcome = await sender
        # The bound shutdown promises (SMTP grace 10 s + inference grace 1 s), against a 300 s hang.
        assert stopped_in < 30, stopped_in
        assert outcome in ("451", "dropped")  # the sender keeps the message and retries
        assert hop.received == []
        [abandoned] = [e for e in logs if e["event"] == "inference_worker_abandoned"]
        assert abandoned["job"] == "classify 1 text(s)"

    asyncio.run(main())


@pytest.mark.component  # a subprocess, SIGTERM, real HTTP and SMTP servers
def test_mailtriage_serve_exits_on_sigterm_while_the_inference_server_hangs(
    stub: StubInference, next_hop: tuple[NextHopHandler, int], tmp_path: Path
) -> None:
    """The real command: a thread stuck on the hung server must not keep the process from exiting."""
    import os
    import signal
    import subprocess
    import sys

    hop, hop_port = next_hop
    listen = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_toml(tmp_path, metrics_port=0, **_smtp_settings(tmp_path, stub.url, listen, hop_port,
                                                                                     timeout=600)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "mailtriage.cli.main", "--config", str(config_path), "serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: len(stub.requests) >= 1, 60, "the start-up probe")
        wait_for(lambda: port_open(listen), 30, "the SMTP filter listening")
        stub.mode = "hang"
        result: list[str] = []
        sender = threading.Thread(target=lambda: result.append(_send_outcome(listen)), daemon=True)
        sender.start()
        wait_for(lambda: len(stub.requests) >= 2, 30, "the message's classify call")
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=45)  # systemd's TimeoutStopSec is 60
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("mailtriage serve did not exit within 45 s of SIGTERM while a call hung")
        sender.join(35)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].decode(errors="replace")
    assert rc == 0, out
    assert "inference_worker_abandoned" in out
    assert result in (["451"], ["dropped"]) and hop.received == []




@pytest.mark.component
def test_the_deadline_covers_a_tls_handshake_that_never_ends() -> None:
    # A server that accepts TCP and never answers the ClientHello: https:// is bounded like http://.
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(InferenceUnavailable, match="within the 1 s deadline"):
            HttpClassifier(url, LABELS, timeout=1.0).classify(["login"])
    finally:
        thread.join(5)
        for sock in (*accepted, listener):
            sock.close()


@pytest.mark.component
def test_stop_while_the_start_up_probe_hangs(stub: StubInference, tmp_path: Path) -> None:
    from mailtriage.service.app import Service

    stub.mode = "hang"
    config = _smtp_config(tmp_path, stub, free_port(), 9, timeout=300)
    service = Service(config, None, inference_grace=0.5)

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await async_wait_for(lambda: len(stub.requests) == 1, 30, "the start-up probe")
        service.stop()
        await asyncio.wait_for(task, 60)  # the probe's own deadline is 300 s

    asyncio.run(main())
    assert not service.ready.is_set()
