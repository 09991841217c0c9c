"""The deployment bundle: a Triton model repository, prepared here and built on the target.

`prepare_bundle` writes `<variant dir>/bundle/` (layout in docs/deploy.md):

    manifest.json  README.md
    <name>/config.pbtxt          platform "tensorrt_plan"; <name>/1/ holds the plan(s)
    <name>/tokenizer/  <name>/reference/model.fp32.onnx  [<name>/labels.txt: a classifier's class names]
    <name>_onnxruntime/config.pbtxt, <name>_onnxruntime/1/model.onnx   platform "onnxruntime_onnx"

The tokenizer and the FP32 reference sit inside the TensorRT model's folder: Triton ignores a model
folder's subfolders that are not numerically named (model_repository.md, "Model Versions"), while a
folder at the repository's top would be loaded as a model and fail, so the bundle serves as it is with
`tritonserver --model-repository=DIR`. Everything but the plan is written here, with `manifest.json["status"] == "prepared"`. `build_into_bundle` runs on
the GPU host (`python -m compiler build --bundle DIR`): it builds the plan from the bundle's own
TensorRT-ready ONNX, adds its `engines[]` entry (TensorRT version, GPU, compute capability,
build options, plan header), and with a second compute capability renames the plans to
`model.sm<cc>.plan`, mapped by Triton's `cc_model_filenames`. Either way the bundle is written
into a temporary folder beside it and renamed into place: never half a bundle. Every file is
at least 0644 (a copy on a server is readable by the server's user), otherwise following the umask.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.artifacts import sha256_file, temp_beside, umask, write_bytes, write_json, writing
from compiler.build.options import build_options
from compiler.build.profiles import onnx_input_dims, profile_shapes
from compiler.deploy import triton
from compiler.deploy.readme import BUILD_COMMAND, bundle_readme
from compiler.errors import CompilerError
from compiler.settings import BuildSettings, EngineSettings, ModelSettings, PrecisionSettings, ProfileSettings

if TYPE_CHECKING:
    from compiler.results import PipelineRun

log = logging.getLogger(__name__)

FORMAT = "trt-compiler-bundle/1"
MANIFEST = "manifest.json"
REFERENCE = "{name}/reference/model.fp32.onnx"  # inside the TensorRT model folder: Triton skips non-numeric subfolders
TOKENIZER_DIR = "{name}/tokenizer"
LABELS_FILE = "labels.txt"  # in each model folder: Triton's `label_filename` (classification extension)
# what `inspect`, `run` and `build --bundle` read from every manifest (`run` also RUN_KEYS)
MANIFEST_KEYS = ("name", "files", "io", "profiles", "engines", "onnxruntime")
RUN_KEYS = ("model", "tokenizer", "reference")
BUILD_OPTION_FIELDS = ("hardware_compat", "version_compatible", "exclude_lean_runtime", "workspace_mib",
                       "optimization_level")
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 16: "bfloat16"}


def bundle_name(model: str, variant: str) -> str:
    """The Triton model name: "<model>_<variant>" with anything outside [A-Za-z0-9_.-] made "_"
    (a local checkpoint path keeps its last folder name)."""
    base = Path(model.rstrip("/\\")).name or model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{base}_{variant}").strip("_.-") or "model"


def onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """{"inputs", "outputs": [{"name", "dtype" (NumPy name), "shape" (-1 where dynamic)}]} of an ONNX
    graph, read without its weights (initializers are not inputs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def entry(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]}

    return {"inputs": [entry(v) for v in model.graph.input if v.name not in inits],
            "outputs": [entry(v) for v in model.graph.output]}


def bundle_profiles(onnx_path: Path, profiles: tuple[ProfileSettings, ...]) -> list[dict[str, Any]]:
    """The optimization profiles as the manifest records them: [{input: {"min", "opt", "max": shape}}]
    (`compiler.build.profiles.profile_shapes`: batch on axis 0, sequence on axis 1)."""
    import onnx

    dims = onnx_input_dims(onnx.load(str(onnx_path), load_external_data=False))
    return [{name: {k: list(v) for k, v in s.items()} for name, s in profile_shapes(dims, p).items()}
            for p in profiles]


