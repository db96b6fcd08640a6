"""Photograph each page of a running console (docs/console/*.png): `make demo CONSOLE=1`, then
`python -m demo.screenshots http://127.0.0.1:8025/ docs/console`.

Debian's headless Chromium driven by Selenium, as in tests/test_web_browser.py; read-only: it signs
in and looks, it files nothing and promotes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the console's URL, e.g. http://127.0.0.1:8025/")
    ap.add_argument("out", type=Path, help="folder for the PNG files")
    ap.add_argument("--user", default="demo")
    ap.add_argument("--password", default="demo")
    args = ap.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver_path:
        print("chromium and chromium-driver are needed: `make deps` installs them", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1100,800", f"--user-data-dir={profile}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            driver.get(f"{base}/login")
            driver.find_element(By.ID, "user").send_keys(args.user)
            driver.find_element(By.ID, "password").send_keys(args.password)
            driver.find_element(By.ID, "sign-in").click()
            pages = {"overview": "/", "decisions": "/decisions", "queues": "/queues", "models": "/models"}
            for name, path in pages.items():
                driver.get(base + path)
                driver.save_screenshot(str(args.out / f"{name}.png"))
            driver.get(f"{base}/decisions?outcome=unsure")
            links = driver.find_elements(By.CSS_SELECTOR, "a.decision-link")
            if links:
                links[0].click()
                driver.save_screenshot(str(args.out / "decision.png"))
            driver.get(f"{base}/models")
            reports = driver.find_elements(By.LINK_TEXT, "report")
            if reports:
                reports[0].click()
                driver.save_screenshot(str(args.out / "report.png"))
        finally:
            driver.quit()
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
