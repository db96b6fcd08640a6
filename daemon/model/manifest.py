"""A model version's manifest.json as one typed, validated value: what the loader, `list` and `stats` read.

The file is written by the trainer and may be edited (or forged) by hand, so every value the daemon
acts on is checked here, once, at load: a wrong type, a non-finite number or one out of range is a
ModelError naming the key, the value and what is allowed. Keys this type does not model (metrics
details, the gate's record, data counts) are kept in ``raw`` and written back unchanged by ``save``.
Manifests from older versions lack newer keys; each gets the default that reproduces how those
versions were served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mailtriage.core.training import AUTO_FILED_CHOICES, CHUNKS_MAX, TRUNCATION_CHOICES
from mailtriage.errors import ModelError
from mailtriage.model import modeldir
from mailtriage.model.ensemble import DEFAULT_ENSEMBLE_WEIGHT, SERVE_CHOICES, SERVE_MODEL

# Temperatures the trainer fits lie in 0.047..21.2 (a log grid over 0.05..20, refined by +-6%). The
# bounds leave room around that yet keep the arithmetic finite: at 1e-300, logits / T overflowed to
# inf and every confidence became NaN.
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 100.0

# How much holdout accuracy the int8 ONNX graph may lose against fp32 before "auto" keeps a version
# on torch fp32 on a CPU: half a point (as a fraction). The trainer measures both on the version's own
# holdout and records them in the manifest's "serving" block; the loader applies this rule to them.
INT8_TOLERANCE = 0.005
CPU_RUNTIMES = ("torch", "onnxruntime")
CPU_QUANTIZE = ("none", "int8")
# The counts in "origins": labels sorted by staff, staff corrections, daemon filings trained on, and
# daemon filings training.auto_filed left out.
ORIGIN_COUNTS = ("staff", "corrections", "daemon", "daemon_skipped")


def int8_tolerance(holdout_n: int | None) -> float:
    """How far below fp32 int8 may score: ``INT8_TOLERANCE`` (0.5 points), or one held-out message
    where the holdout is smaller than 200. There one message is more than 0.5 points, so the rule
    would demand that int8 never flip a single message against the truth, which no holdout that
    size can tell from noise (a 60-mail holdout refused int8 one mail apart, 80.0% vs 81.7%)."""
    return max(INT8_TOLERANCE, 1 / holdout_n) if holdout_n else INT8_TOLERANCE


def int8_keeps_accuracy(fp32: float, int8: float, holdout_n: int | None = None) -> bool:
    """True when int8 scored at most ``int8_tolerance(holdout_n)`` below fp32 (1e-9: float noise of n/N fractions)."""
    return fp32 - int8 <= int8_tolerance(holdout_n) + 1e-9


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Manifest:
    """What a version says about itself. Defaults are what a version without the key was served with."""

    base_model: str | None = None          # None: the adapter_config.json's base is used
    mailtext_version: str | None = None    # None: unknown (very old versions); the loader warns
    serve: str = SERVE_MODEL
    temperature: float = 1.0               # the model's logits are divided by it
    ensemble_weight: float = DEFAULT_ENSEMBLE_WEIGHT
    ensemble_temperature: float = 1.0
    baseline_temperature: float = 1.0
    truncation: str = "head"               # params.truncation (training.params.truncation in bare finetune ones)
    chunks: int = 1                        # params.chunks: windows of max_length read per text, logits averaged
    version: str | None = None
    created: str | None = None             # "%Y-%m-%dT%H:%M:%SZ", UTC
    threshold: float | None = None
    labels: tuple[str, ...] | None = None
    metrics: Mapping[str, Any] = field(default_factory=_empty)   # the held-out metrics as served
    gate: Mapping[str, Any] = field(default_factory=_empty)
    # What the trainer measured for CPU serving: {"cpu_runtime", "quantize", "holdout_accuracy_fp32",
    # "holdout_accuracy_int8", "holdout_n", "reason"}; empty for versions from before the check (torch fp32 then).
    serving: Mapping[str, Any] = field(default_factory=_empty)
    # Where the training labels came from (mailtriage_trainer.origins): {"staff", "corrections", "daemon",
    # "daemon_skipped", "auto_filed", "auto_filed_days"}; empty for versions from before it was counted.
    origins: Mapping[str, Any] = field(default_factory=_empty)
    # The whole JSON object as read, for the keys not modelled above (reports read them).
    raw: Mapping[str, Any] = field(default_factory=_empty, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Built by hand (dataclasses.replace, tests) or from a file: the same checks either way.
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw"}
        _check_types(values, "a Manifest")
        _validate(values, "a Manifest")

    # ---- reading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest.json") -> Manifest:
        """Validate ``data`` (a manifest.json object); ``where`` names it in error messages."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{where} holds a {type(data).__name__}, expected a JSON object")
        params = _params(data, where)
        values = {
            "base_model": data.get("base_model"),
            "mailtext_version": data.get("mailtext_version"),
            "serve": data.get("serve", SERVE_MODEL),
            "temperature": data.get("temperature", 1.0),
            "ensemble_weight": data.get("ensemble_weight", DEFAULT_ENSEMBLE_WEIGHT),
            "ensemble_temperature": data.get("ensemble_temperature", 1.0),
            "baseline_temperature": data.get("baseline_temperature", 1.0),
            "truncation": params.get("truncation", "head"),
            "chunks": params.get("chunks", 1),
            "version": data.get("version"),
            "created": data.get("created"),
            "threshold": data.get("threshold"),
            "labels": data.get("labels"),
            "metrics": data.get("metrics") or {},
            "gate": data.get("gate") or {},
            "serving": data.get("serving") or {},
            "origins": data.get("origins") or {},
        }
        _check_types(values, where)
        if isinstance(values["mailtext_version"], int):
            values["mailtext_version"] = str(values["mailtext_version"])
        if values["labels"] is not None:
            values["labels"] = tuple(values["labels"])
        for key in ("temperature", "ensemble_weight", "ensemble_temperature", "baseline_temperature", "threshold"):
            if values[key] is not None:
                values[key] = _float(values[key])
        values["metrics"] = MappingProxyType(dict(values["metrics"]))
        values["gate"] = MappingProxyType(dict(values["gate"]))
        values["serving"] = MappingProxyType(dict(values["serving"]))
        values["origins"] = MappingProxyType(dict(values["origins"]))
        _validate(values, where)  # here, so the message names the file
        return cls(**values, raw=MappingProxyType(dict(data)))

    @classmethod
    def load(cls, version_dir: Path) -> Manifest:
        """The version's manifest.json, validated (ModelError when missing, unreadable or invalid)."""
        path = Path(version_dir) / modeldir.MANIFEST_FILE
        return cls.from_dict(modeldir.read_manifest(version_dir), where=f"{str(path)!r}")

    @classmethod
    def load_or_default(cls, version_dir: Path) -> Manifest | None:
        """Like ``load``; None when the version has no manifest.json at all (hand-made versions)."""
        if not (Path(version_dir) / modeldir.MANIFEST_FILE).is_file():
            return None
        return cls.load(version_dir)

    # ---- writing ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``save`` writes: ``raw`` with the modelled keys set to this value's fields."""
        out = dict(self.raw)
        for key in ("base_model", "mailtext_version", "version", "created", "threshold"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(serve=self.serve, temperature=self.temperature, ensemble_weight=self.ensemble_weight,
                   ensemble_temperature=self.ensemble_temperature, baseline_temperature=self.baseline_temperature)
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.metrics:
            out["metrics"] = dict(self.metrics)
        if self.gate:
            out["gate"] = dict(self.gate)
        if self.serving:
            out["serving"] = dict(self.serving)
        if self.origins:
            out["origins"] = dict(self.origins)
        if self.truncation != "head" or self.chunks != 1 or "params" in out:
            params = {**(out.get("params") or {}), "truncation": self.truncation}
            if self.chunks != 1 or "chunks" in params:  # a manifest from before the option reads back unchanged
                params["chunks"] = self.chunks
            out["params"] = params
        return out

    def save(self, version_dir: Path) -> None:
        modeldir.write_manifest(version_dir, self.to_dict())

    # ---- what `list` shows --------------------------------------------------------------------

    @property
    def macro_f1(self) -> float | None:
        return _score(self.metrics.get("macro_f1"))

    @property
    def accuracy(self) -> float | None:
        return _score(self.metrics.get("accuracy"))

    @property
    def gate_decision(self) -> str | None:
        """"promoted", "refused", "forced" (newer versions say so), else derived from ``promoted``."""
        decision = self.gate.get("decision")
        if isinstance(decision, str) and decision:
            return decision
        if not self.gate:
            return None
        return "promoted" if self.gate.get("promoted") else "kept"

    # ---- what runtime = quantize = "auto" serve on a CPU ------------------------------------------

    @property
    def cpu_serving(self) -> tuple[str, str]:
        """(runtime, quantize) for a CPU: ("onnxruntime", "int8") when the trainer recorded that choice
        and its two holdout accuracies say int8 stayed within ``INT8_TOLERANCE`` of fp32; else
        ("torch", "none"), also for older versions without the record. The numbers are checked here
        again, so a hand-edited "cpu_runtime" alone does not switch a version to int8."""
        s = self.serving
        fp32, int8 = _score(s.get("holdout_accuracy_fp32")), _score(s.get("holdout_accuracy_int8"))
        n = s.get("holdout_n")  # validated at load; absent in versions from before it was recorded
        if (s.get("cpu_runtime") == "onnxruntime" and s.get("quantize") == "int8" and fp32 is not None
                and int8 is not None and int8_keeps_accuracy(fp32, int8, n)):
            return ("onnxruntime", "int8")
        return ("torch", "none")


# ---- validation ---------------------------------------------------------------------------------

_NUMBER = "a number"
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "base_model": ((str,), "a non-empty string (a local folder or a model name)"),
    "mailtext_version": ((str, int), "a string such as \"3\""),
    "serve": ((str,), f"one of {list(SERVE_CHOICES)}"),
    "temperature": ((int, float), _NUMBER),
    "ensemble_weight": ((int, float), _NUMBER),
    "ensemble_temperature": ((int, float), _NUMBER),
    "baseline_temperature": ((int, float), _NUMBER),
    "truncation": ((str,), f"one of {list(TRUNCATION_CHOICES)}"),
    "chunks": ((int,), f"a whole number 1..{CHUNKS_MAX}"),
    "version": ((str,), "a string"),
    "created": ((str,), "a UTC time such as \"2026-01-31T12:00:00Z\""),
    "threshold": ((int, float), _NUMBER),
    "labels": ((list, tuple), "a list of label names"),
    "metrics": ((Mapping,), "a JSON object"),
    "gate": ((Mapping,), "a JSON object"),
    "serving": ((Mapping,), "a JSON object"),
    "origins": ((Mapping,), "a JSON object"),
}
_OPTIONAL = {"base_model", "mailtext_version", "version", "created", "threshold", "labels"}


