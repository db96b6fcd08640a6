"""The product demo, end to end on this machine: `make demo` (or `python -m demo.run`).

1. generates a realistic support mailbox: folder-sorted history in ~15 categories plus an
   unsorted INBOX (demo/corpus.py);
2. starts a throwaway Dovecot on 127.0.0.1 and loads both into it;
3. trains an adapter on the offline all-MiniLM-L6-v2 base from the IMAP category folders
   (`mailtriage-train`, exactly as the weekly retrain does);
4. checks the setup (`mailtriage check`), runs the daemon (`mailtriage serve`) until it has filed the inbox, then stops it with SIGTERM;
5. scores where each inbox message landed against the generator's answer key and prints the
   evaluation report and `mailtriage stats`;
6. prints the web console's URL; with --console (`make demo CONSOLE=1`) runs the daemon again with
   the console and leaves it running until Ctrl-C.
Everything lives under ./demo-run/ and is thrown away by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from imapclient import IMAPClient

from demo.corpus import CATEGORIES, generate
from mailtriage.store.corrections import folder_keys
from mailtriage.core.mailtext import message_key
from mailtriage.testing.dovecot import Dovecot, load_messages
from mailtriage.testing.imapserver import free_port
from mailtriage.web.auth import write_password

UNSURE = "Support/Unsure"


def _step(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m" if sys.stdout.isatty() else f"\n==> {msg}", flush=True)


CONSOLE_USER, CONSOLE_PASSWORD = "demo", "demo"


def _write_config(run: Path, port: int, epochs: int, web_port: int) -> Path:
    write_password(run / "console.passwd", CONSOLE_USER, CONSOLE_PASSWORD)
    (run / "imap-password").write_text("secret\n")
    (run / "imap-password").chmod(0o600)  # `mailtriage check` fails a world-readable secret
    cats = "\n".join(f'{label} = "{folder}"' for label, folder in CATEGORIES.items())
    cfg = run / "config.toml"
    cfg.write_text(
        f"""# Written by demo/run.py; see config.example.toml for every key.
unsure_folder = "{UNSURE}"
state_path = "{run}/state.sqlite3"
correction_scan_interval = 60

[categories]
{cats}

[model]
path = "{run}/models/current"
threshold = 0.5
# Support mail says what it is about early; 128 tokens keeps the CPU demo to a few minutes.
max_length = 128

[[accounts]]
name = "demo"
host = "127.0.0.1"
port = {port}
tls = "none"
username = "support"
password_file = "{run}/imap-password"
mailboxes = ["INBOX"]
action = "move"
idle_timeout = 300

[training]
base_model = "all-MiniLM-L6-v2"
model_dir = "{run}/models"
schedule = ""
epochs = {epochs}
min_examples_per_class = 10

