"""The build-matrix spec: a YAML file naming models, precisions, sparsity, text and GPU targets.

    name: minilm-precisions            # optional: the report's folder name (default: the file's stem)
    models:                            # registered names, hub ids or directories
      - minilm                         # weights: pretrained
      - {name: bert-base, weights: random}
      - {name: ./my-checkpoint, weights: [pretrained, random], precisions: [hybrid],
         settings: {max_length: 64}}      # a model's own precisions and overrides
    precisions: [fp16, hybrid, auto, int8]
    sparsity: [dense, "2:4"]           # optional (default: dense)
    calibration: ../shared/data/wikitext-2/test.txt   # optional: DataSettings.path
    training: [../shared/data/sst2/train.tsv]         # optional: DataSettings.train_path
    targets: [H100, A100, "8.9"]       # optional: Ray accelerator labels or compute capabilities
    settings: {samples: 64, max_shape: 8x128}         # optional overrides of BuildSettings fields
    retries: 1                         # optional; --retries overrides
    num_cpus: 2                        # optional: CPUs of a local Ray (no --address)
    output_dir: engines                # optional; --out overrides

Override keys name a settings field: its bare name where one section has it (`samples`,
`calib_samples`, `max_shape`, `steps`), else `section.field` (`quant.min_cosine`,
`precision.min_cosine`); hyphens count as underscores. Sections: model, export, precision, data,
quant, train, sparsity, vocab, engine, profile (the one optimization profile). Every mistake is
one `CompilerError` (exit 1) naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.errors import CompilerError
from compiler.matrix.targets import Target, parse_target
from compiler.settings import (PRECISION_MODES, WEIGHT_MODES, BuildSettings, DataSettings, EngineSettings,
                               ExportSettings, ModelSettings, PrecisionSettings, ProfileSettings, QuantSettings,
                               SparsitySettings, TrainSettings, VocabSettings)

TOP_KEYS = ("name", "models", "precisions", "sparsity", "calibration", "training", "targets", "settings",
            "retries", "num_cpus", "output_dir")
MODEL_KEYS = ("name", "weights", "precisions", "settings")
SECTIONS: dict[str, type] = {"model": ModelSettings, "export": ExportSettings, "precision": PrecisionSettings,
                             "data": DataSettings, "quant": QuantSettings, "train": TrainSettings,
                             "sparsity": SparsitySettings, "vocab": VocabSettings, "engine": EngineSettings,
                             "profile": ProfileSettings}
# Set by the spec's own keys (models, precisions, sparsity, calibration, training), not by overrides.
RESERVED = {"model.name": "models", "model.weights": "models", "precision.mode": "precisions",
            "sparsity.pattern": "sparsity", "data.path": "calibration", "data.train_path": "training",
            "data.cache_dir": "output_dir", "engine.profiles": "settings: min_shape/opt_shape/max_shape"}
SPARSITY_NAMES = {"dense": None, "none": None, "2:4": "2:4"}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the spec: its name, one weights mode, its own precisions (None: the spec's)
    and overrides."""

    name: str
    weights: str
    overrides: dict[str, Any] = field(default_factory=dict)
    precisions: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MatrixSpec:
    """A validated spec (see the module docstring); `expand` in `compiler.matrix.cells` turns it into cells."""

    name: str
    models: tuple[ModelEntry, ...]
    precisions: tuple[str, ...]
    sparsity: tuple[str | None, ...] = (None,)
    calibration: str | None = None
    training: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    retries: int = 1
    num_cpus: int | None = None
    output_dir: str = "engines"


def _fail(where: str, problem: str) -> CompilerError:
    return CompilerError(f"matrix spec: {where}: {problem}")


def _check_keys(where: str, given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}")


def _as_list(where: str, value: Any) -> list[Any]:
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list) or not value:
        raise _fail(where, f"expected a non-empty list, got {value!r}")
    return value


def _precisions(where: str, value: Any) -> tuple[str, ...]:
    precisions = [str(p) for p in _as_list(where, value)]
    bad = [p for p in precisions if p not in PRECISION_MODES]
    if bad:
        raise _fail(where, f"{bad} not known; expected some of {list(PRECISION_MODES)}")
    return tuple(dict.fromkeys(precisions))


