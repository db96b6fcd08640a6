"""Load time and peak memory of the CPU default: the ONNX graph saved with the version vs exported at load.

1. Trains (or reuses with ``--model``) a MiniLM version on the demo history with the real
   ``mailtriage-train`` (which measures int8 against fp32 on the holdout and saves ``model.int8.onnx``).
2. In a fresh child process per load (so peak RSS is that load's own), ``repeat`` times each:
   - torch fp32 (``runtime = "torch"``, ``quantize = "none"``): the reference;
   - onnxruntime int8, export at load: a copy of the version without its saved graph (what every load
     did before the graph was saved; this load now also saves it, included in the time);
   - onnxruntime int8, saved graph: the version as the trainer left it (the load must log
     ``onnx_graph_loaded`` and no export, else the row is refused);
   - what ``runtime = quantize = "auto"`` picks for the version, from its saved graph.
   Each row: seconds inside ``load_classifier``, the child's peak RSS (VmHWM) and its RSS after the
   load, and whether its predictions on 64 demo mails equal the export's.
   The 1-minute load average before and after each child is recorded: the machine may be shared.

    .venv/bin/python -m benchmarks.onnx_load [--model MODEL_DIR] [--epochs N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, REPO, loadavg, machine, md_table, rel, run_timed, tail, train_demo, write_json

# (case name, runtime, quantize, keep the saved graph)
CASES = [("torch fp32", "torch", "none", True), ("onnxruntime int8, export at load", "onnxruntime", "int8", False),
         ("onnxruntime int8, saved graph", "onnxruntime", "int8", True), ("auto (the default)", "auto", "auto", True)]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(version: str, runtime: str, quantize: str, out_json: Path) -> int:
    from structlog.testing import capture_logs

    from benchmarks.cpu_speed import _demo_inbox
    from mailtriage.model.transformers import load_classifier

    texts = _demo_inbox(quick=True)[0][:64]
    before = _rss_mib("VmRSS")  # after the imports: what the process holds before any model
    started = time.monotonic()
    with capture_logs() as logs:
        clf = load_classifier(version, device="cpu", batch_size=16, max_length=256, runtime=runtime, quantize=quantize)
    seconds = time.monotonic() - started
    loaded = next(e for e in logs if e["event"] == "model_loaded")
    result = {
        "load_s": round(seconds, 2),
        "rss_before_load_mib": round(before, 1),
        "peak_rss_mib": round(_rss_mib("VmHWM"), 1),
        "rss_after_load_mib": round(_rss_mib("VmRSS"), 1),
        "served": f"{loaded['runtime']} {loaded['quantize']}",
        "events": [e["event"] for e in logs if e["event"].startswith("onnx_graph_")],
        "predictions": [p.label for p in clf.classify(texts)],
    }
    out_json.write_text(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.onnx_load", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="skip training; measure this model directory or version")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the demo fine-tune (default 1: only loading is measured)")
    ap.add_argument("--repeat", type=int, default=2, help="loads per case (default 2)")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        version, runtime, quantize, out = args._child
        return child(version, runtime, quantize, Path(out))

    from mailtriage.model import modeldir
    from mailtriage.model.onnxrt import GRAPH_FILES

    command = " ".join([".venv/bin/python -m benchmarks.onnx_load", *(argv if argv is not None else sys.argv[1:])])
    out: dict[str, Any] = {"machine": machine(), "command": command, "rows": []}
    if args.model:
        version = modeldir.resolve(Path(args.model))
    else:
        t = train_demo(OUT / "models" / "onnx-load", per_category=8, epochs=args.epochs, max_length=256,
                       log_name="onnx-load-train")
        out["train"] = {"command": t["command"], "wall_s": t["process"]["wall_s"]}
        version = modeldir.resolve(OUT / "models" / "onnx-load")
    out["serving"] = json.loads((version / modeldir.MANIFEST_FILE).read_text()).get("serving")
    if not (version / GRAPH_FILES["int8"]).is_file():
        raise SystemExit(f"{version} has no saved {GRAPH_FILES['int8']}: train it with this mailtriage-train")
    work = Path(tempfile.mkdtemp(prefix="mt-bench-onnx-load-"))
    try:
        bare = work / version.name
        shutil.copytree(version, bare)
        for name in GRAPH_FILES.values():
            (bare / name).unlink(missing_ok=True)
            (bare / (name + ".json")).unlink(missing_ok=True)
        reference: list[str] | None = None
        for name, runtime, quantize, keep in CASES:
            for i in range(args.repeat):
                if not keep:  # every export-at-load row starts from a version without a saved graph
                    for graph in GRAPH_FILES.values():
                        (bare / graph).unlink(missing_ok=True)
                        (bare / (graph + ".json")).unlink(missing_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".json")
                os.close(fd)
                argv_c = [sys.executable, "-m", "benchmarks.onnx_load", "--_child",
                          str(version if keep else bare), runtime, quantize, tmp]
                load = loadavg()
                r = run_timed(argv_c, OUT / "logs" / f"onnx-load-{runtime}-{quantize}-{int(keep)}-{i}.log")
                if r["rc"] != 0:
                    raise SystemExit(f"{name} failed:\n{tail(REPO / r['log'])}")
                res = json.loads(Path(tmp).read_text())
                Path(tmp).unlink()
                if name.endswith("saved graph") and res["events"] != ["onnx_graph_loaded"]:
                    raise SystemExit(f"{name}: expected the saved graph to be read, got events {res['events']}")
                if name.endswith("export at load") and "onnx_graph_exported" not in res["events"]:
                    raise SystemExit(f"{name}: expected an export, got events {res['events']}")
                if name.endswith("export at load"):
                    reference = res["predictions"]
                res.update(case=name, loadavg_before=load, loadavg_after=loadavg())
                out["rows"].append(res)
        for res in out["rows"]:
            res["same_predictions_as_export"] = (res["predictions"] == reference) if reference else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_json("onnx-load", out)
    rows = [[r["case"], r["served"], r["load_s"], f"{r['peak_rss_mib']:.0f}", f"{r['rss_after_load_mib']:.0f}",
             f"{r['rss_before_load_mib']:.0f}", ", ".join(e.removeprefix("onnx_graph_") for e in r["events"]) or "-",
             "yes" if r["same_predictions_as_export"] else "no",
             f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}"] for r in out["rows"]]
    print(f"version {version.name}; serving block: {json.dumps(out['serving'])}")
    print(md_table(["load", "served", "load s", "peak RSS MiB", "RSS after load MiB", "RSS before load MiB",
                    "graph events", "predictions = export's", "load avg before/after"], rows))
    print(f"   command: {command}   JSON: {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
