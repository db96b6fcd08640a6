"""mailtriage-train under the distributed launchers: a real `accelerate launch` subprocess (one CPU
process) trains and promotes a tiny model; a real `torchrun` with two CPU processes trains
data-parallel and promotes exactly one version; the other commands refuse several processes."""

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


def test_torchrun_two_cpu_processes_train_one_promoted_version(
    toy_tree: Path, tiny_encoder_base: Path, tmp_path: Path  # noqa: F811
) -> None:
    """Data-parallel training: torchrun starts 2 CPU processes (gloo); they share every batch, and
    only rank 0 writes, gates and promotes: exactly one version, which serves."""
    from mailtriage.model.transformers import load_classifier

    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if k != "MAILTRIAGE_CONFIG"}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mailtriage_trainer.cli", *train_args(toy_tree, tiny_encoder_base, models, *GOOD)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert out.count("PROMOTED") == 1, "only rank 0 gates and promotes"
    assert '"world_size": 2' in out and '"processes": 2' in out, "both processes joined one gloo group"
    versions = [p for p in models.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 1 and modeldir.current_version(models) == versions[0].resolve()
    clf = load_classifier(models, device="cpu")
    assert {p.label for p in clf.classify(["refund please", "cannot log in"])} <= set(clf.labels)


@pytest.mark.parametrize("command", ["eval", "list"])
def test_other_commands_refuse_several_processes(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"eval": ["eval", "--model", str(tmp_path / "m")], "list": ["list", "--model-dir", str(tmp_path / "m")]}
    assert main(argv[command]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "only training is shared" in err
