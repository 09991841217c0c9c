"""The pipeline: the stages in order, each taking its settings and typed inputs, returning a typed result.

    export -> sparsity -> quantize -> precision -> verify -> build

`run_pipeline` below is that list, written out. `sparsity` (SPARSITY=2:4) and `quantize`
(PRECISION=int8 / int8-qat) return None unless asked for. Each result holds its artifact paths
and its section of `report.json`; the report is assembled from the results (`PipelineRun.report`).
Every reusable artifact goes through `compiler.artifacts.cached` (reused only when its content
key, a hash of input bytes, settings and texts, is unchanged).

Artifacts: the dense FP32 export (the reference of every fidelity figure) is
`engines/<model>/<weights>/model.fp32.onnx` (`model.fp32.opset19.onnx` for INT8, whose Q/DQ
need opset 19) with `export_report.json`. A 2:4 sparse model gets its own FP32 export in
`engines/<model>/<weights>/sparse24/`. Under `settings.variant_dir()` (the base folder plus
the precision): `model.onnx` (TensorRT-ready, strongly typed), `precision_report.json`,
`report.json`, for INT8 `model.qdq.onnx` (FP32 + Q/DQ) and `quant_report.json`, and
`model.plan` with `manifest.json` (build stage).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from calibration.layout import TokenSets, heldout_texts, vocabulary_texts
from calibration.text import tokenized_set
from calibration.vocabulary import choose_vocabulary, count_tokens, oov_rate, special_token_ids
from compiler.artifacts import atomic_write, cached, fix_mmap_threshold, run_in_child, write_json
from compiler.build.engine import engine_from_onnx, sparse_weights_flag
from compiler.eval.fidelity import FidelityProbe
from compiler.eval.verify import verify_variant
from compiler.graph.onnx_io import load_onnx, onnx_sha256, save_onnx
from compiler.graph.sparsity import groups_check, require_2_4
from compiler.passes.auto_precision import auto_precision
from compiler.passes.precision import convert_precision
from compiler.passes.vocab_prune import prune_vocabulary
from compiler.quant.budget import quantize_within_budget
from compiler.training.export import onnx_from_torch
from compiler.training.models import load_model
from compiler.training.prune import hold_masks, input_axis, prune_2_4, recover
from compiler.errors import CompilerError
from compiler.settings import INT8_MODES, BuildSettings, settings_hash

from compiler.results import (STAGES, BuildResult, ExportResult, PipelineRun, PrecisionResult, QuantizeResult,
                              SparsityResult, VerifyResult, VocabResult)

log = logging.getLogger(__name__)


def run_pipeline(settings: BuildSettings, until: str = "build",
                 after: dict[str, Callable[[PipelineRun], None]] | None = None) -> PipelineRun:
    """Run the stages in order up to and including `until`.

    Args:
        settings: the one settings tree (logged at DEBUG, written into report.json).
        until: the last stage, one of `STAGES`.
        after: {stage name: callback} called with the run as soon as that stage is done (the CLI
            prints the fidelity table after verify, before a build that may stop).

    Returns:
        PipelineRun with each stage's result; report.json is written after verify.

    Raises:
        ValueError: `until` is not a stage.
        compiler.errors.CompilerError: from any stage (exit status 1, or 2 where TensorRT or a
            GPU is missing); artifacts of finished stages remain.
    """
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {list(STAGES)}")
    log.debug("settings: %s", settings)
    last = STAGES.index(until)
    runs = lambda stage: STAGES.index(stage) <= last  # noqa: E731
    run = PipelineRun(settings)
    with run.timed("export"):
        run.export = stage_export(settings)
    tokens = TokenSets(settings.data, run.export.loaded.tokenizer, settings.train.batch_size,
                       heldout=run.export.heldout_texts)
    if runs("sparsity") and settings.sparsity.pattern is not None:
        with run.timed("sparsity"):
            run.sparsity = stage_sparsity(settings, run.export, tokens)
        if settings.precision.mode != "int8-qat":
            run.export.loaded.module = None  # only QAT needs PyTorch after this
    if runs("quantize") and settings.precision.mode in INT8_MODES:
        with run.timed("quantize"):
            run.quantize = stage_quantize(settings, run.export, run.sparsity, tokens)
    if runs("quantize"):
        run.export.loaded.module = None  # no later stage needs PyTorch
        if run.sparsity:
            run.sparsity.student = None
    if runs("vocab") and settings.vocab.texts:
        with run.timed("vocab"):
            run.vocab = stage_vocab(settings, run.export, run.qdq_onnx or run.fp32_onnx, tokens)
    if runs("precision"):
        with run.timed("precision"):
            source = run.vocab.onnx if run.vocab else run.qdq_onnx or run.fp32_onnx
            run.precision = stage_precision(settings, run.export, source, run.qdq_onnx is not None, tokens)
    if runs("verify"):
        with run.timed("verify"):
            run.verify = stage_verify(settings, run.export, run.precision, tokens)
        write_json(settings.variant_dir() / "report.json", run.report)
        if after and "verify" in after:
            after["verify"](run)
    if runs("build"):
        with run.timed("build"):
            run.build = stage_build(settings, run.precision, run.report)
    return run


# --------------------------------------------------------------------------------------------
# export


def export_opset(settings: BuildSettings) -> int:
    """The opset of the FP32 export: INT8 Q/DQ with FP16 scales need opset 19."""
    return max(settings.export.opset, 19) if settings.precision.mode in INT8_MODES else settings.export.opset


def fp32_name(settings: BuildSettings) -> str:
    """`model.fp32.onnx`, or `model.fp32.opset<N>.onnx` for an export above opset 17."""
    opset = export_opset(settings)
    return "model.fp32.onnx" if opset == 17 else f"model.fp32.opset{opset}.onnx"


def _export(settings: BuildSettings, in_child: bool = False) -> tuple[Any, list[str], Path, Any]:
    """Load the model and held-out text, export FP32 ONNX, check parity (see `stage_export`)."""
    if in_child:
        # The exporter copies every weight several times (constant folding, serialization); with
        # glibc's adaptive threshold the freed copies stay resident and the next ones stack on them.
        fix_mmap_threshold()
    loaded = load_model(settings.model)
    texts = heldout_texts(settings.data)
    export = replace(settings.export, opset=export_opset(settings))
    path, report = onnx_from_torch(loaded, export, settings.model_dir() / fp32_name(settings), texts)
    if in_child:
        loaded.module = None  # the weights stay in the child; the tokenizer travels back
    return loaded, texts, path, report


def stage_export(settings: BuildSettings) -> ExportResult:
    """Load the model and real text, export FP32 ONNX and check parity against PyTorch.

    Unless a later stage needs the PyTorch module (2:4 sparsity, QAT), this runs in a child
    process: PyTorch, the weights and the exporter's allocations (1.9 GB resident after the
    BERT-large export even with the module freed) leave with it, and the later stages' peak
    does not stack on them.

    Raises:
        compiler.errors.ExportParityError: an output differs from PyTorch beyond `parity_atol`.
        compiler.errors.UnknownModelError, DataError: from loading the model or the text.
    """
    keep_module = settings.sparsity.pattern is not None or settings.precision.mode == "int8-qat"
    if keep_module:
        loaded, texts, path, report = _export(settings)
    else:
        loaded, texts, path, report = run_in_child(_export, settings, True, what="export")
    write_json(settings.model_dir() / fp32_name(settings).replace("model.fp32", "export_report").replace(".onnx", ".json"),
               report.to_dict())
    section = {
        "model": {"name": settings.model.name, "weights": settings.model.weights, "source": loaded.source,
                  "family": loaded.family, "tokenizer_note": loaded.tokenizer_note},
        "export": {"onnx": str(path), "opset": report.opset, "nodes": report.nodes, "reused": report.reused,
                   "parity_atol": report.parity_atol, "parity": [vars(p) for p in report.parity]},
    }
    return ExportResult(loaded, path, report.outputs, texts, section)


# --------------------------------------------------------------------------------------------
# sparsity


def _recover_from(path: str, weights_path: Path) -> tuple[Path, str]:
    """(resolved path, sha256) of `SparsitySettings.recover_from`.

    Raises:
        CompilerError: the file is missing, or is this run's own `student.safetensors` (it would
            be overwritten; use another `--output-dir`).
    """
    src = Path(path).resolve()
    if not src.is_file():
        raise CompilerError(f"--recover-from {path}: no such file; pass the student.safetensors of an "
                            "earlier 2:4 run (engines/<model>/<weights>/sparse24/)")
    if weights_path.exists() and src == weights_path.resolve():
        raise CompilerError(f"--recover-from {path} is this run's own output; write to another --output-dir")
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def _start_from(student: Any, src: Path, names: list[str]) -> dict[str, Any]:
    """Load `src` into `student` (same architecture) and take the masks from its zeros.

    Raises:
        CompilerError: the file does not fit the model, or a chosen layer is not 2:4 in it.
    """


    import safetensors.torch as safetensors_torch  # torch: only where a sparse run needs it

    try:
        safetensors_torch.load_model(student, str(src))
    except (RuntimeError, KeyError) as e:
        raise CompilerError(f"--recover-from {src}: does not fit this model ({str(e)[:300]})") from e
    masks = {}
    for name in names:
        m = student.get_submodule(name)
        if reason := groups_check(m.weight.detach().numpy(), input_axis(m)):
            raise CompilerError(f"--recover-from {src}: layer {name} is not 2:4 along its input dimension "
                                f"({reason}); pass a student of a 2:4 run")
        masks[name] = m.weight.detach() != 0
    return masks


def _prune_and_recover(settings: BuildSettings, export: ExportResult, tokens: TokenSets, student: Any,
                       start: tuple[Path, str] | None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Prune `student` in place (or load the earlier student), recover it; (masks, prune, recovery)."""
    sp = settings.sparsity
    calib = tokens.calibration if sp.method == "wanda" and not start else None
    # with an earlier student, magnitude pruning only chooses the layers (no forward pass)
    masks, prune_report = prune_2_4(student, replace(sp, method="magnitude") if start else sp, calib,
                                    export.loaded.input_names)
    if start:  # weights and masks from the earlier student
        masks = _start_from(student, start[0], list(masks))
        prune_report.method = f"from {start[0]}"
    recovery = None
    if sp.recover_steps:
        train = replace(settings.train, lr=sp.recover_lr, schedule=sp.recover_schedule)
        recovery = recover(student, export.loaded.module, masks, tokens.training, export.loaded.input_names,
                           train, sp.recover_steps).to_dict()
        recovery["train_samples"] = len(tokens.training_texts)
    return masks, prune_report.to_dict(), recovery


