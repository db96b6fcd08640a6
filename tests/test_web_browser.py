"""The console in a real browser: Debian's headless Chromium driven by Selenium (chromium-driver),
against `mailtriage serve` with ``[web] enabled = true`` (the tiny model, a real Dovecot): sign in,
open a decision and its explanation, file an unsure message (it leaves the unsure folder on the
server and is recorded as a correction), roll back a model version.

Each page is photographed into tmp_path, or into $MAILTRIAGE_CONSOLE_SCREENSHOTS when set (the
pictures in docs/console/ come from the demo: demo/screenshots.py). A missing Chromium fails the
test: `make deps` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailtriage.model import modeldir
from mailtriage.store.state import StateDB
from mailtriage.testing.builders import account, mail, write_config
from mailtriage.testing.dovecot import Dovecot, load_messages
from mailtriage.testing.imapserver import free_port
from mailtriage.testing.waits import port_open, wait_for
from mailtriage.web import auth
from tests.console_fixtures import FOLDERS, UNSURE

pytestmark = pytest.mark.component

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
PASSWORD = "browser test password"


def _binary(names: tuple[str, ...]) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"none of {list(names)} is installed; the browser tests need Debian's chromium and "
                "chromium-driver: run `make deps` (or `apt-get install -y chromium chromium-driver`)", pytrace=False)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = _binary(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", f"--user-data-dir={tmp_path / 'chromium'}", "--no-first-run"):
        options.add_argument(arg)
    # An explicit driver: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=DriverService(executable_path=_binary(("chromedriver",))), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _copy_model_dir(source: Path, target: Path) -> tuple[str, str]:
    """The tiny model's directory with a second, older version beside the current one (what a roll back
    goes back to), and a report with a confusion matrix on the current one. Returns (older, current)."""
    from mailtriage_trainer.report import plot_confusion

    shutil.copytree(source, target, symlinks=True)
    current = modeldir.current_version(target)
    assert current is not None
    older = target / "20000101-000000"
    shutil.copytree(current, older)
    plot_confusion([[9, 1, 0], [0, 10, 0], [1, 0, 9]], ["billing", "login", "refunds"], current / "confusion.png",
                   f"version {current.name}")
    (current / "report.md").write_text(f"# Version {current.name}\n\nThe tiny test model.\n")
    return older.name, current.name


def _go(driver: Any, element: Any) -> None:
    """Click a link or a form's button and wait until the next page has replaced this one: click()
    returns once the navigation starts, and a check made before the answer (a sign-in's scrypt, an
    IMAP MOVE) arrives would read the old page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _shoot(driver: Any, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / f"{name}.png"))


def test_console_in_a_real_browser(browser: Any, dovecot: Dovecot, tiny_model_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    shots = Path(os.environ.get("MAILTRIAGE_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    user, imap_password = "console-browser", "pw-console-browser"
    dovecot.add_user(user, imap_password)
    models = tmp_path / "models"
    older, current = _copy_model_dir(tiny_model_dir, models)
    pw = tmp_path / "console.passwd"
    auth.write_password(pw, "lead", PASSWORD)
    port = free_port()
    config = write_config(
        tmp_path / "config.toml", tmp_path, unsure_folder=UNSURE,
        accounts=[account(port=dovecot.port, username=user, password=imap_password, secret_dir=tmp_path,
                          mailboxes=["INBOX"], idle_timeout=60)],
        model={"path": str(models / "current"), "threshold": 0.6},
        training={"model_dir": str(models), "schedule": "0 3 * * 0"},
        web={"enabled": True, "listen_port": port, "password_file": str(pw), "allow_actions": True},
    )
    with dovecot.client(user, imap_password) as imap:
        for folder in [*FOLDERS.values(), UNSURE]:
            imap.create_folder(folder)
        load_messages(imap, "INBOX", [
            mail("My invoice shows the wrong amount, please fix the invoice", "Invoice amount wrong",
                 sender="ann@example.com", date="now"),
            mail("hello", "Quick question <b>about</b> my order", sender="bob@example.com", date="now"),
        ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NOTIFY_SOCKET", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mailtriage.cli.main", "--config", str(config), "serve"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        def filed() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            with dovecot.client(user, imap_password) as imap:
                return imap.folder_status("INBOX", [b"MESSAGES"])[b"MESSAGES"] == 0
        wait_for(filed, 90, "the daemon filing the inbox")
        wait_for(lambda: port_open(port), 30, "the console listening")

        # Sign in (the page asked for first redirects to the sign-in and back).
        browser.get(f"{base}/decisions")
        assert "/login" in browser.current_url
        browser.find_element(By.ID, "user").send_keys("lead")
        browser.find_element(By.ID, "password").send_keys("wrong")
        _go(browser, browser.find_element(By.ID, "sign-in"))
        assert "Wrong user name or password" in browser.find_element(By.ID, "login-error").text
        browser.find_element(By.ID, "user").clear()
        browser.find_element(By.ID, "user").send_keys("lead")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        _go(browser, browser.find_element(By.ID, "sign-in"))
        assert browser.current_url.endswith("/decisions")
        _shoot(browser, shots, "decisions")

        # Open the unsure decision and read its explanation.
        row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#decisions tr.o-unsure"))
        assert "Quick question <b>about</b> my order" in row.text  # shown as text, not markup
        _go(browser, row.find_element(By.CSS_SELECTOR, "a.decision-link"))
        why = browser.find_element(By.ID, "explanation").text
        assert "unsure:" in why and "top labels:" in why and "below the threshold 60.0%" in why
        _shoot(browser, shots, "decision")

        _go(browser, browser.find_element(By.ID, "nav-overview"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure svg")) == 2
        assert current in browser.find_element(By.ID, "serving").text
        _shoot(browser, shots, "overview")

        # File the unsure message as refunds.
        _go(browser, browser.find_element(By.ID, "nav-queues"))
        _shoot(browser, shots, "queues")
        form = browser.find_element(By.CSS_SELECTOR, "table.queue form.file-as")
        Select(form.find_element(By.NAME, "label")).select_by_visible_text("refunds")
        _go(browser, form.find_element(By.CSS_SELECTOR, "button"))
        assert "Filed as refunds" in browser.find_element(By.ID, "filed-note").text
        with dovecot.client(user, imap_password) as imap:
            assert imap.folder_status(UNSURE, [b"MESSAGES"])[b"MESSAGES"] == 0
            assert imap.folder_status(FOLDERS["refunds"], [b"MESSAGES"])[b"MESSAGES"] == 1
        state = StateDB(tmp_path / "state.sqlite3", readonly=True)
        (corr,) = state.corrections()
        assert (corr["actual"], corr["was_unsure"]) == ("refunds", 1)
        state.close()

        # Roll back to the older version.
        _go(browser, browser.find_element(By.ID, "nav-models"))
        _go(browser, browser.find_element(By.LINK_TEXT, "report"))
        assert browser.find_element(By.CSS_SELECTOR, "img.confusion").get_property("naturalWidth") > 0
        _shoot(browser, shots, "report")
        _go(browser, browser.find_element(By.ID, "nav-models"))
        _shoot(browser, shots, "models")
        _go(browser, browser.find_element(By.ID, "rollback"))
        assert browser.current_url.endswith("/models")
        assert modeldir.current_version(models) == (models / older).resolve()
        assert "current" in browser.find_element(By.CSS_SELECTOR, "#versions tr.current").get_attribute("class")
        assert older in browser.find_element(By.CSS_SELECTOR, "#versions tr.current").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
