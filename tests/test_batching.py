"""Micro-batching: concurrent callers share one forward pass, and each still gets its own answer.

The gathering and splitting rules are pure (``service/batching.py``) and tested table-style; what we
promise to senders (each message tagged with its own category, a poison message failing alone,
451 for every waiting message at shutdown) goes through the real relay, real sockets, the real
inference worker and a real aiosmtpd next hop, with a keyword fake as the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import smtplib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mailtriage.config import Config, ModelConfig, SmtpConfig, TrainingConfig
from mailtriage.core.classifier import Prediction
from mailtriage.core.labels import LabelSet
from mailtriage.errors import InferenceUnavailable, ModelError
from mailtriage.model import modeldir
from mailtriage.service import batching
from mailtriage.service.batching import Request
from mailtriage.service.inference import Inference
from mailtriage.smtp.nexthop import NextHop
from mailtriage.smtp.relay import SmtpFilter
from mailtriage.testing.fakes import KeywordClassifier
from tests.test_relay import LoopThread, NextHopHandler, free_port, headers_of, mail, next_hop  # noqa: F401

# Twenty categories, one keyword each: a message answered with another caller's prediction is
# tagged with the wrong category.
LABELS = tuple(f"c{i:02d}" for i in range(20))
CATEGORIES = {label: f"Support/{label.upper()}" for label in LABELS}
KEYWORDS = {f"kw{i:02d}": f"c{i:02d}" for i in range(20)}


# -- the pure core: who shares a pass ------------------------------------------------------------


def req(n: int, arrived: float = 0.0) -> Request:
    return Request([f"t{i}" for i in range(n)], arrived)


@pytest.mark.pure
@pytest.mark.parametrize(
    ("sizes", "limit", "taken", "expected"),
    [
        ([1, 1, 1], 16, 0, [1, 1, 1]),        # everything waiting fits in one pass
        ([1] * 20, 16, 0, [1] * 16),          # at most `limit` texts
        ([50, 1], 16, 0, [50]),               # a big request (an IMAP batch) is never split, runs alone
        ([1, 50, 1], 16, 0, [1]),             # gathering stops at the first request that does not fit
        ([3, 3], 16, 12, [3]),                # joining a pass that already holds `taken` texts
        ([5], 16, 12, []),                    # too big to join: it starts the next pass
        ([], 16, 0, []),
    ],
)
def test_take_fills_a_pass_in_arrival_order_without_splitting(
    sizes: list[int], limit: int, taken: int, expected: list[int]
) -> None:
    line: deque[object] = deque(req(n) for n in sizes)
    got = batching.take(line, limit, taken)
    assert [len(r.texts) for r in got] == expected
    assert len(line) == len(sizes) - len(expected)  # what was not taken keeps its place


@pytest.mark.pure
def test_take_stops_at_a_model_load_and_drops_callers_that_gave_up() -> None:
    gone, a, b = req(1), req(1), req(1)
    gone.future.cancel()
    load = object()  # a model load (or the stop marker) in line: it runs between passes
    line: deque[object] = deque([gone, a, load, b])
    assert batching.take(line, 16) == [a]
    assert list(line) == [load, b]


class Passes:
    """A classify function for ``run_pass``: records every pass; a text containing 'poison' fails
    any pass it is in; ``unavailable`` makes every pass fail like a server that is down."""

    def __init__(self, version: str = "v1", unavailable: bool = False, short: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.version, self.unavailable, self.short = version, unavailable, short

    def __call__(self, texts: list[str]) -> tuple[list[Prediction], str]:
        self.calls.append(list(texts))
        if self.unavailable:
            raise InferenceUnavailable("inference server answered 503")
        if any("poison" in t for t in texts):
            raise ValueError("the tokenizer choked on this text")
        preds = [Prediction(t, 0.9, {t: 0.9}) for t in texts]
        return (preds[:-1] if self.short and len(texts) > 1 else preds), self.version


def answers(requests: Sequence[Request], classify: Passes) -> dict[int, Any]:
    out: dict[int, Any] = {}
    batching.run_pass(requests, classify, lambda r, outcome: out.__setitem__(requests.index(r), outcome))
    return out


@pytest.mark.pure
def test_one_pass_answers_each_caller_with_its_own_predictions_and_the_version() -> None:
    requests = [Request(["a"], 0), Request(["b", "c"], 0), Request(["d"], 0)]
    classify = Passes(version="v7")
    got = answers(requests, classify)
    assert classify.calls == [["a", "b", "c", "d"]]  # one forward pass
    assert {i: ([p.label for p in preds], version) for i, (preds, version) in got.items()} == {
        0: (["a"], "v7"), 1: (["b", "c"], "v7"), 2: (["d"], "v7")}


@pytest.mark.pure
def test_a_poison_text_fails_alone_the_others_are_answered() -> None:
    requests = [Request(["a"], 0), Request(["poison"], 0), Request(["c"], 0)]
    classify = Passes()
    got = answers(requests, classify)
    assert classify.calls == [["a", "poison", "c"], ["a"], ["poison"], ["c"]]
    assert isinstance(got[1], ValueError)
    assert [p.label for p in got[0][0]] == ["a"] and [p.label for p in got[2][0]] == ["c"]


@pytest.mark.pure
def test_an_unavailable_server_fails_every_caller_without_a_retry_each() -> None:
    requests = [Request(["a"], 0), Request(["b"], 0)]
    classify = Passes(unavailable=True)
    got = answers(requests, classify)
    assert len(classify.calls) == 1
    assert all(isinstance(outcome, InferenceUnavailable) for outcome in got.values())


@pytest.mark.pure
def test_a_wrong_prediction_count_is_not_split_across_callers() -> None:
    # Which caller's prediction is missing is unknowable: each is asked again alone.
    requests = [Request(["a"], 0), Request(["b"], 0)]
    classify = Passes(short=True)
    got = answers(requests, classify)
    assert classify.calls == [["a", "b"], ["a"], ["b"]]
    assert [p.label for p in got[0][0]] == ["a"] and [p.label for p in got[1][0]] == ["b"]


@pytest.mark.pure
def test_a_caller_alone_sees_exactly_what_the_classifier_did() -> None:
    requests = [Request(["poison"], 0)]
    classify = Passes()
    got = answers(requests, classify)
    assert classify.calls == [["poison"]] and isinstance(got[0], ValueError)


# -- the worker and the real relay -----------------------------------------------------------------


class Gated(KeywordClassifier):
    """The keyword model, but each pass waits for a permit from the test (so callers pile up in line
    deterministically); records every pass; a text containing 'poison' fails any pass it is in."""

    def __init__(self, version: str = "v1") -> None:
        super().__init__(LABELS, KEYWORDS, version=version, default="c00")
        self.permits = threading.Semaphore(0)
        self.passes: list[list[str]] = []
        self.lock = threading.Lock()

    def classify(self, texts: Sequence[str]) -> list[Prediction]:
        with self.lock:
            self.passes.append(list(texts))
        if not self.permits.acquire(timeout=60):
            raise RuntimeError("the test never let this pass through")
        if any("poison" in t for t in texts):
            raise ValueError("the tokenizer choked on this text")
        return super().classify(texts)

    def release(self, n: int = 1000) -> None:
        self.permits.release(n)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def model_dir(tmp_path: Path, *versions: str) -> Path:
    models = tmp_path / "models"
    for name in versions:
        (models / name).mkdir(parents=True)
        LabelSet(LABELS).save(models / name)
    modeldir.promote(models, models / versions[0])
    return models


def make_config(tmp_path: Path, models: Path, hop_port: int, listen: int = 1, batch_wait_ms: float = 0.0) -> Config:
    return Config(
        categories=CATEGORIES,
        state_path=str(tmp_path / "state.sqlite3"),
        model=ModelConfig(path=str(models), threshold=0.5, device="cpu", batch_size=16, batch_wait_ms=batch_wait_ms),
        smtp=SmtpConfig(enabled=True, listen_host="127.0.0.1", listen_port=listen,
                        next_hop_host="127.0.0.1", next_hop_port=hop_port),
        training=TrainingConfig(schedule=""),
    )


@dataclasses.dataclass
class Relay:
    port: int
    inference: Inference
    model: Gated


@pytest.fixture
def relay(tmp_path: Path, next_hop: tuple[NextHopHandler, int]) -> Iterator[Relay]:
    """The real relay on an event loop thread, classifying through a real Inference worker."""
    loop = LoopThread()
    model = Gated()
    config = make_config(tmp_path, model_dir(tmp_path, "v1"), next_hop[1])
    inference = Inference(config, load_model=lambda path: model)
    server = SmtpFilter(config, inference.classify_async, port=0, hostname="relay.test",
                        next_hop=NextHop("127.0.0.1", next_hop[1], timeout=10, local_hostname="relay.test"))

    async def start() -> None:
        await inference.load()
        await server.start()

    loop.run(start())
    try:
        yield Relay(server.port, inference, model)
    finally:
        model.release()
        loop.run(server.close(grace=1))
        loop.run(inference.shutdown(grace=1))
        loop.stop()


def outcome_of(port: int, body: str) -> str:
    """What a sending MTA sees: '250', the code of a refusal, or 'dropped'."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as client:
            client.sendmail("customer@example.com", ["support@example.com"], mail(body))
    except smtplib.SMTPResponseException as exc:
        return str(exc.smtp_code)
    except (smtplib.SMTPServerDisconnected, OSError):
        return "dropped"
    return "250"


