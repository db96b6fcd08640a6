"""The house rules, enforced: which room may import which.

- core/ is pure: it imports nothing of imap/, smtp/, store/, service/, cli/ or model/.
- smtp/ never imports imap/: the two edges share only core/ (header tagging is core.tagging).
- torch (and transformers/peft) are imported only in model/, the trainer and testing/.
- the daemon never imports the trainer; the product never imports tests/.
- the trainer's command line, run, gate and report load neither torch nor scikit-learn on import
  (`mailtriage-train list`, `promote` and `--help` start fast; the steps import them when they run).
- the seam to the model (``ClassifyFn``, and ``ClassifyAsync`` for intakes on the event loop) is
  defined once, in core/pipeline.py, and only that pipeline calls ``routing.decide``: every intake
  gets the label check with the routing; the per-message lifecycle (claim, retry, quarantine) is
  driven from imap/filing.py only.
- metrics.py (the metric definitions) is a leaf: it imports nothing of mailtriage.
Checked statically with `ast`, so an import hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon"
TRAINER = ROOT / "trainer"
HEAVY = ("torch", "transformers", "peft", "accelerate")

pure = pytest.mark.pure


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _room(path: Path) -> str:
    rel = path.relative_to(DAEMON)
    return rel.parts[0] if len(rel.parts) > 1 else "top"


def _daemon_files() -> list[Path]:
    return sorted(DAEMON.rglob("*.py"))


def _hits(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pure
def test_core_imports_no_edge_or_model() -> None:
    edges = tuple(f"mailtriage.{room}" for room in ("imap", "smtp", "store", "service", "cli", "model", "testing"))
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), edges) for p in _daemon_files() if _room(p) == "core"}
    for name in ("tagging", "pipeline", "backoff", "identity"):
        assert f"daemon/core/{name}.py" in bad, f"core/ files not found: the rule checks nothing ({sorted(bad)})"
    assert not {k: v for k, v in bad.items() if v}, f"core/ must stay pure: {bad}"


@pure
def test_smtp_imports_nothing_of_imap() -> None:
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), ("mailtriage.imap",)) for p in _daemon_files() if _room(p) == "smtp"}
    assert [p for p in bad if p.startswith("daemon/smtp/")], "no smtp/ files found: the rule checks nothing"
    assert not {k: v for k, v in bad.items() if v}, f"smtp/ must not import the IMAP edge (use mailtriage.core): {bad}"


@pure
def test_torch_only_in_model_trainer_and_testing() -> None:
    bad = {
        str(p.relative_to(ROOT)): _hits(_imports(p), HEAVY)
        for p in _daemon_files()
        if _room(p) not in ("model", "testing")
    }
    assert not {k: v for k, v in bad.items() if v}, f"torch/transformers/peft outside model/: {bad}"


@pure
def test_daemon_never_imports_trainer_or_tests() -> None:
    bad = {
        str(p.relative_to(ROOT)): _hits(_imports(p), ("mailtriage_trainer", "tests"))
        for p in _daemon_files()
    }
    assert not {k: v for k, v in bad.items() if v}, f"daemon imports trainer/tests: {bad}"


@pure
def test_trainer_never_imports_tests() -> None:
    files = sorted(TRAINER.rglob("*.py"))
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), ("tests",)) for p in files}
    assert {"trainer/pipeline.py", "trainer/gate.py", "trainer/cli.py"} <= set(bad), "trainer files not found"
    assert not {k: v for k, v in bad.items() if v}, f"use mailtriage.testing instead: {bad}"


@pure
def test_demo_and_benchmarks_never_import_tests() -> None:
    files = sorted((ROOT / "demo").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    bad = {str(p.relative_to(ROOT)): _hits(_imports(p), ("tests",)) for p in files}
    assert not {k: v for k, v in bad.items() if v}, f"use mailtriage.testing instead: {bad}"


def _assigned_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _called_methods(path: Path) -> set[str]:
    return {
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


@pure
@pytest.mark.parametrize("seam", ["ClassifyFn", "ClassifyAsync"])
def test_the_classify_seam_is_defined_once(seam: str) -> None:
    where = [str(p.relative_to(ROOT)) for p in _daemon_files() if seam in _assigned_names(p)]
    assert where == ["daemon/core/pipeline.py"], f"{seam} must be defined once, in core/pipeline.py: {where}"


ROUTING = "mailtriage.core.routing"


def _uses_routing_decide(path: Path) -> bool:
    """Whether a file takes ``decide`` from core/routing.py: imported by name, or as an attribute of
    the routing module (``routing.decide``, ``mailtriage.core.routing.decide``)."""
    if f"{ROUTING}.decide" in _imports(path):
        return True
    return any(
        isinstance(node, ast.Attribute) and node.attr == "decide" and ast.unparse(node.value).endswith("routing")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
    )


@pure
def test_only_the_pipeline_calls_routing_decide() -> None:
    # An intake that routes by itself skips the pipeline's checks (a label that is not a category).
    files = [*_daemon_files(), *sorted(TRAINER.rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py")),
             *sorted((ROOT / "demo").rglob("*.py"))]
    where = [str(p.relative_to(ROOT)) for p in files if _uses_routing_decide(p)]
    assert where == ["daemon/core/pipeline.py"], f"route through core/pipeline.py, not routing.decide: {where}"


# The StateDB calls that move a watched message through its lifecycle.
LIFECYCLE = {"claim", "fail_attempt", "take_retry", "set_quarantine", "record_failure", "due_retries", "pending"}


@pure
def test_the_filing_lifecycle_lives_in_one_module() -> None:
    users = {
        str(p.relative_to(ROOT)): sorted(_called_methods(p) & LIFECYCLE)
        for p in _daemon_files()
        if _room(p) not in ("store", "testing")
    }
    assert users.get("daemon/imap/filing.py"), "imap/filing.py drives no lifecycle call: the rule checks nothing"
    others = {k: v for k, v in users.items() if v and k != "daemon/imap/filing.py"}
    assert not others, f"the per-message lifecycle belongs in imap/filing.py: {others}"
    assert not (DAEMON / "imap" / "recovery.py").exists(), "crash recovery is part of imap/filing.py"


@pure
def test_metrics_is_a_leaf_that_the_edges_count_into() -> None:
    # Counting a message must not pull in the service: imap/, smtp/ and store/ import the metric
    # definitions, which import nothing of mailtriage.
    leaf = DAEMON / "metrics.py"
    assert not _hits(_imports(leaf), ("mailtriage",)), f"daemon/metrics.py must stay a leaf: {_imports(leaf)}"
    counting = {_room(p) for p in _daemon_files() if "mailtriage.metrics" in _imports(p)}
    assert {"imap", "smtp", "store", "service"} <= counting, counting
    old = {str(p.relative_to(ROOT)) for p in _daemon_files() if _hits(_imports(p), ("mailtriage.service.metrics",))}
    assert not old, f"import the metrics from mailtriage.metrics: {old}"


@pure
def test_the_rules_can_fail(tmp_path: Path) -> None:
    # The checker itself sees an import hidden in a function body.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import torch.nn\n    from mailtriage.imap import watcher\n")
    assert _hits(_imports(probe), HEAVY) == ["torch.nn"]
    assert _hits(_imports(probe), ("mailtriage.imap",)) == ["mailtriage.imap", "mailtriage.imap.watcher"]
    probe.write_text("ClassifyFn = int\ndef g(state):\n    state.claim(1)\n")
    assert "ClassifyFn" in _assigned_names(probe) and _called_methods(probe) & LIFECYCLE == {"claim"}
    probe.write_text("from mailtriage.core import routing\nx = routing.decide(p, 0.5, {}, 'U')\n")
    assert _uses_routing_decide(probe)
    probe.write_text("def f():\n    from mailtriage.core.routing import decide as d\n")
    assert _uses_routing_decide(probe)
    probe.write_text("def decide(ok, why): ...\ndecide(True, 'gate')\n")
    assert not _uses_routing_decide(probe)


@pytest.mark.component
def test_importing_the_relay_and_watcher_does_not_load_torch() -> None:
    code = ("import sys, mailtriage.smtp.relay, mailtriage.smtp.nexthop, mailtriage.imap.watcher, mailtriage.imap.filing, "
            "mailtriage.core.pipeline, mailtriage.core.explain, mailtriage.store.stats, mailtriage.model.manifest, "
            "mailtriage.milter.server, mailtriage.service.batching, mailtriage.imap.namespace, mailtriage.httpcall, "
            "mailtriage.credentials, mailtriage.cli.check_smtp; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.component
def test_importing_the_trainer_cli_pipeline_and_gate_loads_no_torch_or_sklearn() -> None:
    code = ("import sys, mailtriage_trainer.cli, mailtriage_trainer.pipeline, mailtriage_trainer.gate, "
            "mailtriage_trainer.report, mailtriage_trainer.evaluate; "
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
