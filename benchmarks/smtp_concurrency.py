"""The SMTP content filter under 1, 10 and 50 concurrent clients on real-length mail, against the
classifier's own batch-8 throughput measured in the same run.

    .venv/bin/python -m benchmarks.smtp_concurrency [--quick] [--model DIR] [--clients 1,10,50]
        [--messages 300] [--batch-wait-ms MS]

- The model: ``--model DIR`` (a model directory with ``current``, or one version), else the real
  ``mailtriage-train`` on 20 Newsgroups (the train archive in ../shared/datasets: per newsgroup
  ``--per-class`` messages of the older 80%, 256 tokens, ``--serve model`` so the MiniLM itself
  serves, not the TF-IDF baseline), kept in bench-out/models/ and reused by later runs.
- The mail: 20 Newsgroups messages of the newest 20% per newsgroup (never trained on) whose mail
  text has >= 256 tokens, i.e. real-length mail, sent as they are in the archive (CRLF).
- The relay: the real ``mailtriage serve`` in its own process with ``[smtp]`` only and the default
  ``[model]`` settings (torch, batch_size 16, batch_wait_ms from the config default unless given),
  threshold 0 (every message tagged with its label, so tags can be checked against the
  classifier's own answers); a real aiosmtpd next hop in this process.
- Per client count C: first the classifier alone (loaded here with the same ``[model]`` settings,
  serve idle): ``classify`` on the first 128 texts at batch 8; then C clients, each with one SMTP
  connection, send the messages of a shared list as fast as they are answered. msg/s over the
  wall time; latency per message (MAIL..DATA reply); added latency = that minus the same mail sent
  straight to the next hop (p50 of one client); passes and callers per pass from the daemon's
  /metrics. ratio = msg/s / the mean of the classifier-alone figures measured just before and just
  after that level (the machine may be shared: load averages are printed with every row).
- Checked: every message delivered, tagged, and with the label the classifier alone gave its text.

Goal: 10 and 50 clients >= 90% of the classifier's batch-8 throughput; p95 < 1 s at 10 clients.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from email import message_from_bytes
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ENV,
    OUT,
    REPO,
    base_model,
    bin_path,
    busy_processes,
    loadavg,
    machine,
    md_table,
    rel,
    run_timed,
    tail,
    write_json,
)
from mailtriage.testing.imapserver import free_port

TOKENS = 256
ALONE_BATCH = 8
ALONE_TEXTS = 128
SEED = 13


def _label(group: str) -> str:
    return group  # newsgroup names are category names as they are (quoted TOML keys)


# -- the model --------------------------------------------------------------------------------------


def train(per_class: int, epochs: int, quick: bool) -> dict[str, Any]:
    from benchmarks.accuracy import extract_news, news_groups, news_older

    model_dir = OUT / "models" / ("smtp-concurrency-quick" if quick else "smtp-concurrency")
    marker = model_dir / "bench-train.json"
    if marker.exists() and (model_dir / "current").exists():
        return {**json.loads(marker.read_text()), "reused": True}
    by_group, _ = news_groups()
    rng = random.Random(SEED)
    work = Path(tempfile.mkdtemp(prefix="mt-bench-smtpc-train-"))
    shutil.rmtree(model_dir, ignore_errors=True)
    try:
        dest = {}
        for group, names in by_group.items():
            older, _ = news_older(names)
            for name in rng.sample(older, min(per_class, len(older))):
                dest[name] = work / "data" / _label(group) / Path(name).name
        extract_news(dest)
        # Newsgroup names hold dots: quoted keys, or TOML reads "alt.atheism" as a table.
        config = work / "config.toml"
        config.write_text("[categories]\n" + "".join(f"{json.dumps(_label(g))} = {json.dumps(_label(g))}\n"
                                                   for g in by_group), encoding="utf-8")
        argv = [bin_path("mailtriage-train"), "--config", str(config), "--data", str(work / "data"),
                "--base", base_model(), "--model-dir", str(model_dir), "--epochs", str(epochs),
                "--max-length", str(TOKENS), "--serve", "model", "--holdout-fraction", "0.1", "--seed", str(SEED),
                "--min-examples", "2", "--device", "cpu", "--force"]
        load = loadavg()
        r = run_timed(argv, OUT / "logs" / "smtp-concurrency-train.log")
        if r["rc"] != 0:
            raise SystemExit(f"mailtriage-train failed:\n{tail(REPO / r['log'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((model_dir / "current" / "manifest.json").read_text())
    out = {"command": " ".join(argv).replace(str(work), "$TMP"), "process": r, "loadavg_before": load,
           "per_class": per_class, "epochs": epochs, "serve": manifest.get("serve"),
           "model_dir": rel(model_dir / "current")}
    marker.write_text(json.dumps(out, indent=2))
    return out


# -- the mail ---------------------------------------------------------------------------------------


def real_mail(tokenizer: Any, want: int) -> tuple[list[bytes], list[str], list[int]]:
    """Raw messages (CRLF) from the newest 20% of each newsgroup, round-robin over the groups,
    whose mail text has >= TOKENS tokens; their mail texts; their token counts."""
    import tarfile

    from benchmarks.accuracy import NEWS_TAR, news_groups, news_older
    from mailtriage.core.mailtext import mail_text

    by_group, _ = news_groups()
    newest = {name: group for group, names in by_group.items() for name in news_older(names)[1]}
    per_group: dict[str, list[tuple[bytes, str, int]]] = {g: [] for g in by_group}
    with tarfile.open(NEWS_TAR, "r:gz") as tf:
        for m in tf:
            group = newest.get(m.name)
            if group is None or len(per_group[group]) >= want:
                continue
            fh = tf.extractfile(m)
            raw = fh.read() if fh is not None else b""
            text = mail_text(raw)
            n = len(tokenizer(text, truncation=False)["input_ids"])
            if n >= TOKENS:
                crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                per_group[group].append((crlf, text, n))
    picked: list[tuple[bytes, str, int]] = []
    while len(picked) < want and any(per_group.values()):
        for items in per_group.values():
            if items and len(picked) < want:
                picked.append(items.pop(0))
    return [p[0] for p in picked], [p[1] for p in picked], [p[2] for p in picked]


# -- the parts: next hop, relay, clients -------------------------------------------------------------


class Hop:
    """The next hop: accepts everything, keeps each message's bench id -> X-Mailtriage-Category."""

    def __init__(self) -> None:
        self.tags: dict[str, str | None] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content)
        with self.lock:
            self.tags[str(msg.get("X-Bench-Id"))] = msg.get("X-Mailtriage-Category")
        return "250 2.0.0 Ok: queued"