def stage_sparsity(settings: BuildSettings, export: ExportResult, tokens: TokenSets) -> SparsityResult | None:
    """SPARSITY=2:4: prune the block linears, recover by distillation, export, check the pattern.

    The pruned and recovered weights are kept as `<base_dir>/student.safetensors` with
    `sparsity_report.json`, keyed by the model, sparsity, training and data settings and the
    texts themselves: a later run (another precision, an INT8 QAT on top) starts from them
    instead of recovering again. With `sparsity.recover_from` the recovery starts from that
    earlier student (its zeros are the masks; keyed by its sha256).

    Raises:
        compiler.errors.CompilerError: a pruned GEMM lost its 2:4 pattern in the ONNX graph, or
            `recover_from` does not fit.
    """
    if settings.sparsity.pattern is None:
        return None


    import safetensors.torch as safetensors_torch  # torch: only where a sparse run needs it

    sp = settings.sparsity
    weights_path, report_path = settings.base_dir() / "student.safetensors", settings.base_dir() / "sparsity_report.json"
    # an earlier student brings its own masks: no Wanda scoring, so no calibration text
    calib_texts = tokens.calibration_texts if sp.method == "wanda" and not sp.recover_from else []
    train_texts = tokens.training_texts if sp.recover_steps else []
    start = _recover_from(sp.recover_from, weights_path) if sp.recover_from else None
    key = settings_hash("sparsity-v3", export.loaded.key, sp, settings.train, settings.data, calib_texts,
                        train_texts, *([start[1]] if start else []))
    student = copy.deepcopy(export.loaded.module)
    computed: dict[str, Any] = {}

    def compute() -> None:
        masks, prune, recovery = _prune_and_recover(settings, export, tokens, student, start)
        computed["masks"] = masks
        atomic_write(weights_path, lambda p: safetensors_torch.save_model(student, str(p)))
        write_json(report_path, {"prune": prune, "recovery": recovery})

    if cached(key, [weights_path, report_path], compute, "sparsity"):
        safetensors_torch.load_model(student, str(weights_path))
    saved = json.loads(report_path.read_text())
    prune, recovery = saved["prune"], saved["recovery"]
    # reused: the masks are what pruning zeroed (a kept weight that is exactly 0 stays 0: still 2:4)
    masks = computed.get("masks") or {n: student.get_submodule(n).weight.detach() != 0 for n in prune["pruned"]}
    sparse = replace(export.loaded, module=student, key=settings_hash("sparse-v2", key))
    path, report = onnx_from_torch(sparse, replace(settings.export, opset=export_opset(settings)),
                                   settings.base_dir() / fp32_name(settings), export.heldout_texts)
    check = require_2_4(load_onnx(path, check=False), names=prune["pruned"])  # raises when a pruned GEMM lost 2:4
    return SparsityResult(path, student if settings.precision.mode == "int8-qat" else None, masks,
                          {"pattern": sp.pattern, "prune": prune, "recovery": recovery, "check": check.to_dict(),
                           "onnx": str(path), "weights": str(weights_path),
                           "export_parity_worst": max(p.max_abs_diff for p in report.parity)})