def precision_recipe(report: dict[str, Any], variant_onnx: Path) -> dict[str, Any]:
    """The manifest's `precision`: the mode, every FP32 node with the rule that kept it and why,
    the INT8 share of MatMul MACs, and the 2:4 check of the variant graph."""
    from compiler.graph.sparsity import check_2_4

    prec = report.get("precision") or {}
    quant = report.get("quantization") or {}
    sparse = check_2_4(variant_onnx).to_dict()
    return {
        "mode": prec.get("mode"), "nodes": prec.get("nodes"),
        "fp32_nodes": [{"node": n["name"], "op": n["op_type"], "rule": n["rule"], "value": n["detail"]}
                       for n in prec.get("fp32_nodes", [])],
        "matmul_fp16_fraction": prec.get("matmul_fp16_fraction"),
        "int8_mac_fraction": quant.get("int8_mac_fraction", 0.0),
        "quantization_method": quant.get("method"),
        "sparsity_2_4": {k: sparse.get(k) for k in ("eligible", "ineligible", "sparse_mac_fraction", "has_eligible")},
    }


def _copy_onnx(src: Path, dest: Path) -> None:
    """Copy an ONNX file and the external data files it names (kept under their names, beside it)."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    model = onnx.load(str(src), load_external_data=False)
    for name in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        shutil.copyfile(src.parent / name, dest.parent / name)


def _tool_versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"trt_compiler": version("trt-compiler"), "onnx": version("onnx"), "onnxruntime": version("onnxruntime")}


def _hash_files(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} of every file under `root` but the manifest."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST}


def _open_up(root: Path) -> None:
    """Folders (0755 | umask'd 0777) and files (0644 | umask'd 0666) readable by everyone."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        os.chmod(p, ((0o777 & ~mask) | 0o755) if p.is_dir() else ((0o666 & ~mask) | 0o644))


def finish_bundle(tmp: Path, manifest: dict[str, Any], dest: Path) -> None:
    """Write README, configs' hashes and the manifest into `tmp`, open its modes, swap it into `dest`."""
    write_bytes(tmp / "README.md", bundle_readme(manifest).encode())
    manifest["files"] = _hash_files(tmp)
    write_json(tmp / MANIFEST, manifest)
    _open_up(tmp)
    old = temp_beside(dest, directory=True) if dest.exists() else None
    if old is not None:
        os.rmdir(old)
        os.replace(dest, old)  # the old bundle steps aside; the new one takes its name
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_configs(root: Path, manifest: dict[str, Any]) -> None:
    name, engines = manifest["name"], manifest.get("engines") or []
    cc_files = {e["compute_capability"]: Path(e["file"]).name for e in engines} if len(engines) > 1 else None
    # a GPU missing from cc_model_filenames loads the default: a hardware-compatible (ampere+) plan if
    # there is one, else `model.plan`, absent once there are several plans (Triton then says so)
    default = next((Path(e["file"]).name for e in engines if e.get("hardware_compat") == "ampere+"),
                   triton.PLAN_FILENAME)
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    labels = manifest.get("labels") or {}
    trt = triton.tensorrt_config(name, manifest["io"], manifest["profiles"], cc_files, default)
    ort_io = manifest["onnxruntime"]["io"]
    ort = triton.onnxruntime_config(f"{name}_onnxruntime", ort_io, triton.max_batch_size(ort_io, manifest["profiles"]))
    # Triton's classification extension ranks one class vector per batch item: (batch, labels) only,
    # not token-classification's (batch, sequence, labels), whose labels.txt is for clients
    per_item = any(o["name"] == labels.get("output") and len(o["shape"]) == 2 for o in manifest["io"]["outputs"])
    for folder, config in ((name, trt), (f"{name}_onnxruntime", ort)):
        if labels:
            write_bytes(root / folder / LABELS_FILE, "".join(f"{n}\n" for n in labels["names"]).encode())
            if per_item:
                triton.set_label_file(config, labels["output"], LABELS_FILE)
        triton.write_config(root / folder / "config.pbtxt", config)


