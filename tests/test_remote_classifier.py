"""The HTTP Classifier ([model] backend = "http") against a real local HTTP server on 127.0.0.1.

The stub speaks the two wire formats (TEI /predict, vLLM /classify) and can be told to fail, answer
junk, stall or serve a model with other labels. The last test runs the whole daemon on it: Dovecot,
MailboxWatcher, Service; a server outage leaves the mail in INBOX and it is filed once it is back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import AccountConfig, Config, ModelConfig, TrainingConfig, parse_config
from mailtriage.errors import ConfigError, InferenceError, LabelMismatchError
from mailtriage.model import backend
from mailtriage.model.remote import HttpClassifier

CATEGORIES = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
LABELS = tuple(CATEGORIES)


def _scores_for(text: str, labels: tuple[str, ...]) -> list[float]:
    """Deterministic 'model': the label whose name occurs in the text gets 0.8."""
    hit = next((i for i, label in enumerate(labels) if label in text), 0)
    rest = 0.2 / (len(labels) - 1)
    return [0.8 if i == hit else rest for i in range(len(labels))]


class StubInference:
    """TEI- and vLLM-shaped classification server; ``mode`` switches its behaviour live."""

    def __init__(self, labels: tuple[str, ...] = LABELS) -> None:
        self.labels = labels
        self.mode = "ok"            # ok | 503 | junk | slow
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body})
                if stub.mode == "503":
                    return self._send(503, b'{"error": "model is loading"}')
                if stub.mode == "junk":
                    return self._send(200, b"<html>proxy error</html>")
                if stub.mode == "slow":
                    time.sleep(1.0)
                if self.path == "/predict":
                    out = [
                        sorted(
                            ({"label": lab, "score": s} for lab, s in zip(stub.labels, _scores_for(t[0], stub.labels))),
                            key=lambda d: -d["score"],
                        )
                        for t in body["inputs"]
                    ]
                    return self._send(200, json.dumps(out).encode())
                if self.path == "/classify":
                    data = []
                    for i, text in enumerate(body["input"]):
                        probs = _scores_for(text, stub.labels)
                        data.append({"index": i, "label": stub.labels[probs.index(max(probs))], "probs": probs,
                                     "num_classes": len(probs)})
                    data.reverse()  # answers may come in any order: the index says which is which
                    return self._send(200, json.dumps({"id": "classify-1", "data": data}).encode())
                return self._send(404, b'{"error": "not found"}')

            def _send(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
@pytest.mark.parametrize("mode,match", [("503", "HTTP 503"), ("junk", "non-JSON")])
def test_server_errors_are_retryable_inference_errors(stub: StubInference, mode: str, match: str) -> None:
    stub.mode = mode
    with pytest.raises(InferenceError, match=match):
        HttpClassifier(stub.url, LABELS).classify(["login"])


@pytest.mark.component
def test_timeout_and_refused_connection_are_inference_errors(stub: StubInference) -> None:
    stub.mode = "slow"
    with pytest.raises(InferenceError, match="cannot reach"):
        HttpClassifier(stub.url, LABELS, timeout=0.2).classify(["login"])
    url = stub.url
    stub.close()
    with pytest.raises(InferenceError, match="is it running"):
        HttpClassifier(url, LABELS).classify(["login"])


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


def _mail(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "customer@example.com"
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<remote-{time.time_ns()}@example.com>"
    msg.set_content(f"{subject}: please help")
    return msg.as_bytes()


@pytest.mark.component
def test_service_files_mail_through_http_backend_and_retries_outage(
    dovecot: Any, imap_user: tuple[str, str], stub: StubInference, tmp_path: Path
) -> None:
    from mailtriage.service.app import Service
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import load_messages

    user, password = imap_user
    (tmp_path / "pw").write_text(password)
    account = AccountConfig(name="support", host=dovecot.host, port=dovecot.port, tls="none", username=user,
                            password_file=str(tmp_path / "pw"))
    config = Config(
        categories=CATEGORIES, state_path=str(tmp_path / "state.sqlite3"), accounts=(account,),
        model=ModelConfig(path=str(tmp_path / "no-model-here"), backend="http", url=stub.url, threshold=0.5),
        training=TrainingConfig(schedule=""),
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

    async def wait(pred: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    service = Service(config, None, reload_interval=0.2, join_timeout=10)

    async def main() -> None:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        assert service.model_version == f"http:{stub.url}"
        stub.mode = "503"
        load_messages(dovecot.client(user, password), "INBOX", [_mail("login broken")])
        await wait(lambda: any(r["path"] == "/predict" for r in stub.requests[1:]), "a classify attempt")
        await asyncio.sleep(0.3)
        assert count("INBOX") == 1  # the outage left the message where it was
        stub.mode = "ok"
        await wait(lambda: count("Support/Login") == 1 and count("INBOX") == 0, "the message filed after the outage")
        rows = [r for r in StateDB(config.state_path).rows() if r.status == "done"]
        assert [r.model_version for r in rows] == [f"http:{stub.url}"]
        service.stop()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