# --------------------------------------------------------------------------------------------
# quantize


def stage_quantize(settings: BuildSettings, export: ExportResult, sparsity: SparsityResult | None,
                   tokens: TokenSets) -> QuantizeResult | None:
    """PRECISION=int8 (PTQ) or int8-qat: an FP32 + INT8 Q/DQ graph (reused when unchanged).

    Raises:
        compiler.errors.CompilerError: calibration or QAT failed (see `compiler.quant.budget`,
            `compiler.training.qat`).
    """
    mode = settings.precision.mode
    if mode not in INT8_MODES:
        return None

    fp32_onnx = sparsity.onnx if sparsity else export.onnx
    out, report_path = settings.variant_dir() / "model.qdq.onnx", settings.variant_dir() / "quant_report.json"
    base_sha = onnx_sha256(fp32_onnx)
    ref_sha = base_sha if fp32_onnx == export.onnx else onnx_sha256(export.onnx)
    key = settings_hash("quantize-v1", base_sha, ref_sha,
                        mode, settings.quant, settings.data, settings.train if mode == "int8-qat" else None)

    def compute() -> None:
        model, quant = _quantize(settings, export, sparsity, tokens, fp32_onnx)
        save_onnx(model, out, external=True)
        write_json(report_path, quant)

    cached(key, [out, report_path], compute, "quantize")
    quant = json.loads(report_path.read_text())
    return QuantizeResult(out, quant.get("summary", quant))