def write_config(work: Path, model: Path, labels: Sequence[str], listen: int, hop: int, metrics: int,
                 batch_wait_ms: float | None) -> Path:
    cats = "\n".join(f"{json.dumps(label)} = {json.dumps(label)}" for label in labels)
    wait = "" if batch_wait_ms is None else f"batch_wait_ms = {batch_wait_ms}\n"
    cfg = work / "config.toml"
    cfg.write_text(f"""# Written by benchmarks/smtp_concurrency.py: [smtp] only, default [model] settings.
state_path = "{work}/state.sqlite3"
metrics_host = "127.0.0.1"
metrics_port = {metrics}

[categories]
{cats}

[model]
path = "{model}"
threshold = 0.0
{wait}
[smtp]
enabled = true
listen_host = "127.0.0.1"
listen_port = {listen}
next_hop_host = "127.0.0.1"
next_hop_port = {hop}

[training]
schedule = ""
""", encoding="utf-8")
    return cfg


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mailtriage serve exited ({proc.returncode}):\n{tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"mailtriage serve not listening on {port} within {timeout:.0f} s:\n{tail(log)}")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(mailtriage_classify_batch_(?:seconds|callers)_(?:sum|count))(?:\{\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def with_id(raw: bytes, bench_id: str) -> bytes:
    return f"X-Bench-Id: {bench_id}\r\n".encode() + raw


def run_clients(port: int, mails: Sequence[tuple[str, bytes]], clients: int) -> dict[str, Any]:
    """``clients`` threads, one SMTP connection each, sending from the shared list until it is empty."""
    import smtplib

    todo = list(reversed(mails))
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    ready = threading.Barrier(clients + 1)

    def client() -> None:
        conn = smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench", timeout=300)
        conn.ehlo()
        ready.wait()
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    bench_id, raw = todo.pop()
                started = time.perf_counter()
                try:
                    conn.sendmail("sender@example.com", ["support@example.com"], raw)
                except smtplib.SMTPException as exc:
                    with lock:
                        failures.append(f"{bench_id}: {exc}")
                    continue
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
        finally:
            try:
                conn.quit()
            except Exception:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "latencies": latencies, "failures": failures}


def q(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))] if s else float("nan")


def classifier_alone(clf: Any, texts: Sequence[str]) -> tuple[float, list[str]]:
    """emails/s of ``classify`` on ``texts`` at batch ALONE_BATCH (tokenizing included), and the labels."""
    clf.batch_size = ALONE_BATCH
    started = time.perf_counter()
    preds = clf.classify(list(texts))
    return len(texts) / (time.perf_counter() - started), [p.label for p in preds]