def _model_entries(models: Any) -> list[ModelEntry]:
    out = []
    for i, m in enumerate(_as_list("models", models)):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"].strip():
            raise _fail(where, f"expected a name or {{name: ..., weights: ...}}, got {m!r}")
        _check_keys(where, m, MODEL_KEYS)
        overrides = m.get("settings") or {}
        if not isinstance(overrides, dict):
            raise _fail(f"{where}.settings", f"expected a mapping of setting: value, got {overrides!r}")
        precisions = _precisions(f"{where}.precisions", m["precisions"]) if "precisions" in m else None
        for w in _as_list(f"{where}.weights", m.get("weights", "pretrained")):
            if w not in WEIGHT_MODES:
                raise _fail(f"{where}.weights", f"{w!r} is not one of {list(WEIGHT_MODES)}")
            out.append(ModelEntry(m["name"].strip(), w, dict(overrides), precisions))
    return out


def spec_from_dict(raw: Any, default_name: str = "matrix") -> MatrixSpec:
    """Validate a parsed spec (a dict as YAML gives it) and return the `MatrixSpec`.

    Raises:
        CompilerError: an unknown key, a precision or sparsity that does not exist, a GPU target
            neither a known Ray accelerator label nor a compute capability, a bad override
            (each message names the key and what is allowed).
    """
    if not isinstance(raw, dict):
        raise _fail("top level", f"expected a mapping with keys {', '.join(TOP_KEYS)}, got {type(raw).__name__}")
    _check_keys("top level", raw, TOP_KEYS)
    for key in ("models", "precisions"):
        if key not in raw:
            raise _fail("top level", f"'{key}' is required")
    precisions = _precisions("precisions", raw["precisions"])
    sparsity = []
    for s in _as_list("sparsity", raw.get("sparsity", "dense")):
        if str(s).lower() not in SPARSITY_NAMES:
            raise _fail("sparsity", f"{s!r} not known; expected dense or 2:4")
        sparsity.append(SPARSITY_NAMES[str(s).lower()])
    training = [str(t) for t in (_as_list("training", raw["training"]) if raw.get("training") else [])]
    calibration = raw.get("calibration")
    if calibration is not None and not isinstance(calibration, str):
        raise _fail("calibration", f"expected one text file, got {calibration!r}")
    targets = [parse_target(t) for t in (_as_list("targets", raw["targets"]) if raw.get("targets") else [])]
    overrides = raw.get("settings") or {}
    if not isinstance(overrides, dict):
        raise _fail("settings", f"expected a mapping of setting: value, got {overrides!r}")
    retries, num_cpus = raw.get("retries", 1), raw.get("num_cpus")
    if not isinstance(retries, int) or retries < 0:
        raise _fail("retries", f"expected an integer >= 0, got {retries!r}")
    if num_cpus is not None and (not isinstance(num_cpus, int) or num_cpus < 1):
        raise _fail("num_cpus", f"expected an integer >= 1, got {num_cpus!r}")
    name = str(raw.get("name") or default_name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _fail("name", f"{name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
    spec = MatrixSpec(name, tuple(_model_entries(raw["models"])), precisions,
                      tuple(dict.fromkeys(sparsity)), calibration, tuple(training),
                      tuple(dict.fromkeys(targets)), dict(overrides), retries, num_cpus,
                      str(raw.get("output_dir") or "engines"))
    for entry in spec.models:  # every override checked now, not in a worker later
        settings_for(spec, entry, (entry.precisions or spec.precisions)[0], spec.sparsity[0])
    return spec


def load_spec(path: str | Path) -> MatrixSpec:
    """Read and validate a YAML spec file (`spec_from_dict`).

    Raises:
        CompilerError: the file is missing or not YAML, or the spec is invalid.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes())  # bytes: PyYAML reads UTF-8 and UTF-16 by their BOM
    except OSError as e:
        raise CompilerError(f"matrix spec {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise CompilerError(f"matrix spec {path}: not valid YAML text: {e}\n"
                            "Fix the line it names; save the spec as UTF-8 (docs/matrix.md).") from e
    if raw is None:
        raise CompilerError(f"matrix spec {path} is empty: give at least models and precisions "
                            "(docs/examples/matrix-minilm.yaml is one to copy).")
    return spec_from_dict(raw, default_name=re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "matrix")


def _field_index() -> dict[str, list[str]]:
    """bare field name -> ["section.field", ...] over every section."""
    index: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index.setdefault(f.name, []).append(f"{section}.{f.name}")
    return index


def resolve_key(key: str) -> tuple[str, str]:
    """(section, field) of an override key (`samples`, `quant.min_cosine`, `calib-samples`).

    Raises:
        CompilerError: unknown, ambiguous (the candidates listed), or set by another spec key.
    """
    norm = str(key).replace("-", "_")
    index = _field_index()
    if "." in norm:
        section, name = norm.split(".", 1)
        if f"{section}.{name}" not in index.get(name, []):
            raise _fail(f"settings.{key}", f"no such setting; sections: {', '.join(SECTIONS)}")
        full = [f"{section}.{name}"]
    else:
        full = index.get(norm, [])
        if not full:
            raise _fail(f"settings.{key}", "no such setting (see `python -m compiler compile --help` and "
                                           "compiler/settings/ for the fields)")
        if len(full) > 1:
            raise _fail(f"settings.{key}", f"ambiguous: write one of {full}")
    if full[0] in RESERVED:
        raise _fail(f"settings.{key}", f"set by the spec's '{RESERVED[full[0]]}' key instead")
    section, name = full[0].split(".")
    return section, name


def _coerce(where: str, default: Any, value: Any) -> Any:
    """`value` in the type of the field whose default is `default` (lists become tuples,
    "8x128" a (batch, sequence) shape)."""
    if isinstance(default, tuple):
        if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value.lower()):
            return tuple(int(v) for v in value.lower().split("x"))
        value = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(value, (list, tuple)):
            raise _fail(where, f"expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) if isinstance(default, bool) else True
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        raise _fail(where, f"expected {type(default).__name__}, got {value!r}")
    return value


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _sections(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = resolve_key(key)
        parts.setdefault(section, {})[name] = _coerce(f"settings.{key}", _default(SECTIONS[section], name), value)
    return parts


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def settings_for(spec: MatrixSpec, entry: ModelEntry, precision: str, sparsity: str | None,
                 output_dir: str | None = None) -> BuildSettings:
    """The `BuildSettings` of one cell: the spec's overrides, then the model's, then the cell's
    own model, precision, sparsity and text. Paths are made absolute (workers have another
    working directory); a model name that is an existing directory becomes its absolute path.

    Raises:
        CompilerError: an override the settings reject (their own checks), naming it.
    """
    parts = _sections(spec.overrides)
    for section, kw in _sections(entry.overrides).items():
        parts.setdefault(section, {}).update(kw)
    name = _absolute(entry.name) if Path(entry.name).expanduser().is_dir() else entry.name
    parts.setdefault("model", {}).update(name=name, weights=entry.weights)
    parts.setdefault("precision", {})["mode"] = precision
    parts.setdefault("sparsity", {})["pattern"] = sparsity
    data = parts.setdefault("data", {})
    if spec.calibration:
        data["path"] = _absolute(spec.calibration) if Path(spec.calibration).expanduser().exists() else spec.calibration
    if spec.training:
        data["train_path"] = tuple(_absolute(t) for t in spec.training)
    if "texts" in parts.get("vocab", {}):
        parts["vocab"]["texts"] = tuple(_absolute(t) for t in parts["vocab"]["texts"])
    out = _absolute(output_dir or spec.output_dir)
    engine = parts.setdefault("engine", {})
    engine["timing_cache_dir"] = _absolute(engine.get("timing_cache_dir", str(Path(out) / "timing_cache")))
    try:
        profile = ProfileSettings.fitted(**parts.pop("profile", {}))
        engine_settings = EngineSettings(profiles=(profile,), **parts.pop("engine"))
        return BuildSettings(**{s: SECTIONS[s](**kw) for s, kw in parts.items()}, engine=engine_settings,
                             output_dir=out)
    except (ValueError, TypeError) as e:
        raise _fail(f"model {entry.name} ({entry.weights}), {precision}", f"invalid settings: {e}") from e