def _quantize(settings: BuildSettings, export: ExportResult, sparsity: SparsityResult | None,
              tokens: TokenSets, fp32_onnx: Path) -> tuple[Any, dict[str, Any]]:
    float_precision = replace(settings.precision, mode=settings.quant.float_mode)
    if settings.precision.mode == "int8":

        data = settings.data
        model, rep = quantize_within_budget(fp32_onnx, tokens.calibration, tokens.heldout,
                                            export.loaded.input_names, export.output_names, settings.quant,
                                            data.cache_dir, data.batch_size, precision=float_precision)
        summary = {**rep.summary(), "budget_min_cosine": settings.quant.min_cosine, "budget_met": rep.budget["met"],
                   "float_mode": float_precision.mode, "smoothquant_alpha": rep.smoothquant_alpha}
        return model, {"summary": summary, "ptq": rep.to_dict()}
    from compiler.training.qat import QatInputs, int8_qat

    loaded = export.loaded
    student = sparsity.student if sparsity and sparsity.student is not None else copy.deepcopy(loaded.module)
    inputs = QatInputs(student=student, teacher=loaded.module, loaded=loaded, fp32_path=fp32_onnx,
                       reference_path=export.onnx, calib=tokens.calibration, heldout=tokens.heldout,
                       train=tokens.training, output_names=export.output_names, texts=export.heldout_texts,
                       after_step=hold_masks(sparsity.masks, student) if sparsity else None)
    return int8_qat(inputs, settings, replace(settings.export, opset=export_opset(settings)),
                    settings.variant_dir() / "model.qat.fp32.onnx")