def send_concurrently(
    pool: concurrent.futures.ThreadPoolExecutor, port: int, bodies: Sequence[str]
) -> list[concurrent.futures.Future[str]]:
    return [pool.submit(outcome_of, port, body) for body in bodies]


def tags(hop: NextHopHandler) -> dict[str, str]:
    """keyword in the relayed body -> the category the relay tagged it with."""
    out = {}
    for env in hop.received:
        assert isinstance(env.content, bytes)
        body = env.content.decode()
        [kw] = [k for k in KEYWORDS if k in body]
        out[kw] = dict(headers_of(env))["X-Mailtriage-Category"]
    return out


@pytest.mark.component
def test_twenty_concurrent_clients_share_passes_and_each_gets_its_own_category(
    relay: Relay, next_hop: tuple[NextHopHandler, int]
) -> None:
    hop = next_hop[0]
    bodies = [f"ticket about {kw}" for kw in KEYWORDS]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        # The first message holds the worker, so the other 19 sessions are all waiting in line
        # when the worker is free again: they must share passes.
        first = send_concurrently(pool, relay.port, bodies[:1])
        wait_until(lambda: len(relay.model.passes) == 1, "the first pass")
        rest = send_concurrently(pool, relay.port, bodies[1:])
        wait_until(lambda: relay.inference.waiting == 19, "19 sessions waiting for the model")
        relay.model.release()
        outcomes = [f.result(timeout=60) for f in first + rest]
    assert outcomes == ["250"] * 20
    assert tags(hop) == KEYWORDS  # every message tagged with its own category
    # 1 + 19 in passes of at most batch_size (16): 3 passes, not 20.
    assert [len(p) for p in relay.model.passes] == [1, 16, 3]


