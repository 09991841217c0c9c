"""`python -m compiler inspect FILE|DIR`: what a plan, an ONNX model or a bundle holds, and what
this host can run of it. Needs no TensorRT and no GPU.

- A plan (`*.plan`, or any file that starts with the plan tag): its header (the TensorRT version
  that built it, `compiler.deploy.plan.read_plan_header`), size and sha256, and whether the
  installed TensorRT loads it.
- An ONNX model: opset, I/O (names, dtypes, shapes), compute nodes per precision (FP32 / FP16 /
  BF16, by the type of what they compute; Casts, Q/DQ and Constants counted apart), MatMul/Gemm per
  precision (INT8 where both operands come from a DequantizeLinear), Q/DQ pairs, and the GEMMs
  whose constant weight is 2:4 sparse along the reduction axis (`compiler.graph.sparsity.check_2_4`).
- A bundle (a folder with `manifest.json`, `compiler.deploy.bundle`): every file's hash checked
  (`checks.check_file_hashes`), the manifest's summary, and per engine whether this host runs it
  (TensorRT version, GPU compute capability, host code), and ONNX Runtime's providers here.

`inspect_path` returns a JSON-ready dict (`--json` prints it); `format_report` the text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from shlex import quote
from typing import Any

from compiler.artifacts import sha256_file
from compiler.build.device import GpuInfo, find_gpu
from compiler.deploy import checks
from compiler.deploy.plan import read_plan_header
from compiler.errors import CompilerError, DeploymentRefusedError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
NOT_COMPUTE = ("Constant", "Cast", *QDQ_OPS)
FLOAT_NAMES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Inspect a plan, an ONNX model or a bundle folder.

    Returns:
        {"kind": "plan" | "onnx" | "bundle", "path": str, ...} (see `inspect_plan`,
        `inspect_onnx`, `inspect_bundle`).

    Raises:
        CompilerError: (exit 1) `path` does not exist, is a folder without `manifest.json`, or
            is neither ONNX nor a TensorRT 8.6+ plan (the message says which and why).
    """
    path = Path(path)
    if path.is_dir():
        return inspect_bundle(path)
    if not path.is_file():
        raise CompilerError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".onnx":
        return inspect_onnx(path)
    try:
        return inspect_plan(path)
    except DeploymentRefusedError as e:  # bad input here (exit 1): the same words
        raise CompilerError(str(e)) from None


def host_report() -> dict[str, Any]:
    """What this host has: {"tensorrt": version or None, "tensorrt_problem": why not or None,
    "gpu": GpuInfo dict or None, "gpu_problem", "onnxruntime": version or None,
    "onnxruntime_providers": [...]}."""
    from compiler.build.engine import tensorrt_problem

    report: dict[str, Any] = {"tensorrt": None, "tensorrt_problem": tensorrt_problem()}
    if report["tensorrt_problem"] is None:
        import tensorrt

        report["tensorrt"] = tensorrt.__version__
    gpu = find_gpu()
    report["gpu"], report["gpu_problem"] = (gpu.to_dict(), None) if isinstance(gpu, GpuInfo) else (None, gpu)
    try:
        import onnxruntime

        report["onnxruntime"], report["onnxruntime_providers"] = (onnxruntime.__version__,
                                                                  list(onnxruntime.get_available_providers()))
    except ImportError as e:
        report["onnxruntime"], report["onnxruntime_providers"] = None, []
        report["onnxruntime_problem"] = str(e)
    return report


