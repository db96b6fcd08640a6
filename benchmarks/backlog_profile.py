"""Where an IMAP backlog's time goes outside the model: the filing loop under cProfile, in one process.

A real throwaway Dovecot holds N real-length messages (20 Newsgroups, as ``benchmarks.daemon``);
one ``MailboxWatcher`` files them with the daemon's model loaded in this process (the default
``[model]`` settings, or ``--runtime`` / ``--quantize``). Its thread is profiled with cProfile; the
classify call runs on a helper thread (as in the daemon, while the watcher fetches the next batch),
so the watcher's profile shows what the backlog costs besides the model, and the helper's time is
summed apart. Prints the wall time, the model's seconds, the top functions of the watcher's thread
by own time, and time per IMAP command.

    .venv/bin/python -m benchmarks.backlog_profile [--backlog 300] [--runtime R] [--quantize Q]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, loadavg, md_table


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backlog_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=300)
    ap.add_argument("--runtime", choices=["torch", "onnxruntime"])
    ap.add_argument("--quantize", choices=["none", "int8"])
    ap.add_argument("--model", help="model directory (default: benchmarks.daemon's 20 Newsgroups model)")
    args = ap.parse_args(argv)
    import logging

    import structlog

    # The daemon writes one JSON line per message; rendering 300 console lines here would be noise.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    from benchmarks.daemon import UNSURE, news_backlog, news_categories, news_model
    from mailtriage.config import AccountConfig, Config, ModelConfig
    from mailtriage.imap.watcher import MailboxWatcher
    from mailtriage.model import backend
    from mailtriage.store.state import StateDB
    from mailtriage.testing.dovecot import Dovecot, load_messages

    version, note = news_model(args.model)
    categories = news_categories()
    work = Path(tempfile.mkdtemp(prefix="mt-bench-profile-"))
    settings = {k: v for k, v in (("runtime", args.runtime), ("quantize", args.quantize)) if v}
    try:
        config = Config(categories=categories, unsure_folder=UNSURE, state_path=str(work / "state.sqlite3"),
                        model=ModelConfig(path=str(version), **settings))  # type: ignore[arg-type]
        clf = backend.load(config, version)
        model_s = [0.0]

        def classify(texts: Sequence[str]) -> tuple[list[Any], str]:
            t = time.perf_counter()
            try:
                return clf.classify(texts), clf.version
            finally:
                model_s[0] += time.perf_counter() - t

        files, _answers = news_backlog(work / "corpus", args.backlog)
        (work / "pw").write_text("secret")
        (work / "pw").chmod(0o600)
        with Dovecot() as dovecot:
            with dovecot.client("support") as c:
                for folder in [*categories.values(), UNSURE]:
                    c.create_folder(folder)
                load_messages(c, "INBOX", files)
            account = AccountConfig(name="bench", host="127.0.0.1", port=dovecot.port, tls="none",
                                    username="support", password_file=str(work / "pw"))
            watcher = MailboxWatcher(account, "INBOX", config, StateDB(config.state_path), classify)
            watcher.connect()
            assert watcher.client is not None
            imap: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            for verb in ("fetch", "move", "folder_status", "search", "select_folder", "add_flags", "uid_expunge"):
                real = getattr(watcher.client, verb)

                def timed(*a: Any, _real: Any = real, _verb: str = verb, **kw: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return _real(*a, **kw)
                    finally:
                        if threading.current_thread() is threading.main_thread():
                            imap[_verb][0] += 1
                            imap[_verb][1] += time.perf_counter() - t

                setattr(watcher.client, verb, timed)
            load = loadavg()
            profile = cProfile.Profile()
            t = time.perf_counter()
            profile.enable()
            done = watcher.process_backlog()
            profile.disable()
            wall = time.perf_counter() - t
            watcher.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats = io.StringIO()
    pstats.Stats(profile, stream=stats).sort_stats("tottime").print_stats(25)
    OUT.mkdir(exist_ok=True)
    (OUT / "backlog-profile.txt").write_text(stats.getvalue())
    print(f"model: {note}; settings: {settings or 'default [model]'}; load {load[0]:.1f} -> {loadavg()[0]:.1f}")
    print(f"{done} messages in {wall:.1f} s = {done / wall:.1f} msg/s; model {model_s[0]:.1f} s "
          f"({model_s[0] / wall:.0%} of the wall time)")
    print(md_table(["IMAP command (watcher thread)", "calls", "seconds", "ms/call"],
                   [[v, n, f"{s:.2f}", f"{1000 * s / n:.1f}"] for v, (n, s) in sorted(imap.items(), key=lambda x: -x[1][1])]))
    print("\n".join(stats.getvalue().splitlines()[:45]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