@pytest.mark.component
def test_a_poison_message_in_a_shared_pass_fails_alone(
    relay: Relay, next_hop: tuple[NextHopHandler, int]
) -> None:
    hop = next_hop[0]
    good = [f"ticket about {kw}" for kw in list(KEYWORDS)[:9]]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        first = send_concurrently(pool, relay.port, good[:1])
        wait_until(lambda: len(relay.model.passes) == 1, "the first pass")
        others = send_concurrently(pool, relay.port, good[1:])
        poison = send_concurrently(pool, relay.port, ["poison kw19"])
        wait_until(lambda: relay.inference.waiting == 9, "9 sessions waiting for the model")
        relay.model.release()
        assert [f.result(timeout=60) for f in first + others] == ["250"] * 9
        assert poison[0].result(timeout=60) == "451"  # only its sender retries
    assert tags(hop) == {kw: KEYWORDS[kw] for kw in list(KEYWORDS)[:9]}
    sizes = [len(p) for p in relay.model.passes]
    assert sizes[:2] == [1, 9] and sizes[2:] == [1] * 9  # the shared pass failed, then each alone


@pytest.mark.component
def test_a_hot_reload_waits_for_the_pass_and_each_caller_gets_the_version_that_answered(tmp_path: Path) -> None:
    models = model_dir(tmp_path, "v1", "v2")
    loaded: list[Gated] = []

    def load(path: Path) -> Gated:
        loaded.append(Gated(version=path.name))
        return loaded[-1]

    inference = Inference(make_config(tmp_path, models, 9), load_model=load)

    async def until(predicate: Callable[[], bool]) -> None:
        await asyncio.to_thread(wait_until, predicate, "the worker")

    async def main() -> dict[str, str]:
        await inference.load()
        v1 = loaded[0]
        blocker = asyncio.ensure_future(inference.classify_async(["ticket about kw00"]))
        await until(lambda: len(v1.passes) == 1)  # the worker is busy: what follows waits in line
        ahead = [asyncio.ensure_future(inference.classify_async([f"ticket about kw0{i}"])) for i in (1, 2, 3)]
        await until(lambda: inference.waiting == 3)
        modeldir.promote(models, models / "v2")
        reload = asyncio.ensure_future(inference.check_reload())
        await until(lambda: len(inference._line) == 4)  # the reload job is in line behind them
        behind = asyncio.ensure_future(inference.classify_async(["ticket about kw09"]))
        await until(lambda: inference.waiting == 4)
        v1.release()
        await until(lambda: len(loaded) == 2)
        loaded[1].release()
        versions = {"blocker": (await asyncio.wait_for(blocker, 30))[1]}
        for i, fut in enumerate(ahead):
            versions[f"ahead{i}"] = (await asyncio.wait_for(fut, 30))[1]
        assert await asyncio.wait_for(reload, 30)
        versions["behind"] = (await asyncio.wait_for(behind, 30))[1]
        await inference.shutdown(grace=1)
        return versions

    versions = asyncio.run(main())
    # The requests in line before the reload share one pass on v1 (a pass never straddles a swap,
    # and the one behind the reload does not join it); the one behind the reload is answered by v2.
    assert versions == {"blocker": "v1", "ahead0": "v1", "ahead1": "v1", "ahead2": "v1", "behind": "v2"}
    assert [len(p) for p in loaded[0].passes] == [1, 3]
    assert [len(p) for p in loaded[1].passes] == [1]