[web]
# The console runs inside `mailtriage serve`; the demo mailbox is a throwaway, so actions are on.
enabled = true
listen_port = {web_port}
password_file = "{run}/console.passwd"
allow_actions = true
"""
    )
    return cfg


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _wait_until_filed(dovecot: Dovecot, expected: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with dovecot.client("support") as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited early with status {proc.returncode}; see its log above")
            left = client.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"]
            print(f"\r   INBOX: {left:4d} of {expected} left", end="", flush=True)
            if left == 0:
                print()
                return
            time.sleep(1)
    raise SystemExit(f"the daemon did not file the inbox within {timeout:.0f} s")


def landed(client: IMAPClient, folders: Sequence[str]) -> dict[str, str]:
    """message key -> the folder it is in now (the correction scan's reader: header-only fetches)."""
    return {key: folder for folder in folders for key in folder_keys(client, folder)[1].values()}


def _score(dovecot: Dovecot, answers: dict[str, str]) -> None:
    """Where did each inbox message land? Compare with the generator's answer key by Message-ID."""
    folder_to_label = {folder: label for label, folder in CATEGORIES.items()}
    with dovecot.client("support") as client:
        where = landed(client, [*CATEGORIES.values(), UNSURE])
    correct = unsure = wrong = 0
    confusions: Counter[tuple[str, str]] = Counter()
    for mid, truth in answers.items():
        folder = where.get(mid)
        if folder == UNSURE:
            unsure += 1
        elif folder_to_label.get(folder or "") == truth:
            correct += 1
        else:
            wrong += 1
            confusions[(truth, folder_to_label.get(folder or "", "missing"))] += 1
    filed = correct + wrong
    print(f"   inbox messages:       {len(answers)}")
    print(f"   filed automatically:  {filed} ({filed / len(answers):.0%})")
    print(f"   filed correctly:      {correct} ({correct / max(filed, 1):.1%} of filed)")
    print(f"   sent to {UNSURE}: {unsure} (a person sorts these; each becomes training data)")
    if confusions:
        top = ", ".join(f"{t} -> {p} ({n})" for (t, p), n in confusions.most_common(5))
        print(f"   most common mistakes: {top}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="demo-run", help="working directory (wiped first)")
    ap.add_argument("--per-category", type=int, default=60, help="history messages per category")
    ap.add_argument("--inbox", type=int, default=150, help="unsorted messages in INBOX")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--console", action="store_true",
                    help="at the end, run the daemon with the web console until Ctrl-C (default: exit)")
    ap.add_argument("--console-port", type=int, default=0, help="the console's port (default: 8025 if free)")
    args = ap.parse_args(argv)

    run = Path(args.dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    _step(f"Generating a support mailbox: {len(CATEGORIES)} categories x {args.per_category} sorted + {args.inbox} new")
    generate(run / "corpus", per_category=args.per_category, inbox=args.inbox, seed=7)
    answers_by_file = json.loads((run / "corpus" / "inbox_labels.json").read_text())

    _step("Starting a throwaway Dovecot on 127.0.0.1")
    with Dovecot(root=run / "dovecot") as dovecot:
        print(f"   listening on {dovecot.host}:{dovecot.port}")
        inbox_files = sorted((run / "corpus" / "inbox").glob("*.eml"))
        with dovecot.client("support") as client:
            counts = {
                folder: len(load_messages(client, folder, run / "corpus" / "history" / label))
                for label, folder in CATEGORIES.items()
            }
            client.create_folder(UNSURE)
            load_messages(client, "INBOX", inbox_files)
        print(f"   loaded {sum(counts.values())} sorted messages into {len(counts)} folders, {len(inbox_files)} into INBOX")
        answers = {message_key(p.read_bytes()): answers_by_file[p.name] for p in inbox_files}
        web_port = args.console_port or (8025 if _port_free(8025) else free_port())
        url = f"http://127.0.0.1:{web_port}/"
        cfg = _write_config(run, dovecot.port, args.epochs, web_port)

        _step("Training an adapter from the IMAP category folders (mailtriage-train)")
        t0 = time.monotonic()
        rc = subprocess.call([_bin("mailtriage-train"), "--config", str(cfg)], env=env)
        if rc != 0:
            print(f"mailtriage-train failed with status {rc}", file=sys.stderr)
            return rc
        print(f"   trained in {time.monotonic() - t0:.0f} s")

        _step("mailtriage check: server, capabilities, folders, model")
        if subprocess.call([_bin("mailtriage"), "check", "--config", str(cfg)], env=env) != 0:
            print("mailtriage check found a problem (see above)", file=sys.stderr)
            return 1

        _step("Running the daemon (mailtriage serve) until the inbox is filed")
        t0 = time.monotonic()
        log = (run / "serve.log").open("wb")
        proc = subprocess.Popen([_bin("mailtriage"), "serve", "--config", str(cfg)], env=env, stderr=log, stdout=log)
        try:
            _wait_until_filed(dovecot, len(inbox_files), proc, timeout=600)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"   filed {len(inbox_files)} messages in {time.monotonic() - t0:.0f} s (daemon log: {run / 'serve.log'})")

        _step("How did it do on the new mail?")
        _score(dovecot, answers)

        _step("mailtriage stats")
        subprocess.call([_bin("mailtriage"), "stats", "--config", str(cfg)], env=env)

        report = run / "models" / "current" / "report.md"
        _step(f"Evaluation report: {report}  (confusion matrix: {report.parent / 'confusion.png'})")
        if report.exists():
            print(report.read_text())

        login = f"user {CONSOLE_USER!r}, password {CONSOLE_PASSWORD!r}"
        if not args.console:
            _step(f"Web console: {url} ({login}); not left running: `make demo CONSOLE=1` (or --console) keeps it up")
            return 0
        _step(f"Web console: {url} ({login}); the daemon keeps running with it. Ctrl-C stops both")
        proc = subprocess.Popen([_bin("mailtriage"), "serve", "--config", str(cfg)], env=env,
                                stderr=(run / "serve-console.log").open("wb"), stdout=subprocess.DEVNULL)
        print(f"   console: {url}  (daemon log: {run / 'serve-console.log'})", flush=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            return 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