def prepare_bundle(settings: BuildSettings, run: PipelineRun | None = None, out_dir: Path | None = None,
                   command: str | None = None, ort_fp32: bool = False) -> Path:
    """Write the bundle of a verified variant: everything but the plan (status "prepared").

    Args:
        settings: the run's settings (model, precision, profiles, build options).
        run: a finished `run_pipeline(settings, until="verify")`; run here (caches reused) when None.
        out_dir: the bundle folder; default `settings.variant_dir() / "bundle"` (replaced atomically).
        command: the command line recorded in the manifest.
        ort_fp32: the ONNX Runtime model gets the FP32 graph (a CPU-only host) instead of the
            verified strongly typed one; the TensorRT-ready ONNX then lies in `<name>/model.onnx`.

    Returns:
        The bundle folder.

    Raises:
        compiler.errors.CompilerError: from the pipeline, or a folder that cannot be written.
    """
    if run is None:
        from compiler.pipeline import run_pipeline

        run = run_pipeline(settings, until="verify")
    report, variant = run.report, settings.variant_dir().name
    dest = Path(out_dir) if out_dir is not None else settings.variant_dir() / "bundle"
    name = bundle_name(settings.model.name, variant)
    ort_file = f"{name}_onnxruntime/1/{triton.ONNX_FILENAME}"
    reference, tokenizer_dir = REFERENCE.format(name=name), TOKENIZER_DIR.format(name=name)
    build_source = f"{name}/model.onnx" if ort_fp32 else ort_file
    with writing(dest, directory=True) as tmp:
        _copy_onnx(run.variant_onnx, tmp / build_source)
        _copy_onnx(run.reference_onnx, tmp / reference)
        if ort_fp32:
            _copy_onnx(run.fp32_onnx, tmp / ort_file)
        run.loaded.tokenizer.save_pretrained(str(tmp / tokenizer_dir))
        profiles = bundle_profiles(run.variant_onnx, settings.engine.profiles)
        manifest = {
            "format": FORMAT, "status": "prepared", "name": name,
            "model": {"name": settings.model.name, "weights": settings.model.weights,
                      "task": settings.model.task or "feature-extraction",
                      "source": report.get("model", {}).get("source"), "weights_key": run.loaded.key,
                      "source_sha256": sha256_file(run.reference_onnx)},
            "variant": variant, "command": command or f"python -m compiler bundle --model {settings.model.name} "
                                                     f"--precision {settings.precision.mode}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tool": _tool_versions(), "files": {},
            "io": onnx_io(tmp / build_source), "profiles": profiles,
            "build_options": build_options(settings.engine),
            "build_source": {"file": build_source, "onnx_sha256": report.get("onnx_sha256")},
            "engines": [],
            "onnxruntime": {"file": ort_file, "precision": "fp32" if ort_fp32 else variant,
                            "io": onnx_io(tmp / ort_file)},
            "reference": {"file": reference},
            "tokenizer": {"dir": tokenizer_dir, "max_length": max(p.max_shape[1] for p in settings.engine.profiles),
                          "note": report.get("model", {}).get("tokenizer_note")},
            "precision": precision_recipe(report, run.variant_onnx),
            "fidelity": report.get("fidelity"),
        }
        if getattr(run.loaded, "labels", None):  # classification: names in id order, as Triton's labels.txt
            from compiler.training.models import checkpoint_config

            problem = getattr(checkpoint_config(settings.model)[1], "problem_type", None)  # multi-label, regression
            names = list(run.loaded.labels)  # one logit without a problem_type: regression, as transformers reads it
            manifest["labels"] = {"output": "logits", "names": names, "file": LABELS_FILE, "problem_type": problem or (
                "regression" if len(names) == 1 and settings.model.task == "text-classification"
                else "single_label_classification")}
        _write_configs(tmp, manifest)
        finish_bundle(tmp, manifest, dest)
    log.info("bundle prepared: %s", dest)
    return dest