@pytest.mark.component
def test_shutdown_answers_every_waiting_message_451_promptly(
    tmp_path: Path, next_hop: tuple[NextHopHandler, int]
) -> None:
    """The real service: a pass of many callers stuck in the model, more callers in line; a stop
    answers all of them 451 (none dropped, nothing relayed) within the shutdown grace."""
    from mailtriage.service.app import Service

    hop, hop_port = next_hop
    listen = free_port()
    model = Gated()
    config = make_config(tmp_path, model_dir(tmp_path, "v1"), hop_port, listen=listen, batch_wait_ms=5)
    service = Service(config, None, load_model=lambda path: model, inference_grace=0.5)
    bodies = [f"ticket about {kw}" for kw in KEYWORDS]

    async def main() -> list[str]:
        task = asyncio.create_task(service.run())
        await asyncio.wait_for(service.ready.wait(), 30)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            first = send_concurrently(pool, listen, bodies[:1])
            await asyncio.to_thread(wait_until, lambda: len(model.passes) == 1, "the first pass")
            rest = send_concurrently(pool, listen, bodies[1:])
            await asyncio.to_thread(wait_until, lambda: service.inference.waiting == 19, "19 waiting")
            model.release(1)  # the first pass goes through; the next (16 callers) is stuck, 3 wait behind it
            await asyncio.to_thread(wait_until, lambda: len(model.passes) == 2 and service.inference.waiting == 3,
                                    "a shared pass stuck, 3 waiting")
            service.stop()
            await asyncio.wait_for(task, 30)
            outcomes = [await asyncio.wrap_future(f) for f in first + rest]
        model.release()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes == ["250"] + ["451"] * 19
    assert len(hop.received) == 1
