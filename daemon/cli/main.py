"""`mailtriage` command line: serve, classify, explain, check, stats, web, auth, learn, text.

Heavy imports (torch, imapclient) happen inside the subcommand that needs them, so
`mailtriage text` and `--help` start instantly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailtriage.config import DEVICES, Config, ModelConfig, load_config
from mailtriage.errors import ConfigError, MailtriageError
from mailtriage.cli.logs import configure_logging

if TYPE_CHECKING:
    from mailtriage.core.classifier import Classifier
    from mailtriage.core.explain import Explanation

DEFAULT_CONFIG = "/etc/mailtriage/config.toml"


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("MAILTRIAGE_CONFIG") or DEFAULT_CONFIG


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _load_optional(args: argparse.Namespace) -> Config | None:
    """The config when one was named (or the default exists); commands that can run without one use this."""
    path = _config_path(args)
    if args.config or os.environ.get("MAILTRIAGE_CONFIG") or Path(path).exists():
        return load_config(path)
    return None


def cmd_text(args: argparse.Namespace) -> int:
    from mailtriage.core.mailtext import mail_text

    for name in args.files or ["-"]:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        if len(args.files) > 1:
            print(f"==> {name} <==")
        print(mail_text(raw))
    return 0


def _classifier(args: argparse.Namespace, cfg: Config | None) -> Classifier:
    """The model ``classify`` and ``explain`` use: ``--model`` (or the config's model.path), or the
    config's inference server."""
    model_path = args.model or (cfg.model.path if cfg else None)
    if not model_path:
        raise ConfigError("no model given: pass --model PATH (a model directory) or --config with model.path")
    if cfg is not None and cfg.model.backend == "http" and not args.model:
        from mailtriage.model import backend

        return backend.load(cfg, probe=False)
    from mailtriage.model.transformers import load_classifier

    return load_classifier(
        model_path,
        device=args.device or (cfg.model.device if cfg else "auto"),
        batch_size=(cfg.model if cfg else ModelConfig()).batch_size,
        max_length=cfg.model.max_length if cfg else 256,
        expected_labels=cfg.labels if cfg else None,
        quantize=cfg.model.quantize if cfg else "auto",
        threads=cfg.model.threads if cfg else 0,
        runtime=cfg.model.runtime if cfg else "auto",
        compile=cfg.model.compile if cfg else False,
    )


def _explained(classifier: Classifier, texts: Sequence[str], threshold: float) -> list[Explanation]:
    from mailtriage.core import explain
    from mailtriage.core.classifier import classify_explained
    from mailtriage.core.routing import is_unsure

    return [explain.explain(p.evidence, p.label, p.confidence, p.scores, threshold, is_unsure(p.confidence, threshold),
                            classifier.version)
            for p in classify_explained(classifier, texts)]


def cmd_classify(args: argparse.Namespace) -> int:
    from mailtriage.core.mailtext import mail_text
    from mailtriage.core.routing import is_unsure

    cfg = _load_optional(args)
    threshold = args.threshold if args.threshold is not None else (cfg.model.threshold if cfg else 0.6)
    classifier = _classifier(args, cfg)
    names = args.files or ["-"]
    batch = 64  # bounded memory for thousands of files; the classifier batches again internally
    for start in range(0, len(names), batch):
        chunk = names[start : start + batch]
        texts = [mail_text(sys.stdin.buffer.read() if n == "-" else Path(n).read_bytes()) for n in chunk]
        if args.explain:
            for name, why in zip(chunk, _explained(classifier, texts, threshold), strict=True):
                row = {"file": name, "label": why.label, "confidence": round(why.confidence, 4), "unsure": why.unsure,
                       "explanation": why.to_dict()}
                print(json.dumps(row, ensure_ascii=False), flush=True)
            continue
        for name, pred in zip(chunk, classifier.classify(texts), strict=True):
            row = {
                "file": name,
                "label": pred.label,
                "confidence": round(pred.confidence, 4),
                "unsure": is_unsure(pred.confidence, threshold),
            }
            print(json.dumps(row), flush=True)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Why a raw message would be filed where it would: the explanation the daemon stores, as text."""
    from mailtriage.core import explain
    from mailtriage.core.mailtext import mail_text

    cfg = _load_optional(args)
    threshold = args.threshold if args.threshold is not None else (cfg.model.threshold if cfg else 0.6)
    raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    (why,) = _explained(_classifier(args, cfg), [mail_text(raw)], threshold)
    if args.json:
        print(why.to_json())
    else:
        print("\n".join(explain.render(why)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mailtriage.service.app import serve

    cfg = _load(args)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, accounts=tuple(dataclasses.replace(a, dry_run=True) for a in cfg.accounts))
    return serve(cfg, _config_path(args))


def cmd_check(args: argparse.Namespace) -> int:
    from mailtriage.cli.check import run_check

    return run_check(_load(args), create_folders=args.create_folders, rcpt=args.rcpt)


def cmd_stats(args: argparse.Namespace) -> int:
    from mailtriage.store.stats import print_stats

    return print_stats(_load(args), window_days=args.days, as_json=args.json)


def cmd_web(args: argparse.Namespace) -> int:
    """The web console on its own (``[web] enabled = true`` runs it inside `serve` instead), or
    ``--hash-password FILE``: add a user to the console's password file."""
    if args.hash_password:
        import getpass

        from mailtriage.web.auth import write_password

        if sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.user}: ")
            if getpass.getpass("again: ") != password:
                raise ConfigError("the two passwords differ; nothing written")
        else:
            password = sys.stdin.readline().rstrip("\r\n")  # scripts: the password on one line of stdin
        write_password(args.hash_password, args.user, password)
        print(f"{args.hash_password}: user {args.user!r} set (scrypt); point [web] password_file at it")
        return 0
    import asyncio

    from mailtriage.web.server import console_url, run_console

    cfg = _load(args)
    web = dataclasses.replace(cfg.web, listen_host=args.host or cfg.web.listen_host,
                              listen_port=args.port or cfg.web.listen_port)
    cfg = dataclasses.replace(cfg, web=web)
    if not web.password_file and not web.trusted_user_header:
        raise ConfigError("nobody could sign in to the console: set [web] password_file (write it with "
                          "`mailtriage web --hash-password FILE`) or [web] trusted_user_header")
    print(f"console: {console_url(cfg)} ({'actions allowed' if web.allow_actions else 'read-only'})", flush=True)

    async def until_signalled() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # systemd's stop and Ctrl-C: finish open requests, exit 0
            loop.add_signal_handler(sig, stop.set)
        await run_console(cfg, stop=stop)

    asyncio.run(until_signalled())
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    """Sign an account in once (OAuth2) and store its refresh token for the daemon."""
    from mailtriage.imap import oauth

    cfg = _load(args)
    matches = [a for a in cfg.accounts if a.name == args.account]
    if not matches:
        raise ConfigError(f"no [[accounts]] entry named {args.account!r}; configured: {[a.name for a in cfg.accounts]}")
    account = matches[0]
    if not account.oauth_provider:
        raise ConfigError(
            f"accounts[{account.name!r}] has no oauth_provider: set auth = \"xoauth2\", oauth_provider = "
            "\"microsoft\" or \"google\" and oauth_client_id, then run `mailtriage auth` again"
        )
    loopback = args.loopback or oauth.provider_for(account).device_url is None
    if loopback:
        data = oauth.loopback_flow(account, sys.stdout, port=args.port)
    else:
        data = oauth.device_flow(account, sys.stdout)
    print(f"signed in: refresh token stored in {account.oauth_token_store} (mode 0600); "
          f"access token valid for {int(data['expires_at'] - time.time())} s and refreshed automatically")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    """Called by the Dovecot IMAPSieve hook with the message on stdin: record a correction now."""
    from mailtriage.store.corrections import learn_moved
    from mailtriage.store.state import StateDB

    cfg = _load(args)
    for flag, value in (("--account", args.account), ("--user", args.user)):
        if value is not None and not value.strip():
            # An empty imap.user in the sieve script must not silently mean "the only account".
            raise ConfigError(
                f"mailtriage learn: {flag} is empty; expected the [[accounts]] name (--account) or the IMAP "
                "login (--user, the sieve script's imap.user). Check the hook passes it, or leave the flag out"
            )
    if args.account is not None:
        matches = [a for a in cfg.accounts if a.name == args.account]
    elif args.user is not None:
        matches = [a for a in cfg.accounts if a.username == args.user]
    else:
        matches = list(cfg.accounts) if len(cfg.accounts) == 1 else []
    if len(matches) != 1:
        raise ConfigError(
            f"mailtriage learn: cannot tell which [[accounts]] entry this is (--account {args.account!r}, "
            f"--user {args.user!r}; configured: {[a.name for a in cfg.accounts]}); pass --account NAME "
            "or --user with the IMAP login (the sieve script's imap.user)"
        )
    raw = sys.stdin.buffer.read()
    corr = learn_moved(StateDB(cfg.state_path), cfg, matches[0], args.mailbox, raw)
    if corr is not None and args.verbose:
        print(json.dumps(dataclasses.asdict(corr)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    def common_options(defaults: bool) -> argparse.ArgumentParser:
        # The subcommands take the options too, but without defaults: a default there would
        # overwrite `mailtriage --config X learn` (argparse applies the subparser's defaults last).
        common = argparse.ArgumentParser(add_help=False)
        keep = {} if defaults else {"default": argparse.SUPPRESS}
        common.add_argument("--config", metavar="FILE", help=f"TOML config (default: $MAILTRIAGE_CONFIG or {DEFAULT_CONFIG})",
                            **keep)
        common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                            **(keep or {"default": "info"}))
        return common

    common = common_options(defaults=False)
    parser = argparse.ArgumentParser(
        prog="mailtriage",
        description="File every new support email into its category with a small fine-tuned model.",
        parents=[common_options(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the daemon (IMAP watcher and/or SMTP filter)")
    p.add_argument("--dry-run", action="store_true", help="shadow mode: record decisions, touch no mail")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("classify", parents=[common], help="classify raw messages; one JSON line each")
    p.add_argument("--model", metavar="PATH", help="model directory (MODEL_DIR, MODEL_DIR/current or a version)")
    p.add_argument("--threshold", type=float, help="confidence below which a message is 'unsure'")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("files", nargs="*", metavar="FILE", help="raw RFC 822 files (default: one message on stdin)")
    p.add_argument("--explain", action="store_true",
                   help="add each message's explanation (top labels, deciding part, TF-IDF words) to its line")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("explain", parents=[common], help="why a raw message would be filed where it would")
    p.add_argument("--model", metavar="PATH", help="model directory (MODEL_DIR, MODEL_DIR/current or a version)")
    p.add_argument("--threshold", type=float, help="confidence below which a message is 'unsure'")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="the explanation as stored in the state database (JSON)")
    p.add_argument("file", metavar="FILE", help="a raw RFC 822 file ('-': stdin)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", parents=[common], help="validate config, server, folders and model")
    p.add_argument("--create-folders", action="store_true", help="create missing category/unsure folders")
    p.add_argument("--rcpt", default="postmaster", metavar="ADDRESS",
                   help="address the [smtp] next hop is asked to accept (RCPT only, no mail sent; default postmaster)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", parents=[common], help="decisions, corrections and live accuracy")
    p.add_argument("--days", type=int, default=30, help="window in days (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("web", parents=[common], help="the web console for the support lead ([web] in the config)")
    p.add_argument("--host", help="address to listen on (default: web.listen_host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: web.listen_port)")
    p.add_argument("--hash-password", metavar="FILE",
                   help="add or replace --user's line in the console's password file (asks twice on a terminal, "
                        "else reads one line of stdin), then exit")
    p.add_argument("--user", default="admin", help="user name for --hash-password (default admin)")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("auth", parents=[common], help="sign an IMAP account in with OAuth2 (Microsoft 365, Gmail)")
    p.add_argument("account", help="the [[accounts]] name")
    p.add_argument("--loopback", action="store_true",
                   help="browser sign-in via http://127.0.0.1:PORT instead of a device code (always for Google)")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.set_defaults(func=cmd_auth)

    p = sub.add_parser("learn", parents=[common],
                       help="record a correction for one message (on stdin) staff moved into MAILBOX (IMAPSieve hook)")
    p.add_argument("mailbox", help="the folder the message was copied or moved into")
    p.add_argument("cause", nargs="?", default="", help="IMAPSieve cause (COPY, APPEND, FLAG); informational")
    p.add_argument("--account", help="the [[accounts]] name (default: the only one)")
    p.add_argument("--user", help="match the account by its IMAP username instead (sieve: imap.user)")
    p.add_argument("--verbose", action="store_true", help="print the recorded correction as JSON")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("text", parents=[common], help="print the exact text the model sees for a raw message")
    p.add_argument("files", nargs="*", metavar="FILE", help="raw RFC 822 files (default: stdin)")
    p.set_defaults(func=cmd_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args))
    except MailtriageError as exc:
        print(f"mailtriage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"mailtriage {args.command}: error: {exc.filename}: no such file", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mailtriage text big.eml | head` is fine, not a crash
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