def read_manifest(bundle_dir: Path, need: tuple[str, ...] = MANIFEST_KEYS) -> dict[str, Any]:
    """The bundle's manifest.json, holding at least the keys `need`.

    Raises:
        compiler.errors.CompilerError: no manifest (not a bundle), unreadable JSON, another format,
            or a key of `need` missing.
    """
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise CompilerError(f"{bundle_dir}: not a bundle (no {MANIFEST}); make one with `python -m compiler bundle "
                            "--model NAME --precision MODE` (or `make bundle`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CompilerError(f"{path}: not readable JSON ({e}); make the bundle again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CompilerError(f"{path}: format {found!r}, expected {FORMAT!r}; make the bundle again "
                            "with this version of trt-compiler")
    missing = [k for k in need if k not in manifest]
    if missing:
        raise CompilerError(f"{path}: lacks {', '.join(missing)} (edited by hand, or cut short); make the bundle "
                            "again with `python -m compiler bundle`")
    return manifest


def build_here_problem() -> str | None:
    """Why no plan can be built on this machine (no TensorRT, no GPU), or None when one can."""
    from compiler.build.device import GpuInfo, find_gpu
    from compiler.build.engine import tensorrt_problem

    gpu = find_gpu()
    problems = [p for p in (tensorrt_problem(), None if isinstance(gpu, GpuInfo) else f"no usable GPU: {gpu}") if p]
    return "; ".join(problems) or None


def bundle_engine_settings(manifest: dict[str, Any], engine: EngineSettings | None = None) -> EngineSettings:
    """The EngineSettings a bundle's plan is built with: its profiles and build options, or those of
    `engine` (given on the GPU host) where they differ from the defaults."""
    profiles = tuple(_profile_settings(p) for p in manifest["profiles"])
    fields, default = {f.name for f in dataclasses.fields(EngineSettings)}, EngineSettings()
    options = {k: v for k, v in (manifest.get("build_options") or {}).items() if k in fields and v is not None}
    if engine is not None:
        options.update({k: getattr(engine, k) for k in BUILD_OPTION_FIELDS if getattr(engine, k) != getattr(default, k)})
        if engine.profiles != default.profiles:
            profiles = engine.profiles
            if len(profiles) == 1 and any(_is_cache(t) for t in manifest["io"]["inputs"]):
                from compiler.training.tasks import kv_cache_profiles  # context + decode, as `bundle` made them

                profiles = kv_cache_profiles(profiles[0], profiles[0].max_past or max(1, profiles[0].max_shape[1] - 1))
    return dataclasses.replace(default, profiles=profiles, **options)


def _is_cache(tensor: dict[str, Any]) -> bool:
    return tensor["name"].startswith("past_key_values.") and len(tensor["shape"]) == 4


def _profile_settings(profile: dict[str, Any]) -> ProfileSettings:
    """A manifest profile back as ProfileSettings: (batch, sequence) of `input_ids` (else the first
    input), the past from axis 2 of a KV-cache input (`past_key_values.*`, rank 4) where there is one."""
    s = profile.get("input_ids") or next(iter(profile.values()))
    cache = next((v for k, v in profile.items() if _is_cache({"name": k, "shape": v["min"]})), None)
    past = {f"{c}_past": int(cache[c][2]) for c in ("min", "opt", "max")} if cache else {}
    return ProfileSettings(min_shape=tuple(s["min"][:2]), opt_shape=tuple(s["opt"][:2]), max_shape=tuple(s["max"][:2]),
                           **past)


def _engine_entry(built: dict[str, Any], plan: Path, eng: EngineSettings) -> dict[str, Any]:
    from compiler.deploy.plan import read_plan_header

    gpu = built["gpu"]
    return {"file": "", "compute_capability": gpu["compute_capability"], "gpu": gpu,
            "tensorrt_version": built["tensorrt_version"], "cuda_version": built.get("cuda_version"),
            "hardware_compat": eng.hardware_compat, "version_compatible": eng.version_compatible,
            "exclude_lean_runtime": eng.exclude_lean_runtime,
            "plan_header": built.get("plan_header") or read_plan_header(plan).to_dict(), "sha256": sha256_file(plan),
            "bytes": plan.stat().st_size, "build_seconds": built.get("build_seconds")}


def _place_plans(root: Path, manifest: dict[str, Any], entry: dict[str, Any], plan: Path) -> None:
    """Put the new plan in `<name>/1/`, replacing one of the same compute capability; name the plans
    `model.plan` (one) or `model.sm<cc>.plan` (several)."""
    name = manifest["name"]
    engines = [e for e in manifest["engines"] if e["compute_capability"] != entry["compute_capability"]]
    for old in manifest["engines"]:
        if old not in engines:
            (root / old["file"]).unlink(missing_ok=True)
    engines.append(entry)
    staged = {}
    for e in engines:  # move every plan aside first: renames may swap names
        src = plan if e is entry else root / e["file"]
        staged[id(e)] = root / name / f".{e['compute_capability']}.staged"
        shutil.move(str(src), staged[id(e)])
    for e in engines:
        file = triton.PLAN_FILENAME if len(engines) == 1 else f"model.sm{e['compute_capability'].replace('.', '')}.plan"
        e["file"] = f"{name}/1/{file}"
        os.replace(staged[id(e)], root / e["file"])
    manifest["engines"] = sorted(engines, key=lambda e: e["compute_capability"])


def build_into_bundle(bundle_dir: Path, engine: EngineSettings | None = None, command: str | None = None) -> dict:
    """Build the plan for this host's GPU from the bundle's own TensorRT-ready ONNX and add it.

    Checks every file's hash first (a tampered bundle is never built). The bundle is copied
    (hard links) into a temporary folder beside it, the plan built there
    (`compiler.build.engine.engine_from_onnx`), configs and manifest rewritten, and the folder
    swapped into place.

    Args:
        bundle_dir: a bundle made by `prepare_bundle`.
        engine: build options given on this host (hardware compatibility, version compatibility...);
            None: the bundle's recorded ones.
        command: the command line, recorded in the manifest's `builds`.

    Returns:
        The new manifest.

    Raises:
        compiler.errors.TensorRTUnavailableError: (exit 2) no TensorRT or no GPU here.
        compiler.errors.DeploymentRefusedError: (exit 4) a file's hash differs from the manifest.
        compiler.errors.EngineBuildError: TensorRT could not build the plan.
    """
    from compiler.build.engine import check_tensorrt, engine_from_onnx
    from compiler.deploy.checks import check_file_hashes

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    check_file_hashes(bundle_dir, manifest["files"])
    eng = bundle_engine_settings(manifest, engine)
    source = bundle_dir / manifest["build_source"]["file"]
    check_tensorrt(source, engine=eng)
    profiles = bundle_profiles(source, eng.profiles)
    if profiles != manifest["profiles"]:  # new profiles: plans built for the old ones no longer match the configs
        if manifest["engines"]:
            log.warning("new optimization profiles %s: the plans built for the old ones (%s) are dropped",
                        profiles, ", ".join(e["file"] for e in manifest["engines"]))
        manifest.update(profiles=profiles, engines=[])
        manifest["tokenizer"]["max_length"] = max(p.max_shape[1] for p in eng.profiles)
    prec = manifest["precision"].get("mode") or "hybrid"
    settings = BuildSettings(model=ModelSettings(name=manifest["model"]["name"], weights=manifest["model"]["weights"]),
                             precision=PrecisionSettings(mode=prec), engine=eng)
    with writing(bundle_dir, directory=True) as tmp:
        shutil.copytree(bundle_dir, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        (tmp / MANIFEST).unlink()
        work = tmp / ".build"
        _copy_onnx(bundle_dir / manifest["build_source"]["file"], work / "model.onnx")
        plan, built = engine_from_onnx(work / "model.onnx", settings,
                                       {"precision": None, "fidelity": manifest.get("fidelity")})
        entry = _engine_entry(built, plan, eng)
        kept = {e["file"] for e in manifest["engines"]}
        for stale in (tmp / manifest["name"] / "1").glob("*.plan"):  # plans of dropped profiles
            if stale.relative_to(tmp).as_posix() not in kept:
                stale.unlink()
        _place_plans(tmp, manifest, entry, plan)
        shutil.rmtree(work)
        manifest["io"] = {"inputs": built["inputs"], "outputs": built["outputs"]}  # as TensorRT stores them
        manifest["build_options"] = build_options(eng)
        manifest["status"] = "built"
        manifest.setdefault("builds", []).append(command or BUILD_COMMAND.format(dir=shlex.quote(str(bundle_dir))))
        _write_configs(tmp, manifest)
        finish_bundle(tmp, manifest, bundle_dir)
    return manifest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # files are replaced, never edited in place: a hard link is a safe copy
    except OSError:
        shutil.copy2(src, dst)
