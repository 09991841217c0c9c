"""The sparsity stage (SPARSITY=2:4): prune the block linears, recover by distillation, export
the sparse model, check the pattern in the ONNX graph.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from calibration.layout import TokenSets, recovery_data
from compiler.artifacts import atomic_write, cached, write_json
from compiler.errors import CompilerError
from compiler.graph.onnx_io import load_onnx
from compiler.graph.sparsity import groups_check, require_2_4
from compiler.results import ExportResult, SparsityResult
from compiler.settings import RECOVER_STEPS_BF16, RECOVER_STEPS_FP32, BuildSettings, TrainSettings, settings_hash
from compiler.stages.export import export_opset, fp32_name
from compiler.training.export import onnx_from_torch
from compiler.training.distill import bf16_matmul_available
from compiler.training.heldout import heldout_cosine
from compiler.training.prune import input_axis, needs_calibration, prune_2_4, recover


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
    from safetensors import SafetensorError

    try:
        safetensors_torch.load_model(student, str(src))
    except (RuntimeError, KeyError, SafetensorError) as e:
        raise CompilerError(f"--recover-from {src}: does not fit this model ({str(e)[:300]})") from e
    masks = {}
    for name in names:
        m = student.get_submodule(name)
        if reason := groups_check(m.weight.detach().numpy(), input_axis(m)):
            raise CompilerError(f"--recover-from {src}: layer {name} is not 2:4 along its input dimension "
                                f"({reason}); pass a student of a 2:4 run")
        masks[name] = m.weight.detach() != 0
    return masks


def recovery_train(settings: BuildSettings) -> TrainSettings:
    """`settings.train` with the recovery's batch size, learning rate, schedule, layer-wise weight
    and bf16 (`recover_bf16` resolved on the training device: `auto` is on where BF16 multiplies
    in hardware)."""
    sp = settings.sparsity
    bf16 = settings.train.bf16 or sp.recover_bf16 == "on" or (
        sp.recover_bf16 == "auto" and bf16_matmul_available(settings.train.device))
    return replace(settings.train, batch_size=sp.recover_batch_size, lr=sp.recover_lr, schedule=sp.recover_schedule,
                   bf16=bf16, layerwise_weight=sp.recover_layerwise_weight)


def resolve_recover_steps(settings: BuildSettings) -> BuildSettings:
    """`settings` with `sparsity.recover_steps` set: as given, or (None) `RECOVER_STEPS_BF16` where
    the recovery runs under BF16 autocast (`recovery_train(settings).bf16`), else
    `RECOVER_STEPS_FP32`: what fits MiniLM's one command in the hour on 2 CPU cores either way."""
    sp = settings.sparsity
    if sp.recover_steps is not None:
        return settings
    steps = RECOVER_STEPS_BF16 if recovery_train(settings).bf16 else RECOVER_STEPS_FP32
    return replace(settings, sparsity=replace(sp, recover_steps=steps))


def _prune_and_recover(settings: BuildSettings, export: ExportResult, tokens: TokenSets, student: Any,
                       start: tuple[Path, str] | None,
                       train: TrainSettings) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Prune `student` in place (or load the earlier student), recover it; (masks, prune, recovery)."""
    sp = settings.sparsity
    calib = tokens.calibration if needs_calibration(sp.method) and not start else None
    # with an earlier student, magnitude pruning only chooses the layers (no forward pass)
    masks, prune_report = prune_2_4(student, replace(sp, method="magnitude") if start else sp, calib,
                                    export.loaded.input_names)
    if start:  # weights and masks from the earlier student
        masks = _start_from(student, start[0], list(masks))
        prune_report.method = f"from {start[0]}"
    recovery = None
    if sp.recover_steps:
        # the held-out cosine along the run (the curve in sparsity_report.json): verification's set
        curve = heldout_cosine(export.loaded.module, tokens.heldout, export.loaded.input_names)
        recovery = recover(student, export.loaded.module, masks, tokens.training, export.loaded.input_names,
                           train, sp.recover_steps, evaluate=curve,
                           train_embeddings=sp.recover_embeddings).to_dict()
        recovery["train_samples"] = len(tokens.training_texts)
        recovery["train_text"] = list(tokens.data.train_path) or [tokens.data.path or "default text"]
        recovery["bf16"] = train.bf16
        recovery["batch_size"] = train.batch_size
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
    settings = resolve_recover_steps(settings)

    import safetensors.torch as safetensors_torch  # torch: only where a sparse run needs it

    sp = settings.sparsity
    # the recovery's own text (the default mix where the shared data has it)
    data = recovery_data(settings.data, sp.recover_samples) if sp.recover_steps else settings.data
    if data is not settings.data:
        tokens = TokenSets(data, tokens.tokenizer, tokens.train_batch_size, heldout=tokens.heldout_texts)
    weights_path, report_path = settings.base_dir() / "student.safetensors", settings.base_dir() / "sparsity_report.json"
    # an earlier student brings its own masks: no Wanda scoring, so no calibration text
    calib_texts = tokens.calibration_texts if needs_calibration(sp.method) and not sp.recover_from else []
    train_texts = tokens.training_texts if sp.recover_steps else []
    start = _recover_from(sp.recover_from, weights_path) if sp.recover_from else None
    train = recovery_train(settings)
    key = settings_hash("sparsity-v5", export.loaded.key, sp, train, data, calib_texts,
                        train_texts, *([start[1]] if start else []))
    student = copy.deepcopy(export.loaded.module)
    computed: dict[str, Any] = {}

    def compute() -> None:
        masks, prune, recovery = _prune_and_recover(settings, export, tokens, student, start, train)
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
