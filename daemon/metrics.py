"""Prometheus metrics of the daemon, on a private registry so tests and other libraries never clash.

A leaf: every module that counts something (imap/, smtp/, store/, service/) imports its metric
from here, and this module imports nothing of mailtriage, so counting never pulls in the service.
``mailtriage.service.metrics_server`` serves ``REGISTRY`` over HTTP when ``metrics_port`` is set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

# outcome: 'filed' (acted on with a category), 'unsure' (below threshold), 'dry_run' (decided,
# nothing done), 'failed' (the action failed; the message stays in its source folder and is
# retried), 'quarantined' (retries ran out: moved to the quarantine folder).
OUTCOMES = ("filed", "unsure", "dry_run", "failed", "quarantined")

MESSAGES = Counter(
    "mailtriage_messages",
    "Messages decided by the daemon, by predicted category and outcome.",
    ["category", "outcome"],
    registry=REGISTRY,
)

RETRIES = Counter(
    "mailtriage_action_retries",
    "Attempts to redo a refused action (move/keyword/header), by result: done, failed, quarantined.",
    ["result"],
    registry=REGISTRY,
)

# Seconds from fetching a message to its action being done: what staff feel as triage delay.
LATENCY = Histogram(
    "mailtriage_message_latency_seconds",
    "Seconds from fetch to completed action, per message.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)

CLASSIFY_LATENCY = Histogram(
    "mailtriage_classify_batch_seconds",
    "Seconds one classify() batch took on the inference worker (queue wait excluded).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CLASSIFY_CALLERS = Histogram(
    "mailtriage_classify_batch_callers",
    "Callers (SMTP sessions, milter callbacks, mailbox batches) answered by one classify() batch: "
    "requests that waited in line are merged into one forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)

QUEUE_DEPTH = Gauge(
    "mailtriage_queue_depth",
    "Messages seen in a watched mailbox and not yet acted on.",
    ["account", "mailbox"],
    registry=REGISTRY,
)

CORRECTIONS = Counter(
    "mailtriage_corrections",
    "Messages staff moved out of the folder the daemon chose (predicted) into another (actual).",
    ["predicted", "actual"],
    registry=REGISTRY,
)

MODEL_INFO = Info(
    "mailtriage_model",
    "The model version currently serving.",
    registry=REGISTRY,
)

MODEL_RELOADS = Counter(
    "mailtriage_model_reloads",
    "Hot reload attempts of the model, by result ('ok' or 'refused').",
    ["result"],
    registry=REGISTRY,
)

RETRAINS = Counter(
    "mailtriage_retrains",
    "Scheduled retrain subprocess runs, by result ('ok', 'failed', 'busy': another run held the lock, 'skipped').",
    ["result"],
    registry=REGISTRY,
)

METRICS_CLOSED = Counter(
    "mailtriage_metrics_connections_closed",
    "Connections to the metrics port closed unanswered, by reason: 'evicted' (idle while the cap was "
    "reached), 'refused' (cap reached, none idle), 'timeout' (no whole request in time), 'too_large'.",
    ["reason"],
    registry=REGISTRY,
)

SMTP_REFUSED = Counter(
    "mailtriage_smtp_connections_refused",
    "SMTP client connections answered 421 because smtp.max_connections were already held.",
    registry=REGISTRY,
)


def set_model_version(version: str) -> None:
    MODEL_INFO.info({"version": version})