# -- main -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.smtp_concurrency", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few messages: checks the plumbing")
    ap.add_argument("--model", help="skip training; serve this model directory (with `current`) or version")
    ap.add_argument("--per-class", type=int, default=20, help="training messages per newsgroup (default 20)")
    ap.add_argument("--epochs", type=int, default=1, help="fine-tune epochs (default 1: speed does not depend on it)")
    ap.add_argument("--clients", default="1,10,50", help="client counts (default 1,10,50)")
    ap.add_argument("--messages", type=int, default=300, help="messages per client count (default 300, >= 3 per client)")
    ap.add_argument("--batch-wait-ms", type=float, help="[model] batch_wait_ms for the daemon (default: the config default)")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python -m benchmarks.smtp_concurrency", *(argv if argv is not None else sys.argv[1:])])
    levels = [int(c) for c in args.clients.split(",")]
    n_messages = 40 if args.quick else args.messages
    out: dict[str, Any] = {"machine": machine(), "command": command, "busy_before": busy_processes()}

    if args.model:
        model = Path(args.model)
        out["model"] = {"given": str(model)}
    else:
        out["model"] = train(4 if args.quick else args.per_class, args.epochs, args.quick)
        model = REPO / out["model"]["model_dir"]

    from aiosmtpd.controller import Controller

    from mailtriage.config import load_config
    from mailtriage.core.labels import LabelSet
    from mailtriage.model import backend, modeldir

    version = modeldir.resolve(model) if (model / "current").exists() else model
    labels = list(LabelSet.load(version).labels)
    work = Path(tempfile.mkdtemp(prefix="mt-bench-smtpc-"))
    hop_handler = Hop()
    hop_port, listen, metrics_port = free_port(), free_port(), free_port()
    cfg_path = write_config(work, version, labels, listen, hop_port, metrics_port, args.batch_wait_ms)
    config = load_config(cfg_path)
    out["model_config"] = {"runtime": config.model.runtime, "quantize": config.model.quantize,
                           "device": config.model.device, "batch_size": config.model.batch_size,
                           "batch_wait_ms": config.model.batch_wait_ms, "max_length": config.model.max_length,
                           "threads": config.model.threads}
    clf = backend.load(config, version)
    want = max(n_messages, ALONE_TEXTS)
    raws, texts, tokens = real_mail(clf.tokenizer, want)
    if len(raws) < want:
        raise SystemExit(f"only {len(raws)} real-length messages found in the archive, {want} wanted")
    out["mail"] = {"n": len(raws), "tokens_min_median": [min(tokens), int(statistics.median(tokens))],
                   "bytes_median": int(statistics.median(len(r) for r in raws)),
                   "source": "20 Newsgroups train archive, newest 20% per newsgroup, mail text >= 256 tokens"}
    clf.classify(texts[:16])  # warm-up
    expected: dict[int, str] = {}
    for start in range(0, len(texts), ALONE_BATCH * 8):
        chunk = texts[start : start + ALONE_BATCH * 8]
        expected.update(enumerate(classifier_alone(clf, chunk)[1], start))

    controller = Controller(hop_handler, hostname="127.0.0.1", port=hop_port, server_hostname="nexthop.bench")
    controller.start()
    log_path = OUT / "logs" / "smtp-concurrency-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    serve_argv = [bin_path("mailtriage"), "--config", str(cfg_path), "serve"]
    rows: list[dict[str, Any]] = []
    try:
        # Straight to the next hop: what the relay's latency is compared with.
        direct = run_clients(hop_port, [(f"direct-{i}", with_id(raws[i % len(raws)], f"direct-{i}"))
                                        for i in range(min(60, n_messages))], 1)
        direct_p50 = statistics.median(direct["latencies"])
        out["direct_next_hop_p50_ms"] = round(1000 * direct_p50, 2)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(serve_argv, stdout=log, stderr=subprocess.STDOUT, env=ENV)
            try:
                wait_port(listen, proc, log_path, 300)
                warm = run_clients(listen, [(f"warm-{i}", with_id(raws[i], f"warm-{i}")) for i in range(8)], 2)
                if warm["failures"]:
                    raise SystemExit(f"warm-up failed: {warm['failures'][:3]}\n{tail(log_path)}")
                alone_before, _ = classifier_alone(clf, texts[:ALONE_TEXTS])
                for clients in levels:
                    n = max(n_messages, 3 * clients)
                    mails = [(f"c{clients}-{i}", with_id(raws[i % len(raws)], f"c{clients}-{i}")) for i in range(n)]
                    load_before = loadavg()
                    m0 = scrape(metrics_port)
                    res = run_clients(listen, mails, clients)
                    m1 = scrape(metrics_port)
                    load_after = loadavg()
                    alone_after, _ = classifier_alone(clf, texts[:ALONE_TEXTS])
                    alone = (alone_before + alone_after) / 2
                    lat = res["latencies"]
                    passes = m1.get("mailtriage_classify_batch_callers_count", 0) - m0.get("mailtriage_classify_batch_callers_count", 0)
                    callers = m1.get("mailtriage_classify_batch_callers_sum", 0) - m0.get("mailtriage_classify_batch_callers_sum", 0)
                    model_s = m1.get("mailtriage_classify_batch_seconds_sum", 0) - m0.get("mailtriage_classify_batch_seconds_sum", 0)
                    delivered = [i for i in range(n) if f"c{clients}-{i}" in hop_handler.tags]
                    agree = sum(hop_handler.tags[f"c{clients}-{i}"] == expected[i % len(raws)] for i in delivered)
                    msg_s = len(lat) / res["wall_s"]
                    rows.append({
                        "clients": clients, "messages": n, "relayed": len(lat), "failed": len(res["failures"]),
                        "failures_sample": res["failures"][:3],
                        "msg_per_s": round(msg_s, 1),
                        "latency_p50_ms": round(1000 * q(lat, 0.5)), "latency_p95_ms": round(1000 * q(lat, 0.95)),
                        "added_p50_ms": round(1000 * (q(lat, 0.5) - direct_p50)),
                        "added_p95_ms": round(1000 * (q(lat, 0.95) - direct_p50)),
                        "classifier_b8_before": round(alone_before, 1), "classifier_b8_after": round(alone_after, 1),
                        "ratio": round(msg_s / alone, 3),
                        "passes": int(passes), "callers_per_pass": round(callers / passes, 2) if passes else None,
                        "model_busy_share": round(model_s / res["wall_s"], 3),
                        "tag_agrees_with_classifier": f"{agree}/{len(delivered)}",
                        "loadavg_before": load_before, "loadavg_after": load_after,
                    })
                    print(f"{clients:>3} clients: {msg_s:.1f} msg/s, p50 {rows[-1]['latency_p50_ms']} ms, "
                          f"p95 {rows[-1]['latency_p95_ms']} ms, ratio {rows[-1]['ratio']}, "
                          f"{rows[-1]['callers_per_pass']} callers/pass, load {load_after[0]:.2f}", flush=True)
                    alone_before = alone_after
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        controller.stop()
        shutil.rmtree(work, ignore_errors=True)
    out["levels"] = rows
    out["busy_after"] = busy_processes()
    out["loadavg_end"] = loadavg()
    out["serve_log"] = rel(log_path)
    path = write_json("smtp-concurrency" + ("-quick" if args.quick else ""), out)

    print()
    print(f"command: {command}")
    print(f"date: {out['machine']['date']}; cpu: {out['machine']['cpu']} x {out['machine']['cores']}; "
          f"torch threads {out['machine'].get('torch_threads')}; load average at start {out['machine']['loadavg_start']}")
    print(f"model: {out['model']}")
    print(f"[model] settings: {out['model_config']}")
    print(f"mail: {out['mail']}; straight to the next hop p50 {out['direct_next_hop_p50_ms']} ms")
    print(md_table(
        ["clients", "msg/s", "classifier b8 alone (before/after)", "ratio", "latency p50 / p95 ms",
         "added p50 / p95 ms", "callers/pass", "model busy", "tags = classifier", "failed", "load avg (1 min) before/after"],
        [[r["clients"], r["msg_per_s"], f"{r['classifier_b8_before']} / {r['classifier_b8_after']}", f"{100 * r['ratio']:.0f}%",
          f"{r['latency_p50_ms']} / {r['latency_p95_ms']}", f"{r['added_p50_ms']} / {r['added_p95_ms']}",
          r["callers_per_pass"], f"{100 * r['model_busy_share']:.0f}%", r["tag_agrees_with_classifier"], r["failed"],
          f"{r['loadavg_before'][0]:.2f} / {r['loadavg_after'][0]:.2f}"] for r in rows]))
    goals = {r["clients"]: r for r in rows}
    verdicts = []
    for c in (10, 50):
        if c in goals:
            verdicts.append(f"{c} clients ratio {100 * goals[c]['ratio']:.0f}% (goal >= 90%)")
    if 10 in goals:
        verdicts.append(f"p95 at 10 clients {goals[10]['latency_p95_ms']} ms (goal < 1000)")
    print("goals: " + "; ".join(verdicts))
    print(f"busy processes before: {out['busy_before']}; after: {out['busy_after']}")
    print(f"json: {rel(path)}")
    return 1 if any(r["failed"] or r["relayed"] != r["messages"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