def inspect_plan(path: Path, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plan file: {"kind": "plan", "path", "bytes", "sha256", "header": {"version": [...]},
    "tensorrt_version": "11.4.0.106", "host": `host_report()`, "loads_here": {"exact":
    bool | None, "if_version_compatible": bool | None} (None without TensorRT here)}.

    Raises:
        DeploymentRefusedError: (check "plan format") not a TensorRT 8.6+ plan.
    """
    header = read_plan_header(path)
    host = host_report() if host is None else host
    loads: dict[str, bool | None] = {"exact": None, "if_version_compatible": None}
    if host["tensorrt"]:
        for key, compatible in (("exact", False), ("if_version_compatible", True)):
            try:
                checks.check_tensorrt_version(header.version, host["tensorrt"], compatible)
                loads[key] = True
            except DeploymentRefusedError:
                loads[key] = False
    return {"kind": "plan", "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "header": header.to_dict(), "tensorrt_version": header.version_string, "host": host, "loads_here": loads}


def _dtype(elem: int) -> str:
    import onnx
    from onnx import helper

    try:
        return str(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem).lower()


def _io(values: Any) -> list[dict[str, Any]]:
    return [{"name": v.name, "dtype": _dtype(v.type.tensor_type.elem_type),
             "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in v.type.tensor_type.shape.dim]} for v in values]


def precision_counts(model: Any) -> dict[str, Any]:
    """Compute nodes per precision, Casts, MatMul/Gemm per precision and Q/DQ pairs of an ONNX graph.

    A compute node is any node but Constant, Cast, QuantizeLinear and DequantizeLinear; its
    precision is that of its first float output (fp32 / fp16 / bf16), "other" when it computes no
    float (shapes, indices). A MatMul/Gemm is "int8" when both its operands come out of a
    DequantizeLinear (explicit Q/DQ quantization, which TensorRT fuses into an INT8 GEMM).

    Returns:
        {"nodes": total, "compute": {"fp32": n, "fp16": n, ...}, "casts": {"to fp16": n, ...},
        "matmuls": {"int8": n, "fp16": n, "fp32": n}, "qdq": {"quantize": n, "dequantize": n,
        "pairs": Q->DQ edges, "weight_dequantize": DQ of an initializer}, "by_op": {op: {precision: n}}}
        ("compute"/"matmuls"/"by_op" are None when ONNX shape inference cannot type the graph).
    """
    from compiler.errors import PrecisionError
    from compiler.graph.analysis import GEMM_OPS, tensor_types

    nodes = list(model.graph.node)
    producer = {t: n for n in nodes for t in n.output}
    inits = {t.name for t in model.graph.initializer}
    ops = Counter(n.op_type for n in nodes)
    casts = Counter(f"to {FLOAT_NAMES.get(_attr_int(n, 'to'), _dtype(_attr_int(n, 'to')))}"
                    for n in nodes if n.op_type == "Cast")
    pairs = sum(1 for n in nodes if n.op_type == "DequantizeLinear"
                and getattr(producer.get(n.input[0]), "op_type", None) == "QuantizeLinear")
    qdq = {"quantize": ops["QuantizeLinear"], "dequantize": ops["DequantizeLinear"], "pairs": pairs,
           "weight_dequantize": sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits)}
    result: dict[str, Any] = {"nodes": len(nodes), "compute": None, "casts": dict(casts), "matmuls": None,
                              "qdq": qdq, "by_op": None}
    try:
        types = tensor_types(model)
    except PrecisionError as e:
        result["types_problem"] = str(e)
        return result
    compute: Counter = Counter()
    matmuls: Counter = Counter()
    by_op: dict[str, Counter] = {}
    for n in nodes:
        if n.op_type in NOT_COMPUTE:
            continue
        precision = next((FLOAT_NAMES[types[t]] for t in n.output if types.get(t) in FLOAT_NAMES), "other")
        compute[precision] += 1
        by_op.setdefault(n.op_type, Counter())[precision] += 1
        if n.op_type in GEMM_OPS:
            dq = all(getattr(producer.get(t), "op_type", None) == "DequantizeLinear" for t in n.input[:2])
            matmuls["int8" if dq else precision] += 1
    result.update(compute=dict(compute), matmuls=dict(matmuls),
                  by_op={op: dict(c) for op, c in sorted(by_op.items())})
    return result


def _attr_int(node: Any, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def inspect_onnx(path: Path) -> dict[str, Any]:
    """An ONNX model: {"kind": "onnx", "path", "mib", "sha256", "ir_version", "opset": {domain:
    version}, "producer", "inputs"/"outputs": [{"name", "dtype", "shape"}], "precision":
    `precision_counts`, "tensorrt_ready": None or why not (ops of another domain),
    "sparsity_2_4": {"eligible", "ineligible", "activation_matmuls", "sparse_mac_fraction",
    "eligible_nodes"}}.

    Raises:
        InvalidOnnxError: `path` is not readable ONNX or fails `onnx.checker`.
    """
    from compiler.graph.onnx_io import load_onnx, onnx_mib, onnx_sha256
    from compiler.graph.sparsity import check_2_4

    model = load_onnx(path)
    report: dict[str, Any] = {
        "kind": "onnx", "path": str(path), "mib": onnx_mib(path), "sha256": onnx_sha256(path),
        "ir_version": model.ir_version, "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
        "precision": precision_counts(model),
        "tensorrt_ready": _tensorrt_ready(model),
    }
    try:
        sparse = check_2_4(model).to_dict()
        report["sparsity_2_4"] = {k: sparse[k] for k in ("eligible", "ineligible", "activation_matmuls",
                                                          "sparse_mac_fraction")}
        report["sparsity_2_4"]["eligible_nodes"] = [g["node"] for g in sparse["gemms"] if g["eligible"]]
    except CompilerError as e:
        report["sparsity_2_4"] = {"problem": str(e)}
    return report


def _tensorrt_ready(model: Any) -> str | None:
    """None where TensorRT's ONNX parser takes the graph's ops (the standard domain, as the
    precision pass requires: `check_fp32_straight_line`), else why not."""
    from compiler.graph.onnx_io import foreign_ops

    foreign = sorted(foreign_ops(model))
    if foreign:
        return (f"ops outside the standard ONNX domain ({', '.join(foreign)}): TensorRT's ONNX parser takes "
                "standard ops only")
    return None


def inspect_bundle(bundle: Path, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """A bundle folder: {"kind": "bundle", "path", "hashes": {"ok", "files", "bytes", "message"},
    "summary": the manifest's name, status, model, variant, io, profiles, build options, precision,
    fidelity, "engines": [{..., "runs_here": bool, "problems": [...]}], "selected_engine",
    "onnxruntime": {"file", "runs_here", "providers"}, "host": `host_report()`}.

    Never raises for a failed hash: `hashes.ok` is False and `message` holds the refusal (the
    CLI exits 4).

    Raises:
        CompilerError: not a bundle (`compiler.deploy.bundle.read_manifest`: no manifest.json,
            not JSON, another format).
    """
    from compiler.deploy.bundle import read_manifest

    manifest = read_manifest(bundle)
    files = manifest.get("files") or {}
    hashes: dict[str, Any] = {"ok": True, "files": len(files),
                              "bytes": sum(int(e.get("bytes", 0)) for e in files.values()), "message": None}
    try:
        checks.check_file_hashes(bundle, files)
    except DeploymentRefusedError as e:
        hashes.update(ok=False, message=str(e))
    host = host_report() if host is None else host
    engines = [_engine_here(bundle, e, manifest, host) for e in manifest.get("engines") or []]
    selected = None
    if host["gpu"] and manifest.get("engines"):
        try:
            selected = checks.select_engine(manifest["engines"], host["gpu"]["compute_capability"],
                                            device_gpu=host["gpu"]["name"], bundle=bundle)["file"]
        except DeploymentRefusedError:
            selected = None
    ort = manifest.get("onnxruntime") or {}
    summary = {k: manifest.get(k) for k in ("name", "status", "model", "variant", "created", "command", "io",
                                            "profiles", "build_options", "tokenizer", "labels")}
    summary["precision"] = {k: (manifest.get("precision") or {}).get(k) for k in ("mode", "int8_mac_fraction")}
    summary["precision"]["fp32_nodes"] = len((manifest.get("precision") or {}).get("fp32_nodes") or [])
    summary["fidelity"] = _fidelity_summary(manifest.get("fidelity"))
    return {"kind": "bundle", "path": str(bundle), "hashes": hashes, "summary": summary, "engines": engines,
            "selected_engine": selected, "host": host,
            "onnxruntime": {"file": ort.get("file"), "precision": ort.get("precision"),
                            "runs_here": "CPUExecutionProvider" in host["onnxruntime_providers"],
                            "providers": host["onnxruntime_providers"]}}


def _fidelity_summary(fidelity: Any) -> dict[str, Any] | None:
    if not isinstance(fidelity, dict):
        return None
    keys = ("samples", "cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count")
    out = {name: {k: fidelity[name].get(k) for k in keys} for name in ("real", "random")
           if isinstance(fidelity.get(name), dict)}
    return out or None


def _engine_here(bundle: Path, entry: dict, manifest: dict, host: dict[str, Any]) -> dict[str, Any]:
    """One manifest engine and whether this host runs it: problems lists each refusal's message."""
    options = {**(manifest.get("build_options") or {}), **entry}
    out = {k: entry.get(k) for k in ("file", "compute_capability", "tensorrt_version", "hardware_compat",
                                     "version_compatible", "exclude_lean_runtime", "gpu")}
    problems, notes = [], []
    plan_path = bundle / str(entry.get("file", ""))
    version = (entry.get("plan_header") or {}).get("version")
    if plan_path.is_file():
        try:
            version = list(read_plan_header(plan_path).version)
        except (DeploymentRefusedError, CompilerError) as e:
            problems.append(str(e))
    out["plan_version"] = version
    if not host["tensorrt"]:
        problems.append(f"no TensorRT here: {host['tensorrt_problem']}")
    elif version:
        _collect(problems, checks.check_tensorrt_version, version, host["tensorrt"],
                 bool(options.get("version_compatible")), bundle=bundle)
    if not host["gpu"]:
        problems.append(f"no GPU here: {host['gpu_problem']}")
    else:
        _collect(problems, checks.check_compute_capability, str(entry.get("compute_capability")),
                 host["gpu"]["compute_capability"], options.get("hardware_compat", "none"), bundle=bundle)
    try:
        checks.check_host_code(bool(options.get("version_compatible")), bool(options.get("exclude_lean_runtime")),
                               False)
    except DeploymentRefusedError:
        notes.append("carries host code (lean runtime): loads only with --allow-host-code")
    out.update(runs_here=not problems, problems=problems, notes=notes)
    return out


def _collect(problems: list[str], check: Any, *args: Any, **kw: Any) -> None:
    try:
        check(*args, **kw)
    except DeploymentRefusedError as e:
        problems.append(str(e))


# --- text output -------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The human-readable text of an `inspect_path` report."""
    kind = report["kind"]
    lines = {"plan": _format_plan, "onnx": _format_onnx, "bundle": _format_bundle}[kind](report)
    return "\n".join(lines)


def _format_host(host: dict[str, Any]) -> list[str]:
    gpu = host["gpu"]
    return [
        f"  TensorRT: {host['tensorrt'] or 'not importable (' + str(host['tensorrt_problem']) + ')'}",
        f"  GPU: {gpu['name'] + ', compute capability ' + gpu['compute_capability'] if gpu else 'none (' + str(host['gpu_problem']) + ')'}",
        f"  ONNX Runtime: {host.get('onnxruntime') or 'not installed'}, providers "
        f"{', '.join(host.get('onnxruntime_providers') or []) or '-'}",
    ]


def _format_plan(r: dict[str, Any]) -> list[str]:
    loads, version = r["loads_here"], r["tensorrt_version"]
    major = version.split(".")[0]
    later = f"{version} or a later {major}.x" + (" (or 11.x)" if major == "10" else " (or 10.x)" if major == "8" else "")
    word = {True: "yes", False: "no"}
    here = (f"standard: {word[loads['exact']]}, version-compatible: {word[loads['if_version_compatible']]}"
            if loads["exact"] is not None else "unknown: no TensorRT here")
    return [
        f"plan {r['path']}",
        f"  built by TensorRT {r['tensorrt_version']} (header bytes 24..27; tag 'ftrt', layout 0)",
        f"  size {r['bytes']} bytes ({r['bytes'] / 2**20:.2f} MiB), sha256 {r['sha256']}",
        f"  loads on TensorRT {version} exactly; built --version-compatible, on TensorRT {later}",
        "this host:", *_format_host(r["host"]),
        f"  loads here: {here}",
    ]


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "-"


def _format_onnx(r: dict[str, Any]) -> list[str]:
    p, sp = r["precision"], r["sparsity_2_4"]
    opset = ", ".join(f"{d} {v}" for d, v in r["opset"].items())
    lines = [f"ONNX {r['path']}",
             f"  {r['mib']} MiB, sha256 {r['sha256']}, IR {r['ir_version']}, opset {opset}, producer {r['producer'] or '-'}"]
    for side in ("inputs", "outputs"):
        lines.append(f"  {side}:")
        lines += [f"    {t['name']}: {t['dtype']} {_shape_text(t['shape'])}" for t in r[side]]
    lines += [f"  nodes: {p['nodes']}",
              f"  compute nodes by precision: {_counts(p['compute'])}"
              + ("" if p["compute"] is not None else f" (types unknown: {p.get('types_problem')})"),
              f"  MatMul/Gemm by precision: {_counts(p['matmuls'])}",
              f"  Casts: {sum(p['casts'].values())} ({_counts(p['casts'])})",
              f"  Q/DQ: {p['qdq']['quantize']} QuantizeLinear, {p['qdq']['dequantize']} DequantizeLinear, "
              f"{p['qdq']['pairs']} Q->DQ pairs, {p['qdq']['weight_dequantize']} weight DQ"]
    if r.get("tensorrt_ready"):
        lines.append(f"  not TensorRT-ready: {r['tensorrt_ready']}")
    if "problem" in sp:
        lines.append(f"  2:4 sparsity: not checked ({sp['problem']})")
    else:
        lines.append(f"  2:4-eligible GEMMs: {sp['eligible']} of {sp['eligible'] + sp['ineligible']} with a constant "
                     f"weight (sparse MAC share {sp['sparse_mac_fraction']:.3f}; {sp['activation_matmuls']} "
                     "activation MatMuls never sparse)")
    return lines


def _num(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _format_bundle(r: dict[str, Any]) -> list[str]:
    s, h = r["summary"], r["hashes"]
    model = s.get("model") or {}
    lines = [f"bundle {r['path']}: {s.get('name')} ({s.get('status')}), model {model.get('name')} "
             f"({model.get('weights')}), task {model.get('task', 'feature-extraction')}, variant {s.get('variant')}, "
             f"made {s.get('created')}",
             f"  files: {h['files']} ({h['bytes'] / 2**20:.1f} MiB): "
             + ("every sha256 matches the manifest" if h["ok"] else "HASH CHECK FAILED")]
    if not h["ok"]:
        lines += ["    " + line for line in str(h["message"]).splitlines()]
    io = s.get("io") or {}
    for side in ("inputs", "outputs"):
        lines.append(f"  {side}: " + "; ".join(f"{t.get('name')} {t.get('dtype')} {_shape_text(t.get('shape') or [])}"
                                               for t in io.get(side) or []))
    for i, profile in enumerate(s.get("profiles") or []):
        lines.append(f"  profile {i}: " + "; ".join(
            f"{name} {'x'.join(map(str, c['min']))}..{'x'.join(map(str, c['opt']))}..{'x'.join(map(str, c['max']))}"
            for name, c in profile.items()))
    if s.get("labels"):
        names = s["labels"].get("names") or []
        lines.append(f"  labels ({s['labels'].get('output')}, {s['labels'].get('file')}): {len(names)} classes, "
                     + ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else ""))
    opts = s.get("build_options") or {}
    lines.append("  build options: " + ", ".join(f"{k} {v}" for k, v in opts.items()))
    prec = s["precision"]
    lines.append(f"  precision {prec.get('mode')}: {prec.get('fp32_nodes')} FP32 nodes"
                 + (f", INT8 MAC share {prec['int8_mac_fraction']}" if prec.get("int8_mac_fraction") else ""))
    for name, f in (s.get("fidelity") or {}).items():
        lines.append(f"  fidelity {name}: cosine min {_num(f.get('cosine_min'))}, mean {_num(f.get('cosine_mean'))}, "
                     f"max abs err {_num(f.get('max_abs_err'))}, non-finite {f.get('nonfinite_count')} "
                     f"({f.get('samples')} samples)")
    lines += ["this host:", *_format_host(r["host"])]
    if not r["engines"]:
        lines.append("  TensorRT engines: none yet (build one on the GPU host: "
                     f"`python -m compiler build --bundle {quote(r['path'])}`)")
    for e in r["engines"]:
        lines.append(f"  engine {e['file']} (compute capability {e['compute_capability']}, TensorRT "
                     f"{e['tensorrt_version']}, hardware compat {e.get('hardware_compat')}): "
                     + ("runs here" + (" (selected)" if e["file"] == r["selected_engine"] else "")
                        if e["runs_here"] else "does not run here"))
        lines += [f"    {'-' if j == 0 else ' '} {line}" for p in e["problems"] for j, line in enumerate(p.splitlines())]
        lines += [f"    - {n}" for n in e["notes"]]
    ort = r["onnxruntime"]
    lines.append(f"  ONNX Runtime model {ort['file']} ({ort.get('precision')}): "
                 + ("runs here (CPUExecutionProvider)" if ort["runs_here"] else "no ONNX Runtime CPU provider here"))
    return lines


# --- the `inspect` subcommand --------------------------------------------------------------------


def add_inspect_arguments(parser: Any) -> None:
    """`python -m compiler inspect PATH [--json]`."""
    parser.add_argument("path", type=Path, help="a TensorRT plan, an ONNX model, or a bundle folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def inspect_command(args: Any) -> int:
    """Print the report of `args.path`; exit 0, 4 (EXIT_REFUSED) when a bundle's hashes fail.

    Raises:
        CompilerError: (exit 1) bad input (see `inspect_path`).
    """
    from compiler.errors import EXIT_OK, EXIT_REFUSED

    report = inspect_path(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if report["kind"] == "bundle" and not report["hashes"]["ok"]:
        import sys

        print(f"error: {report['hashes']['message']}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK
