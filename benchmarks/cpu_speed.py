"""CPU inference speed of the served MiniLM at 256 tokens: torch vs ONNX Runtime, fp32 vs int8, 1 vs 2 threads.

1. Trains (or reuses with ``--model``) the demo model the way ``benchmarks.speed`` does:
   ``mailtriage-train`` on the demo history (15 x 40 synthetic mails, 256 tokens, ``--epochs``),
   and records seconds per epoch and the trainer's peak RSS.
2. For every variant (runtime torch/onnxruntime x quantize none/int8 x threads), in a fresh child
   process (so RSS and the thread setting are its own): ``load_classifier(..., quantize=, threads=,
   runtime=)``, then
   - ms/email at batch 1, 8 and 32 on 20 Newsgroups mail text of >= 256 tokens (median after warm-up),
   - sustained emails/s: one ``classify`` call on 256 such texts, at the classifier's batch size 8
     and 32 (tokenizing included),
   - length-sorted batching: the demo inbox (mixed lengths) in one ``classify`` call (sorted by
     length inside) vs 32 at a time in arrival order,
   - accuracy on the demo inbox (300 later mails the trainer never saw) and agreement with fp32,
   - peak RSS (VmHWM).
   The 1-minute load average is recorded before and after every variant: the machine may be shared.

    .venv/bin/python -m benchmarks.cpu_speed [--quick] [--model MODEL_DIR] [--epochs N]

A variant is worth serving only if its demo accuracy is within 0.5 points of fp32's. ``--model``
measures an existing version (e.g. ``bench-out/models/cpu-speed/current`` from an earlier run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, REPO, loadavg, machine, md_table, rel, run_timed, tail, train_demo, write_json

TOKENS = 256
# (runtime, quantize, threads)
VARIANTS = [("torch", "none", 2), ("torch", "int8", 2), ("onnxruntime", "none", 2), ("onnxruntime", "int8", 2),
            ("torch", "int8", 1), ("onnxruntime", "int8", 1)]


def train(epochs: int, quick: bool) -> dict[str, Any]:
    model_dir = OUT / "models" / ("cpu-speed-quick" if quick else "cpu-speed")
    t = train_demo(model_dir, per_category=8 if quick else 40, epochs=epochs, max_length=TOKENS,
                   log_name=f"cpu-speed-train{'-quick' if quick else ''}")
    hist = t["result"].get("history") or []
    return {
        "command": t["command"],
        "n_train": t["manifest"]["data"]["train"]["n"],
        "epochs": epochs,
        "epoch_seconds": [round(h["seconds"], 1) for h in hist],
        "finetune_peak_rss_mb": t["result"].get("peak_rss_mb"),
        "process_peak_rss_mib": t["process"].get("peak_rss_mib"),
        "loadavg_before": t["loadavg_before"],
        "loadavg_after": t["loadavg_after"],
        "model_dir": rel(model_dir),
    }


def _hwm_mib(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _demo_inbox(quick: bool) -> tuple[list[str], list[str]]:
    """The inbox generated after the training history (same seed and history size, so the same
    history and then later mail the trainer never saw), through ``mail_text``, with its answer key."""
    from demo.corpus import LABELS_FILE, generate
    from mailtriage.core.mailtext import mail_text

    work = Path(tempfile.mkdtemp(prefix="mt-bench-cpu-inbox-"))
    try:
        generate(work, per_category=8 if quick else 40, inbox=60 if quick else 300, seed=7)
        key = json.loads((work / LABELS_FILE).read_text())
        names = sorted(key)
        return [mail_text((work / "inbox" / n).read_bytes()) for n in names], [key[n] for n in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child(model: str, runtime: str, quantize: str, threads: int, quick: bool, out_json: Path) -> int:
    from benchmarks.speed import _real_texts
    import torch

    from mailtriage.model.transformers import load_classifier, tokenize

    t0 = time.monotonic()
    clf = load_classifier(model, device="cpu", batch_size=32, max_length=TOKENS, quantize=quantize, threads=threads,
                          runtime=runtime)
    load_s = time.monotonic() - t0
    reps = {1: 6, 8: 2, 32: 1} if quick else {1: 30, 8: 6, 32: 3}
    n_sustained = 64 if quick else 256
    texts, _ = _real_texts(clf.tokenizer, 64)
    clf.classify(texts[:4])
    clf.classify(texts[:32])  # warm-up
    ms: dict[str, float] = {}
    for bs, n in reps.items():
        clf.batch_size = bs
        times = []
        for i in range(n):
            chunk = [texts[(i * bs + j) % len(texts)] for j in range(bs)]
            s = time.perf_counter()
            clf.classify(chunk)
            times.append(time.perf_counter() - s)
        ms[f"batch{bs}_ms_per_email"] = round(1000 * statistics.median(times) / bs, 1)
    sustained = [texts[i % len(texts)] for i in range(n_sustained)]
    rate: dict[int, tuple[float, float]] = {}
    for bs in (8, 32):
        clf.batch_size = bs
        s, cpu = time.perf_counter(), time.process_time()
        clf.classify(sustained)
        rate[bs] = (time.perf_counter() - s, time.process_time() - cpu)
    clf.batch_size = 32

    inbox, answers = _demo_inbox(quick)
    lengths = sorted(len(ids) for ids in tokenize(clf.tokenizer, inbox, TOKENS))
    # Real mail is of mixed length: the classifier sorts a call's texts by length before batching
    # (less padding). Arrival order is the same mail classified 32 at a time as it came.
    s = time.perf_counter()
    preds = [p.label for p in clf.classify(inbox)]
    sorted_s = time.perf_counter() - s
    s = time.perf_counter()
    for start in range(0, len(inbox), 32):
        clf.classify(inbox[start : start + 32])
    arrival_s = time.perf_counter() - s
    result = {
        "runtime": runtime,
        "quantize": quantize,
        "threads": threads or torch.get_num_threads(),
        "load_s": round(load_s, 2),
        **ms,
        "sustained_emails": n_sustained,
        "sustained_emails_per_s": round(n_sustained / rate[8][0], 1),
        "sustained_b32_emails_per_s": round(n_sustained / rate[32][0], 1),
        # CPU seconds this process spent per email (all its threads), at batch 8: less disturbed by
        # other processes than wall time; with 1 thread, 1000 / this is what one idle core would do.
        "sustained_cpu_ms_per_email": round(1000 * rate[8][1] / n_sustained, 1),
        "demo_inbox_n": len(answers),
        "demo_inbox_tokens_median_max": [lengths[len(lengths) // 2], lengths[-1]],
        "demo_inbox_sorted_emails_per_s": round(len(inbox) / sorted_s, 1),
        "demo_inbox_arrival_order_emails_per_s": round(len(inbox) / arrival_s, 1),
        "demo_inbox_accuracy": round(sum(p == a for p, a in zip(preds, answers, strict=True)) / max(1, len(answers)), 4),
        "demo_predictions": preds,
        "peak_rss_mib": round(_hwm_mib(), 1),
        # After loading and all the work above: what the serving process keeps (the ONNX export's
        # copies of the graph are gone by then; the peak above includes them).
        "rss_mib": round(_hwm_mib("VmRSS"), 1),
    }
    out_json.write_text(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny training and few repeats: checks the plumbing")
    ap.add_argument("--model", help="skip training; measure this model directory")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the demo fine-tune (default 3)")
    ap.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        model, runtime, quantize, threads, out = args._child
        return child(model, runtime, quantize, int(threads), args.quick, Path(out))

    command = " ".join([".venv/bin/python -m benchmarks.cpu_speed", *(argv if argv is not None else sys.argv[1:])])
    out: dict[str, Any] = {"machine": machine(), "command": command}
    if args.model:
        model = Path(args.model)
    else:
        out["train"] = train(1 if args.quick else args.epochs, args.quick)
        model = REPO / out["train"]["model_dir"] / "current"
    out["variants"] = []
    for runtime, quantize, threads in VARIANTS:
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        argv_c = [sys.executable, "-m", "benchmarks.cpu_speed", "--_child", str(model), runtime, quantize, str(threads), tmp]
        if args.quick:
            argv_c.append("--quick")
        load = loadavg()
        r = run_timed(argv_c, OUT / "logs" / f"cpu-speed-{runtime}-{quantize}-{threads}t.log")
        if r["rc"] != 0:
            raise SystemExit(f"variant {runtime}/{quantize}/{threads} failed:\n{tail(REPO / r['log'])}")
        res = json.loads(Path(tmp).read_text())
        Path(tmp).unlink()
        res["loadavg_before"], res["loadavg_after"] = load, loadavg()
        out["variants"].append(res)
    # Agreement with torch fp32 at the same thread count (the predictions as trained).
    ref = {v["threads"]: v["demo_predictions"] for v in out["variants"] if (v["runtime"], v["quantize"]) == ("torch", "none")}
    for v in out["variants"]:
        base = ref.get(v["threads"]) or next(iter(ref.values()))
        v["agreement_with_fp32"] = round(sum(a == b for a, b in zip(v["demo_predictions"], base, strict=True)) / max(1, len(base)), 4)
    path = write_json("cpu-speed" + ("-quick" if args.quick else ""), out)
    rows = [[v["runtime"], v["quantize"], v["threads"], v["batch1_ms_per_email"], v["batch8_ms_per_email"], v["batch32_ms_per_email"],
             v["sustained_emails_per_s"], v["sustained_b32_emails_per_s"], v["sustained_cpu_ms_per_email"], v["demo_inbox_sorted_emails_per_s"], v["demo_inbox_arrival_order_emails_per_s"],
             f"{100 * v['demo_inbox_accuracy']:.1f}%", f"{100 * v['agreement_with_fp32']:.1f}%",
             f"{v['peak_rss_mib']:.0f} / {v['rss_mib']:.0f}", v["load_s"], f"{v['loadavg_before'][0]:.1f} / {v['loadavg_after'][0]:.1f}"]
            for v in out["variants"]]
    if "train" in out:
        t = out["train"]
        print(f"training: {t['n_train']} mails, s/epoch {t['epoch_seconds']}, peak RSS {t['process_peak_rss_mib']} MiB, "
              f"load {t['loadavg_before'][0]:.1f} / {t['loadavg_after'][0]:.1f}")
    print(md_table(["runtime", "quantize", "threads", "ms/email b1", "b8", "b32", "sustained emails/s b8 (256 tok)",
                    "sustained b32", "CPU ms/email b8",
                    "inbox emails/s sorted", "inbox arrival order", "demo acc",
                    "agrees w/ torch fp32", "RSS MiB peak / after", "load s", "load avg before/after"], rows))
    print(f"   command: {command}   JSON: {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
