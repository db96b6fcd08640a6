"""The console as an ASGI app (Starlette, Jinja2 templates, SVG charts made here): Overview,
Decisions, Queues and Models, behind a sign-in.

Security in one place: every page but the sign-in needs a session (or the trusted proxy header when
configured); every POST carries the session's CSRF token; sign-ins are rate limited per client; all
mail-derived text goes through Jinja's autoescape; oversized requests are refused before routing;
actions (filing, promote, roll back) are refused unless ``[web] allow_actions = true``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from mailtriage.config import AccountConfig, Config
from mailtriage.core import explain
from mailtriage.errors import ConfigError, MailtriageError
from mailtriage.store.state import StateDB
from mailtriage.web import auth, charts, models, queues, reports

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent
# A request line longer than this, or a body larger, is refused before any page code runs: no form
# here needs more, and a search term is capped at reports.MAX_TERM anyway.
MAX_URL = 4096
MAX_BODY = 16 * 1024
OVERVIEW_DAYS = 30
ACCURACY_WEEKS = 8
_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")


class Limits:
    """Pure ASGI middleware: refuse an oversized request (URL or body) with a plain message, and add
    the security headers to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if url > MAX_URL:
            await _plain(414, f"the request address is {url} bytes long; the console accepts at most {MAX_URL}: "
                              "search for a shorter term")(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await _plain(413, f"the form is {length.decode(errors='replace')} bytes; at most {MAX_BODY} are "
                              "accepted")(scope, receive, send)
            return
        received = 0

        async def bounded() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:  # chunked, no Content-Length: count as it comes
                raise _TooLarge()
            return message

        async def headed(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                            (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, bounded, headed)
        except _TooLarge:
            await _plain(413, f"the form is larger than {MAX_BODY} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def _plain(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text + "\n", status_code=status)


def _session_secret(config: Config) -> str:
    path = config.web.session_secret_file
    if not path:
        return secrets.token_urlsafe(32)
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"web.session_secret_file {path!r} cannot be read: {exc.strerror}; write 32+ random "
                          f"characters into it (e.g. `openssl rand -hex 32 > {path}; chmod 600 {path}`)") from exc
    if len(secret) < 32:
        raise ConfigError(f"web.session_secret_file {path!r} holds {len(secret)} characters; use at least 32 "
                          "random ones")
    return secret


class Console:
    """The pages and the state they share (config, state database, limiter, templates)."""

    def __init__(self, config: Config, state: StateDB, imap_factory: queues.ClientFactory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.web = config.web
        self.state = state
        self.imap_factory = imap_factory
        self.model_dir = Path(config.training.model_dir)
        self.users = auth.read_password_file(self.web.password_file) if self.web.password_file else {}
        self.limiter = auth.LoginLimiter(self.web.login_attempts, self.web.login_window, clock)
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["pct"] = lambda p: "-" if p is None else f"{p * 100:.1f}%"
        self.env.filters["replace_page"] = _with_page
        self.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"

    # ---- sessions and refusals ------------------------------------------------------------------

    def user(self, request: Request) -> str | None:
        header = self.web.trusted_user_header
        if header:
            value = request.headers.get(header)
            peer = request.client.host if request.client else None
            if value and auth.trusted_peer(peer, self.web.trusted_proxies):
                request.session.setdefault("csrf", auth.new_csrf_token())
                return value[:64]
        user = request.session.get("user")
        if user and request.session.get("until", 0) > time.time():
            return str(user)
        return None

    def client_address(self, request: Request) -> str:
        """Who is signing in, for the rate limit: the TCP peer, or behind a trusted reverse proxy the
        address it put last into X-Forwarded-For (the one it saw itself; earlier ones the client wrote)."""
        peer = request.client.host if request.client else "unknown"
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded and auth.trusted_peer(peer, self.web.trusted_proxies):
            return forwarded.split(",")[-1].strip()[:64] or peer
        return peer

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = auth.new_csrf_token()
        return str(token)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.update(request=request, user=self.user(request), csrf=self.csrf(request), config=self.config,
                       allow_actions=self.web.allow_actions)
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status)

    def refuse(self, request: Request, status: int, message: str, **headers: str) -> HTMLResponse:
        response = self.page(request, "error.html", status=status, message=message)
        response.headers.update(headers)
        return response

    async def form(self, request: Request) -> dict[str, str] | HTMLResponse:
        """The POSTed form, after the CSRF check (a refusal page when it fails)."""
        form = await request.form()
        data = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        if not auth.csrf_ok(request.session.get("csrf"), data.get("csrf")):
            log.warning("web_csrf_refused", path=request.url.path)
            return self.refuse(request, 403, "This form's security token is missing or does not match your "
                                             "session (it may have expired). Reload the page and try again.")
        return data

    # ---- sign-in --------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.page(request, "login.html", next=_safe_next(request.query_params.get("next", "/")))
        client = self.client_address(request)
        wait = self.limiter.retry_after(client)
        if wait > 0:
            log.warning("web_login_rate_limited", client=client)
            return self.refuse(request, 429, f"Too many failed sign-ins from {client}. Try again in "
                                             f"{int(wait) + 1} seconds.", **{"Retry-After": str(int(wait) + 1)})
        data = await self.form(request)
        if isinstance(data, Response):
            return data
        user, password = data.get("user", ""), data.get("password", "")
        ok = bool(self.users) and await run_in_threadpool(auth.check_password, self.users, user, password)
        if not ok:
            self.limiter.failed(client)
            log.warning("web_login_failed", client=client, user=user[:64])
            return self.page(request, "login.html", status=401, next=_safe_next(data.get("next", "/")),
                             error="Wrong user name or password.")
        self.limiter.succeeded(client)
        request.session.clear()  # a fresh session: nothing set before the sign-in carries over
        request.session.update(user=user, until=time.time() + self.web.session_hours * 3600,
                               csrf=auth.new_csrf_token())
        log.info("web_login", client=client, user=user)
        return RedirectResponse(_safe_next(data.get("next", "/")), status_code=303)

    async def logout(self, request: Request) -> Response:
        data = await self.form(request)
        if isinstance(data, Response):
            return data
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- pages ----------------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        from mailtriage.store.stats import model_created_at, next_retrain_examples

        stats = self.state.stats(OVERVIEW_DAYS)
        days = reports.daily_outcomes(self.state, OVERVIEW_DAYS)
        weeks, series = reports.weekly_accuracy(self.state, self.config.labels, ACCURACY_WEEKS)
        version, created = model_created_at(self.config)
        versions = models.list_versions(self.model_dir)
        totals = stats["totals"]
        decided = totals["filed"] + totals["unsure"]
        return self.page(
            request, "overview.html", stats=stats, totals=totals,
            unsure_share=(totals["unsure"] / decided) if decided else None,
            per_day=Markup(charts.stacked_bars("Decisions per day by outcome", days)),
            accuracy=Markup(charts.lines("Live accuracy per category, by week filed", weeks,
                                         {k: v for k, v in series.items() if any(x is not None for x in v)})),
            serving=version, created=created, promoted=models.promoted_at(self.model_dir),
            latest=versions[0] if versions else None, next_run=_next_run(self.config.training.schedule),
            schedule=self.config.training.schedule, next_retrain=next_retrain_examples(self.state, created),
        )

    def decisions(self, request: Request) -> Response:
        try:
            filters = reports.Filters.parse(request.query_params, self.config.labels)
        except reports.QueryError as exc:
            return self.refuse(request, 400, str(exc))
        rows, more = reports.search(self.state, filters)
        return self.page(request, "decisions.html", rows=rows, more=more, f=filters,
                         outcomes=reports.OUTCOMES, labels=self.config.labels)

    def decision(self, request: Request) -> Response:
        row = reports.decision(self.state, int(request.path_params["rowid"]))
        if row is None:
            return self.refuse(request, 404, "No such decision (it may have been removed with the state database).")
        lines = explain.render(row.explanation) if row.explanation else []
        return self.page(request, "decision.html", row=row, lines=lines)

    def _account(self, name: str | None) -> AccountConfig | None:
        accounts = self.config.accounts
        if not accounts:
            return None
        return next((a for a in accounts if a.name == name), None) if name else accounts[0]

    def queues(self, request: Request) -> Response:
        account = self._account(request.query_params.get("account"))
        if account is None:
            if not self.config.accounts:
                return self.page(request, "queues.html", account=None, listings=[], guesses={}, error=None)
            return self.refuse(request, 404, f"No [[accounts]] entry named {request.query_params.get('account')!r}; "
                                             f"configured: {[a.name for a in self.config.accounts]}")
        folders = list(dict.fromkeys([self.config.unsure_folder, self.config.quarantine()]))
        error = None
        listings: list[queues.QueueListing] = []
        client = None
        try:
            client = self.imap_factory(account)
            listings = [queues.list_queue(client, f, self.web.snippet_chars) for f in folders]
        except MailtriageError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the page says the server is unreachable, not a 500
            error = f"cannot read the queues of {account.name!r}: {exc}"
        finally:
            _logout(client)
        keys = [m.key for listing in listings for m in listing.messages]
        guesses = reports.latest_by_key(self.state, keys)
        return self.page(request, "queues.html", account=account, listings=listings, guesses=guesses, error=error)

    async def file_message(self, request: Request) -> Response:
        data = await self.form(request)
        if isinstance(data, Response):
            return data
        if not self.web.allow_actions:
            return self.refuse(request, 403, "The console is read-only: filing needs [web] allow_actions = true.")
        account = self._account(data.get("account"))
        if account is None:
            return self.refuse(request, 400, f"No [[accounts]] entry named {data.get('account')!r}.")
        try:
            uid, uidvalidity = int(data.get("uid", "")), int(data.get("uidvalidity", ""))
        except ValueError:
            return self.refuse(request, 400, "The form lacks a message number (uid, uidvalidity); reload the queue.")
        label, folder = data.get("label", ""), data.get("folder", "")

        def work() -> Any:
            client = self.imap_factory(account)
            try:
                return queues.file_as(client, self.config, account, self.state, folder, uidvalidity, uid, label)
            finally:
                _logout(client)

        try:
            corr = await run_in_threadpool(work)
        except MailtriageError as exc:
            return self.refuse(request, 409, f"Not filed: {exc}")
        log.info("web_filed", user=self.user(request), account=account.name, folder=folder, uid=uid, label=label,
                 correction=corr is not None)
        return RedirectResponse(f"/queues?account={account.name}&filed={label}", status_code=303)

    def models_page(self, request: Request) -> Response:
        versions = models.list_versions(self.model_dir)
        return self.page(request, "models.html", versions=versions, model_dir=self.model_dir,
                         previous=models.previous_version(self.model_dir))

    def model_report(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            text = models.report_text(self.model_dir, name)
            version = next(v for v in models.list_versions(self.model_dir) if v.name == name)
        except (MailtriageError, StopIteration) as exc:
            return self.refuse(request, 404, str(exc) or f"No model version {name!r}.")
        return self.page(request, "report.html", version=version, report=text)

    def confusion(self, request: Request) -> Response:
        try:
            png = models.confusion_png(self.model_dir, request.path_params["name"])
        except MailtriageError as exc:
            return _plain(404, str(exc))
        if png is None:
            return _plain(404, "this version has no confusion matrix")
        return Response(png, media_type="image/png")

    async def promote(self, request: Request) -> Response:
        data = await self.form(request)
        if isinstance(data, Response):
            return data
        if not self.web.allow_actions:
            return self.refuse(request, 403, "The console is read-only: promote and roll back need "
                                             "[web] allow_actions = true.")
        name = data.get("version", "")
        if request.url.path.endswith("/rollback"):
            name = models.previous_version(self.model_dir) or ""
            if not name:
                return self.refuse(request, 409, "Nothing to roll back to: no version is older than the current one.")
        try:
            was = await run_in_threadpool(models.promote, self.model_dir, name, self.config.labels)
        except MailtriageError as exc:
            return self.refuse(request, 409, f"Not promoted: {exc}")
        log.info("web_promoted", user=self.user(request), version=name, was=was)
        return RedirectResponse("/models", status_code=303)


def _next_run(schedule: str) -> float | None:
    """When the scheduler fires the retrain next (UTC), from the same crontab parser it uses."""
    if not schedule:
        return None
    import datetime

    from mailtriage.core.cron import crontab_trigger

    now = datetime.datetime.now(datetime.timezone.utc)
    fire = crontab_trigger(schedule, timezone="UTC").get_next_fire_time(None, now)
    return fire.timestamp() if fire is not None else None


def _with_page(params: Any, page: int) -> str:
    from urllib.parse import urlencode

    return urlencode([(k, v) for k, v in params.multi_items() if k != "page"] + [("page", str(page))])


def _logout(client: Any) -> None:
    if client is None:
        return
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may be gone already
        pass


def _safe_next(target: str) -> str:
    """Only a path on this site: a sign-in must never redirect to another host."""
    # Browsers drop tabs and newlines from URLs ("/\t/evil.example" becomes "//evil.example"): refuse
    # anything but printable, space-free paths.
    ok = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if ok and target.isprintable() and not any(c.isspace() for c in target) else "/"


def _signed_in(console: Console, endpoint: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapper(request: Request) -> Response:
        if console.user(request) is None:
            if request.method == "POST":
                return console.refuse(request, 403, "Sign in first.")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)
        result = endpoint(request)
        if isinstance(result, Awaitable):
            return await result
        return result

    if not _is_async(endpoint):
        async def threaded(request: Request) -> Response:
            if console.user(request) is None:
                return await wrapper(request)
            return await run_in_threadpool(endpoint, request)  # SQLite and IMAP block: off the event loop
        return threaded
    return wrapper


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def create_app(config: Config, state: StateDB | None = None, imap_factory: queues.ClientFactory | None = None,
               clock: Callable[[], float] = time.monotonic) -> Starlette:
    """The console for ``config``. ``state``: the state database (opened from state_path when None);
    ``imap_factory``: logs an account in (``imap.connection.connect`` by default)."""
    if imap_factory is None:
        from mailtriage.imap.connection import connect

        imap_factory = connect
    console = Console(config, state if state is not None else StateDB(config.state_path), imap_factory, clock)
    guard = lambda fn: _signed_in(console, fn)  # noqa: E731
    routes = [
        Route("/login", console.login, methods=["GET", "POST"]),
        Route("/logout", guard(console.logout), methods=["POST"]),
        Route("/", guard(console.overview)),
        Route("/decisions", guard(console.decisions)),
        Route("/decisions/{rowid:int}", guard(console.decision)),
        Route("/queues", guard(console.queues)),
        Route("/queues/file", guard(console.file_message), methods=["POST"]),
        Route("/models", guard(console.models_page)),
        Route("/models/{name}/report", guard(console.model_report)),
        Route("/models/{name}/confusion.png", guard(console.confusion)),
        Route("/models/promote", guard(console.promote), methods=["POST"]),
        Route("/models/rollback", guard(console.promote), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(Limits),
        Middleware(SessionMiddleware, secret_key=_session_secret(config), session_cookie="mailtriage_console",
                   max_age=int(config.web.session_hours * 3600), same_site="strict",
                   https_only=config.web.secure_cookies),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.console = console
    return app