# --------------------------------------------------------------------------------------------
# vocab


def _onnx_mib(path: Path) -> float:
    """Size of an ONNX file and its `<name>.data` external weights, MiB."""
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20, 2)


def stage_vocab(settings: BuildSettings, export: ExportResult, graph: Path, tokens: TokenSets) -> VocabResult:
    """`--prune-vocab`: keep the embedding rows the domain texts use, remap every other id to [UNK].

    The tokens are counted over every line of `vocab.texts` (`calibration.vocabulary`), the
    graph rewritten by `compiler.passes.vocab_prune.prune_vocabulary`, then measured against the
    unpruned `graph` on the first `data.samples` domain lines (all their tokens kept: identical
    up to rounding) and on the held-out general text (the out-of-vocabulary tokens' effect).

    Raises:
        compiler.errors.DataError: a domain text is missing or empty.
        compiler.errors.CompilerError: no embedding Gather fed by the ids, or a tied output head
            without `vocab.tied`.
    """
    vocab, data, loaded = settings.vocab, settings.data, export.loaded
    out, report_path = settings.variant_dir() / "model.vocab.onnx", settings.variant_dir() / "vocab_report.json"
    domain = vocabulary_texts(vocab, data)
    key = settings_hash("vocab-v1", onnx_sha256(graph), vocab, domain, data.max_length,
                        tokens.calibration_texts if vocab.keep_top else None)

    def compute() -> None:
        tok = loaded.tokenizer
        general = count_tokens(tokens.calibration_texts, tok, data.max_length) if vocab.keep_top else None
        kept = choose_vocabulary(count_tokens(domain, tok, data.max_length), vocab.min_count,
                                 special_token_ids(tok), general, vocab.keep_top)
        model, report = prune_vocabulary(load_onnx(graph, check=False), kept, tok.unk_token_id, allow_tied=vocab.tied)
        save_onnx(model, out, external=True)
        sample = tokenized_set(domain[: data.samples], tok, data.max_length, data.cache_dir)
        names = loaded.input_names
        probe = FidelityProbe(graph, export.output_names, {"domain": sample.batches(data.batch_size, names),
                                                           "heldout": tokens.heldout.batches(data.batch_size, names)})
        # both graphs on ONNX Runtime with its optimizations, as the reference runs (Q/DQ fused alike)
        fidelity = probe.measure(load_onnx(out, check=False), optimize=True)
        write_json(report_path, {
            **report.to_dict(), "texts": list(vocab.texts), "domain_samples": len(domain),
            "min_count": vocab.min_count, "keep_top": vocab.keep_top,
            "onnx_mib": {"before": _onnx_mib(graph), "after": _onnx_mib(out)},
            "oov_rate": {"domain": oov_rate(sample, kept), "heldout": oov_rate(tokens.heldout, kept)},
            "fidelity_vs_unpruned": {name: f.report() for name, f in fidelity.items()}})

    cached(key, [out, report_path], compute, "vocab")
    report = json.loads(report_path.read_text())
    log.info("vocab: %d of %d tokens kept, ONNX %.1f -> %.1f MiB, held-out OOV %.2f %%", report["kept"],
             report["vocab_size"], report["onnx_mib"]["before"], report["onnx_mib"]["after"],
             100 * report["oov_rate"]["heldout"])
    return VocabResult(out, report)


