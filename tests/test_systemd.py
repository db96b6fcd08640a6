"""The systemd units: `systemd-analyze verify` accepts every one, and the services stay hardened
(`systemd-analyze security` exposure <= 2, "OK"; the web console must not raise it). `make deps` installs systemd."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("mailtriage.service", "mailtriage-train.service")
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.component  # runs systemd-analyze


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run `make deps` (apt package systemd)"
    return tool


def _units_with_stub_binaries(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart points at stub executables (verify checks they exist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("mailtriage", "mailtriage-train"):
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    for unit in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.timer")):
        text = unit.read_text().replace("/opt/mailtriage/.venv/bin/", f"{bin_dir}/")
        (out / unit.name).write_text(text)
    return out


def test_every_unit_verifies(tmp_path: Path) -> None:
    units = _units_with_stub_binaries(tmp_path)
    names = sorted(p.name for p in units.iterdir())
    assert {"mailtriage.service", "mailtriage-train.service", "mailtriage-train.timer"} <= set(names)
    proc = subprocess.run(
        [_analyze(), "verify", *(str(units / n) for n in names)], capture_output=True, text=True, timeout=120
    )
    # verify exits 0 on an unknown key and only warns: any output at all is a finding.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_no_check_before_serve() -> None:
    """`serve` backs off on an IMAP outage at boot; an ExecStartPre check would fail the unit."""
    text = (UNITS / "mailtriage.service").read_text()
    assert not re.search(r"^ExecStartPre=.*\bcheck\b", text, re.M)
    assert re.search(r"^LimitNOFILE=\d+", text, re.M)


@pytest.mark.parametrize("service", SERVICES)
def test_exposure_score_is_ok(service: str, record_property: pytest.RecordProperty) -> None:
    proc = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(UNITS / service)],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    score = float(found.group(1))
    record_property("systemd_exposure", score)
    print(f"{service}: systemd-analyze security exposure {score} {found.group(2)}")
    assert score <= MAX_EXPOSURE, f"{service} exposure {score} > {MAX_EXPOSURE}:\n{proc.stdout}"


def test_sysusers_snippet_declares_the_service_user(tmp_path: Path) -> None:
    lines = [
        line.split() for line in (UNITS / "mailtriage.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines and lines[0][:2] == ["u", "mailtriage"]
    tool = shutil.which("systemd-sysusers")
    assert tool, "systemd-sysusers is missing: run `make deps` (apt package systemd)"
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}", str(UNITS / "mailtriage.sysusers.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("mailtriage:"))
    assert entry[5:] == ["/var/lib/mailtriage", "/usr/sbin/nologin"]
    for service in SERVICES:
        assert "User=mailtriage" in (UNITS / service).read_text()


_MDWE_PROBE = """
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(77)
import torch
with torch.no_grad():
    torch.nn.functional.gelu(torch.nn.Linear(384, 384)(torch.randn(64, 384)))  # BERT's FFN
"""


def test_torch_needs_writable_executable_memory() -> None:
    """Why the units leave MemoryDenyWriteExecute= off: under the same kernel rule (prctl
    PR_SET_MDWE, W^X for the process) the GELU of every BERT layer fails in oneDNN's JIT on CPU. If this test ever
    fails, torch no longer needs W+X: add MemoryDenyWriteExecute=yes to both services."""
    import sys

    proc = subprocess.run([sys.executable, "-c", _MDWE_PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode != 0 and "could not create a primitive" in proc.stderr, proc.stderr[-2000:]