def _params(data: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``params`` of a mailtriage-train manifest, else ``training.params`` of a bare finetune one."""
    params = data.get("params")
    if not params:
        training = data.get("training")
        params = training.get("params") if isinstance(training, Mapping) else None
    if not params:
        return {}
    if not isinstance(params, Mapping):
        raise _bad(where, "params", params, "a JSON object (the training parameters)")
    return params


def _check_types(values: Mapping[str, Any], where: str) -> None:
    for key, value in values.items():
        if value is None and key in _OPTIONAL:
            continue
        types, allowed = _TYPES[key]
        # JSON true/false are bools, and bool is an int in Python: never a number here.
        if isinstance(value, bool) or not isinstance(value, types):
            raise ModelError(f"{where} has \"{key}\": {_show(value)} ({type(value).__name__}); expected {allowed}. "
                             "Fix the value, or retrain with mailtriage-train to write a fresh manifest")


def _show(value: Any) -> str:
    """``repr`` cut to a readable length (a forged manifest may hold megabytes in one value)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit
        return f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(where: str, key: str, value: Any, allowed: str) -> ModelError:
    return ModelError(f"{where} has \"{key}\": {_show(value)}; expected {allowed}. Fix the value, or retrain with "
                      "mailtriage-train to write a fresh manifest")


def _validate(m: Mapping[str, Any], where: str) -> None:
    """Ranges and choices; the types were checked by ``_check_types``."""
    if m["serve"] not in SERVE_CHOICES:
        raise _bad(where, "serve", m["serve"], f"one of {list(SERVE_CHOICES)}")
    if m["truncation"] not in TRUNCATION_CHOICES:
        raise ModelError(f"{where} has params.truncation = {_show(m['truncation'])}; this mailtriage knows "
                         f"{list(TRUNCATION_CHOICES)}: run the release that trained it, or retrain")
    if not 1 <= m["chunks"] <= CHUNKS_MAX:
        raise ModelError(f"{where} has params.chunks = {_show(m['chunks'])}; expected a whole number 1..{CHUNKS_MAX} "
                         "(windows of max_length tokens read per message): fix the value, or retrain")
    for key in ("temperature", "ensemble_temperature", "baseline_temperature"):
        if not (math.isfinite(_float(m[key])) and TEMPERATURE_MIN <= m[key] <= TEMPERATURE_MAX):
            raise _bad(where, key, m[key], f"a finite number in {TEMPERATURE_MIN}..{TEMPERATURE_MAX:g} "
                                           "(1 leaves the confidences as trained)")
    if not (math.isfinite(_float(m["ensemble_weight"])) and 0.0 <= m["ensemble_weight"] <= 1.0):
        raise _bad(where, "ensemble_weight", m["ensemble_weight"],
                   "a finite number in 0..1 (the model's share of the ensemble)")
    if m["threshold"] is not None and not (math.isfinite(_float(m["threshold"])) and 0.0 <= m["threshold"] <= 1.0):
        raise _bad(where, "threshold", m["threshold"], "a finite number in 0..1")
    if m["base_model"] is not None and not m["base_model"].strip():
        raise _bad(where, "base_model", m["base_model"], "a non-empty string (a local folder or a model name)")
    if m["labels"] is not None and not all(isinstance(label, str) and label for label in m["labels"]):
        raise _bad(where, "labels", list(m["labels"]), "a list of non-empty label names")
    for key in ("macro_f1", "accuracy"):
        value = m["metrics"].get(key)
        if value is not None and _score(value) is None:
            raise _bad(where, f"metrics.{key}", value, "a finite number in 0..1")
    serving = m["serving"]
    for key, choices in (("cpu_runtime", CPU_RUNTIMES), ("quantize", CPU_QUANTIZE)):
        if key in serving and serving[key] not in choices:
            raise _bad(where, f"serving.{key}", serving[key], f"one of {list(choices)}")
    for key in ("holdout_accuracy_fp32", "holdout_accuracy_int8"):
        value = serving.get(key)
        if value is not None and _score(value) is None:
            raise _bad(where, f"serving.{key}", value, "a finite number in 0..1 (an accuracy)")
    n = serving.get("holdout_n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise _bad(where, "serving.holdout_n", n, "a whole number >= 1 (how many held-out messages were compared)")
    for key in ORIGIN_COUNTS:
        value = m["origins"].get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _bad(where, f"origins.{key}", value, "a count (a whole number, 0 or more)")
    if "auto_filed" in m["origins"] and m["origins"]["auto_filed"] not in AUTO_FILED_CHOICES:
        raise _bad(where, "origins.auto_filed", m["origins"]["auto_filed"], f"one of {list(AUTO_FILED_CHOICES)}")


def _float(value: float) -> float:
    """A JSON number as a float; an integer too large for one (10**400) becomes inf, refused later."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _score(value: Any) -> float | None:
    """A metric as a float in 0..1, or None when absent or not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = _float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None
