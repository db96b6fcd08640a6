"""What the SMTP content filter needs around it, checked by `mailtriage check`: its listen address
free (or already served by mailtriage), and a next hop that answers EHLO and accepts a recipient.
Only `check` runs these (serve meets the same facts when it binds and relays), so they live here.

Each function returns findings (imap/preflight.py's ``Finding``) and never raises. The next-hop
probe sends MAIL FROM:<> and one RCPT, then RSET and QUIT: it never sends DATA, so no mail is
ever delivered by a check. The fixes name the Postfix settings of docs/postfix/, the recipe the
README shows and tests/test_postfix.py applies.
"""

from __future__ import annotations

import errno
import smtplib
import socket

from mailtriage.config import SmtpConfig
from mailtriage.imap.preflight import FAIL, OK, WARN, Finding
from mailtriage.smtp.nexthop import reply_text

# What our filter says in its 220 greeting (relay.py's aiosmtpd ident): tells "mailtriage serve is
# already running" from another program holding the port.
OUR_GREETING = "mailtriage content filter"
PROBE_TIMEOUT = 10.0  # seconds per step of the probe: an answer slower than this is itself a finding
DEFAULT_RECIPIENT = "postmaster"  # RFC 5321 §4.5.1: every SMTP server must accept it, unqualified


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _greeting(host: str, port: int, timeout: float) -> str | None:
    """The first reply line of whatever listens on host:port, or None when it says nothing."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data and len(data) < 1024:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return reply_text(data.split(b"\n", 1)[0]) if data else None


def listen(smtp: SmtpConfig, timeout: float = PROBE_TIMEOUT) -> Finding:
    """[smtp] listen address: free to bind, or held by a running mailtriage that answers SMTP."""
    host, port = smtp.listen_host, smtp.listen_port
    subject = f"smtp listen {host}:{port}"
    fix = ("pick a free [smtp] listen_port and the same port in Postfix's content_filter "
           "(docs/postfix/main.cf: content_filter = mailtriage:[HOST]:PORT), then `postfix reload`")
    try:
        with socket.socket(_family(host)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return Finding(FAIL, subject, f"cannot listen: {exc.strerror or exc}", fix)
    else:
        return Finding(OK, subject, f"free to listen on; Postfix: content_filter = mailtriage:[{host}]:{port} "
                       "(docs/postfix/main.cf)")
    greeting = _greeting(host, port, timeout)
    if greeting and greeting.startswith("220") and OUR_GREETING in greeting:
        return Finding(OK, subject, "in use by mailtriage's content filter (mailtriage serve is running?)")
    if greeting and greeting[:3].isdigit():
        return Finding(FAIL, subject, f"in use by another SMTP server, which greets {greeting!r}", fix)
    return Finding(FAIL, subject, "in use by something that does not greet like an SMTP server", fix)


def reinjection_hint(host: str, port: int) -> str:
    """How to give the filter its next hop in Postfix: the reinjection listener of docs/postfix/master.cf."""
    return (f"with Postfix: the reinjection listener {host}:{port} from docs/postfix/master.cf is missing: "
            f"add it to master.cf (the `{host}:{port} inet n - n - - smtpd` entry and its -o lines) and "
            "`postfix reload`; otherwise point [smtp] next_hop_host/next_hop_port at the MTA that delivers")


def next_hop(smtp: SmtpConfig, recipient: str = DEFAULT_RECIPIENT, timeout: float = PROBE_TIMEOUT) -> list[Finding]:
    """The next hop answers EHLO with 250 and accepts MAIL FROM:<> and RCPT TO:<recipient>.

    Never sends DATA: after RCPT the transaction is reset (RSET) and the session ended (QUIT)."""
    host, port = smtp.next_hop_host, smtp.next_hop_port
    subject = f"smtp next hop {host}:{port}"
    if (host, port) == (smtp.listen_host, smtp.listen_port):
        return [Finding(FAIL, subject, "is [smtp]'s own listen address: every message would loop back into mailtriage",
                        "set next_hop_port to the MTA's reinjection listener (127.0.0.1:10026 in docs/postfix/master.cf)")]
    try:
        client = smtplib.SMTP(timeout=timeout)
        code, banner = client.connect(host, port)
    except ConnectionRefusedError:
        return [Finding(FAIL, subject, "connection refused: nothing listens there", reinjection_hint(host, port))]
    except (TimeoutError, socket.timeout):
        return [Finding(FAIL, subject, f"no answer within {timeout:g} s (a firewall, or a wedged MTA)",
                        "check that the MTA runs and that this host may reach it")]
    except smtplib.SMTPServerDisconnected as exc:
        return [Finding(FAIL, subject, f"closed the connection before greeting ({exc})",
                        "check the MTA's log: it may refuse this client")]
    except OSError as exc:
        return [Finding(FAIL, subject, f"cannot connect: {exc.strerror or exc}",
                        "check next_hop_host (a name that resolves, or an address) and next_hop_port")]
    out: list[Finding] = []
    try:
        if code != 220:
            return [Finding(FAIL, subject, f"greeted with {code} {reply_text(banner)}", "check the MTA's log")]
        code, text = client.ehlo()
        if code != 250:
            return [Finding(FAIL, subject, f"answered EHLO with {code} {reply_text(text)}",
                            "the relay needs ESMTP (8BITMIME, SMTPUTF8, SIZE): use an MTA that answers EHLO")]
        missing = [ext for ext in ("8bitmime", "smtputf8") if not client.has_extn(ext)]
        note = f"; lacks {', '.join(e.upper() for e in missing)}: such mail is deferred (451)" if missing else ""
        first_line = reply_text(text.split(b"\n", 1)[0])
        out.append(Finding(WARN if missing else OK, f"{subject} EHLO", f"250 ({first_line}){note}",
                           "use an MTA with 8BITMIME and SMTPUTF8 (Postfix has both)" if missing else ""))
        code, text = client.mail("")
        if code != 250:
            out.append(Finding(FAIL, f"{subject} MAIL FROM:<>", f"refused: {code} {reply_text(text)}",
                               "the next hop must accept the null sender (bounces) from mailtriage"))
            return out
        code, text = client.rcpt(recipient)
        where = f"{subject} RCPT TO:<{recipient}>"
        if code in (250, 251):
            out.append(Finding(OK, where, f"accepted ({code} {reply_text(text)}); no DATA sent"))
        else:
            rcpt_fix = ("with Postfix: the reinjection listener must accept mail from mailtriage "
                        "(docs/postfix/master.cf: -o smtpd_recipient_restrictions=permit_mynetworks,reject "
                        "-o mynetworks=127.0.0.0/8), then `postfix reload`; or check with --rcpt ADDRESS "
                        "for an address it delivers")
            out.append(Finding(FAIL if code >= 500 else WARN, where, f"refused: {code} {reply_text(text)}", rcpt_fix))
        return out
    except (smtplib.SMTPException, OSError) as exc:
        out.append(Finding(FAIL, subject, f"the session failed: {type(exc).__name__}: {exc}",
                           "check the MTA's log"))
        return out
    finally:
        try:
            client.rset()
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()
