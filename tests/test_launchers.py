"""mailtriage-train under the distributed launchers: a real `accelerate launch` subprocess (one CPU
process) trains and promotes a tiny model; more processes are refused with a message, not raced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailtriage.model import modeldir
from mailtriage_trainer.cli import EXIT_ERROR, main
from tests.test_train_cli import GOOD, toy_tree, train_args  # noqa: F401 - toy_tree is a fixture

pytestmark = pytest.mark.component


def test_accelerate_launch_single_process_trains_and_promotes(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path  # noqa: F811
) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    assert accelerate.exists() or shutil.which("accelerate"), "accelerate is a dependency: its launcher must exist"
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if k != "MAILTRIAGE_CONFIG"}
    env["HF_HOME"] = str(tmp_path / "hf")  # no stray accelerate default config from the machine
    cmd = [
        str(accelerate if accelerate.exists() else shutil.which("accelerate")), "launch",
        "--num_processes", "1", "--num_machines", "1", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "mailtriage_trainer.cli",
        *train_args(toy_tree, tiny_encoder_base, models, *GOOD),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "PROMOTED" in done.stdout
    current = modeldir.current_version(models)
    assert current is not None and (current / "adapter_config.json").is_file()


@pytest.mark.parametrize("world", ["2", "4"])
def test_more_than_one_process_is_refused(
    world: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    assert main(["--data", str(tmp_path), "--model-dir", str(tmp_path / "m")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"WORLD_SIZE={world}" in err and "--num_processes 1" in err
    assert not (tmp_path / "m").exists()
