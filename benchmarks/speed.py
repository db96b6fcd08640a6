"""Training time and peak memory of one MiniLM fine-tune, and inference latency and memory of the classifier.

1. ``mailtriage-train`` on the demo history (15 categories x 40 synthetic support mails, 256 tokens,
   2 epochs): wall time, fine-tune seconds per optimizer step (batch 16), peak RSS of the process.
2. In a fresh process (so its RSS is the classifier's alone): ``load_classifier`` on that adapter,
   then ``classify`` on real mail text of at least 256 tokens (20 Newsgroups messages through
   ``mail_text``, truncated to 256 tokens as the daemon does): median ms per email at batch 1 and
   batch 16 after warm-up, and RSS after load and at peak. Also ``mail_text`` time per raw message.

    .venv/bin/python -m benchmarks.speed [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DATASETS,
    ENV,
    OUT,
    REPO,
    busy_processes,
    loadavg,
    machine,
    md_table,
    rel,
    run_timed,
    tail,
    train_demo,
    write_json,
)

NEWS_TAR = DATASETS / "20news" / "20news-bydate-train.tar.gz"
TOKENS = 256


def train_part(quick: bool) -> dict[str, Any]:
    # One epoch is enough to time a step; a full run is steps x epochs (the product default is 8 epochs).
    per_category, epochs, max_length = (8, 1, 128) if quick else (40, 1, TOKENS)
    model_dir = OUT / "models" / ("speed-quick" if quick else "speed")
    t = train_demo(model_dir, per_category=per_category, epochs=epochs, max_length=max_length,
                   log_name=f"speed-train{'-quick' if quick else ''}")
    manifest, result = t["manifest"], t["result"]
    steps = result.get("steps") or 0
    epoch_s = [h["seconds"] for h in result.get("history") or []]
    return {
        "command": t["command"],
        "data": f"demo.corpus.generate(per_category={per_category}, seed=7) history, 15 categories",
        "n_train": manifest["data"]["train"]["n"],
        "n_val": manifest["data"]["validation"]["n"],
        "epochs": epochs,
        "max_length": max_length,
        "batch_size": manifest.get("params", {}).get("batch_size", 16),
        "process": t["process"],
        "finetune_seconds": result.get("train_seconds"),
        "steps": steps,
        # Epoch seconds include the validation pass; per step = (epoch time) / steps per epoch.
        "seconds_per_step": (sum(epoch_s) / steps) if steps else None,
        "finetune_peak_rss_mb": result.get("peak_rss_mb"),
        "loadavg_before": t["loadavg_before"],
        "loadavg_after": t["loadavg_after"],
        "model_dir": rel(model_dir),
    }


# ---- inference, in a child process -------------------------------------------------------------


def _real_texts(tokenizer: Any, want: int) -> tuple[list[str], list[bytes]]:
    """20 Newsgroups messages whose mail text has >= 256 tokens, in archive order (deterministic)."""
    from mailtriage.core.mailtext import mail_text

    texts: list[str] = []
    raws: list[bytes] = []
    with tarfile.open(NEWS_TAR, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            fh = tf.extractfile(m)
            raw = fh.read() if fh is not None else b""
            text = mail_text(raw)
            if len(tokenizer(text, truncation=False)["input_ids"]) >= TOKENS:
                texts.append(text)
                raws.append(raw)
                if len(texts) >= want:
                    break
    return texts, raws


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def infer_child(model: str, quick: bool, out_json: Path) -> int:
    import torch

    from mailtriage.core.mailtext import mail_text

    rss_start = _rss_mib()
    t0 = time.monotonic()
    from mailtriage.model.transformers import load_classifier

    rss_torch = _rss_mib()
    clf = load_classifier(model, device="cpu", batch_size=16, max_length=TOKENS)
    load_s = time.monotonic() - t0
    rss_loaded = _rss_mib()
    n1, n16 = (8, 3) if quick else (40, 10)
    texts, raws = _real_texts(clf.tokenizer, max(n1, 16 * 2) + 16)
    ntok = [min(TOKENS, len(clf.tokenizer(t)["input_ids"])) for t in texts]

    # mail_text per raw message (the daemon runs it for every message, outside the model)
    mt = []
    for raw in raws:
        s = time.perf_counter()
        mail_text(raw)
        mt.append(time.perf_counter() - s)

    for i in range(3):  # warm-up: first calls allocate and pick kernels
        clf.classify(texts[i : i + 1])
    clf.classify(texts[:16])
    b1 = []
    for i in range(n1):
        s = time.perf_counter()
        clf.classify([texts[i % len(texts)]])
        b1.append(time.perf_counter() - s)
    b16 = []
    for i in range(n16):
        chunk = [texts[(i * 16 + j) % len(texts)] for j in range(16)]
        s = time.perf_counter()
        clf.classify(chunk)
        b16.append(time.perf_counter() - s)
    result = {
        "model": model,
        "torch_threads": torch.get_num_threads(),
        "texts": len(texts),
        "tokens_per_text": statistics.median(ntok),
        "load_s": round(load_s, 2),
        "rss_mib_interpreter": round(rss_start, 1),
        "rss_mib_after_imports": round(rss_torch, 1),
        "rss_mib_after_load": round(rss_loaded, 1),
        "rss_mib_after_inference": round(_rss_mib(), 1),
        "peak_rss_mib": round(_hwm_mib(), 1),
        "batch1_ms_median": round(1000 * statistics.median(b1), 1),
        "batch1_ms_p90": round(1000 * sorted(b1)[int(0.9 * (len(b1) - 1))], 1),
        "batch1_repeats": n1,
        "batch16_ms_per_email_median": round(1000 * statistics.median(b16) / 16, 1),
        "batch16_ms_per_batch_median": round(1000 * statistics.median(b16), 1),
        "batch16_repeats": n16,
        "mail_text_ms_median": round(1000 * statistics.median(mt), 2),
        "mail_text_ms_max": round(1000 * max(mt), 2),
    }
    out_json.write_text(json.dumps(result, indent=2))
    return 0


def infer_part(model: Path, quick: bool) -> dict[str, Any]:
    out_json = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        argv = [sys.executable, "-m", "benchmarks.speed", "--_infer", str(model), "--_out", str(out_json)]
        if quick:
            argv.append("--quick")
        load = loadavg()
        r = run_timed(argv, OUT / "logs" / f"speed-infer{'-quick' if quick else ''}.log")
        if r["rc"] != 0:
            raise SystemExit(f"inference child failed:\n{tail(REPO / r['log'])}")
        res = json.loads(out_json.read_text())
    finally:
        out_json.unlink(missing_ok=True)
    res["process"] = r
    res["loadavg_before"] = load
    res["loadavg_after"] = loadavg()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny training and few repeats: checks the plumbing")
    ap.add_argument("--threads", help="OMP_NUM_THREADS for the measured processes (default: torch's own, 2 here)")
    ap.add_argument("--model", help="skip training; measure inference of this model directory")
    ap.add_argument("--_infer", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._infer:
        return infer_child(args._infer, args.quick, Path(args._out))

    if args.threads:
        ENV["OMP_NUM_THREADS"] = args.threads
    info = machine()
    info["threads_setting"] = args.threads or "default"
    info["busy_at_start"] = busy_processes()
    command = " ".join([".venv/bin/python -m benchmarks.speed", *(argv if argv is not None else sys.argv[1:])])
    out: dict[str, Any] = {"machine": info, "command": command}
    if args.model:
        model = Path(args.model)
    else:
        out["train"] = train_part(args.quick)
        model = REPO / out["train"]["model_dir"] / "current"
    out["inference"] = infer_part(model, args.quick)
    info["busy_at_end"] = busy_processes()
    path = write_json("speed" + ("-quick" if args.quick else ""), out)

    rows = []
    if "train" in out:
        t = out["train"]
        rows += [
            [f"fine-tune wall time ({t['n_train']} msgs + {t['n_val']} val, {t['epochs']} epochs, {t['max_length']} tok)",
             f"{t['process']['wall_s']:.0f} s (fine-tune {t['finetune_seconds']:.0f} s)", ""],
            ["seconds per optimizer step (batch 16, incl. validation share)", f"{t['seconds_per_step']:.2f} s", ""],
            ["peak RSS of mailtriage-train", f"{t['process']['peak_rss_mib']:.0f} MiB", ""],
        ]
    i = out["inference"]
    rows += [
        [f"classify, batch 1 (median of {i['batch1_repeats']}, {i['tokens_per_text']:.0f} tok)",
         f"{i['batch1_ms_median']} ms/email (p90 {i['batch1_ms_p90']})", ""],
        [f"classify, batch 16 (median of {i['batch16_repeats']})", f"{i['batch16_ms_per_email_median']} ms/email", ""],
        ["classifier RSS after load / peak", f"{i['rss_mib_after_load']:.0f} / {i['peak_rss_mib']:.0f} MiB", ""],
        ["mail_text per raw message (median)", f"{i['mail_text_ms_median']} ms", ""],
    ]
    print(md_table(["measurement", "value", "threads / load"],
                   [[a, b, f"{i['torch_threads']} thr, load {info['loadavg_start'][0]:.1f}"] for a, b, _ in rows]))
    print(f"   command: {command}   JSON: {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