# --------------------------------------------------------------------------------------------
# precision, verify, build


def stage_precision(settings: BuildSettings, export: ExportResult, source: Path, has_qdq: bool,
                    tokens: TokenSets) -> PrecisionResult:
    """Rewrite the FP32 graph (with INT8 Q/DQ, with a pruned vocabulary, as the earlier stages
    left it) into the requested precision; reused when unchanged.

    Raises:
        compiler.errors.PrecisionError: the graph cannot be typed (see `compiler.passes.precision`).
    """
    out, report_path = settings.variant_dir() / "model.onnx", settings.variant_dir() / "precision_report.json"
    graph_sha = onnx_sha256(source)
    prec = settings.precision
    if has_qdq:  # INT8: what is not quantized runs in quant.float_mode
        prec = replace(prec, mode=settings.quant.float_mode)
    auto = prec.mode == "auto"

    def compute() -> None:
        if auto:
            data, loaded = settings.data, export.loaded
            # auto takes the path: it reads the weights through ONNX Runtime where it can.
            model, report = auto_precision(source, prec, tokens.calibration, tokens.heldout, loaded.input_names,
                                           export.output_names, data.batch_size, loaded.vocab_size,
                                           graph_sha, data.cache_dir, settings.model.seed)
        else:
            model, report = convert_precision(load_onnx(source, check=False), prec)
        save_onnx(model, out)
        write_json(report_path, report.to_dict())

    cached(settings_hash("precision-v1", graph_sha, prec, settings.data if auto else None),
           [out, report_path], compute, "precision")
    return PrecisionResult(out, json.loads(report_path.read_text()))


def stage_verify(settings: BuildSettings, export: ExportResult, precision: PrecisionResult,
                 tokens: TokenSets) -> VerifyResult:
    """Fidelity of the variant against the dense FP32 graph on real text and random ids.

    A 2:4 run also checks that the variant (FP16, Q/DQ) kept the pattern.
    """
    data = settings.data
    fidelity = verify_variant(export.onnx, load_onnx(precision.onnx, check=False), export.output_names,
                              tokens.heldout, data.batch_size, export.loaded.vocab_size, settings.model.seed)
    fidelity["data"] = {"path": data.path or "wikitext-2/test.txt (default)", "samples": len(tokens.heldout),
                        "max_length": data.max_length,
                        "tokens": int(sum(len(x) for x in tokens.heldout.input_ids))}
    for which in ("real", "random"):
        f = fidelity[which]
        num = lambda v: "nan" if v is None else f"{v:.6g}"  # noqa: E731  (None: a non-finite output)
        log.info("verify %s: cosine min %s mean %s, max abs error %s, %d non-finite over %d samples", which,
                 num(f["cosine_min"]), num(f["cosine_mean"]), num(f["max_abs_err"]), f["nonfinite_count"],
                 f["samples"])
    check = None
    if settings.sparsity.pattern is not None:  # FP16 and Q/DQ must keep the 2:4 pattern

        flag, found = sparse_weights_flag(precision.onnx, settings.engine)
        check = {**found, "sparse_weights_flag": flag}
    return VerifyResult(fidelity, check)


def stage_build(settings: BuildSettings, precision: PrecisionResult, report: dict[str, Any]) -> BuildResult:
    """Build the TensorRT engine (stops with exit status 2 where TensorRT or a GPU is missing)."""
    plan, manifest = engine_from_onnx(precision.onnx, settings, report)
    return BuildResult(plan, manifest)
