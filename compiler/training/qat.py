"""Quantization-aware training (QAT, `PRECISION=int8-qat`): fake quantization, distillation, Q/DQ export.

Fake quantization goes at the places PTQ (`compiler.passes.qdq.insert_qdq`) puts Q/DQ, so the two
compare one to one: the input of every quantized Linear (MatMul/Gemm in the graph) per tensor,
with a learnable scale initialised from PTQ calibration (LSQ, Esser et al. 2020, "Learned Step
Size Quantization", arXiv:1902.08153), and its weight per output channel (scale = absmax / 127
of the current weights, straight-through). Both are symmetric INT8 with zero point 0:
q = clamp(round_half_even(x / scale), -128, 127), x' = q * scale, as ONNX QuantizeLinear /
DequantizeLinear compute it. The student is then fine-tuned against the FP32 teacher with the
project's one training loop (`compiler.training.distill.distill`).

Export: the fine-tuned FP32 weights are exported to ONNX as usual and `insert_qdq` places Q/DQ
with the learned activation scales; weight scales are recomputed from the fine-tuned weights,
exactly as the fake quantizer computed them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from compiler.eval.fidelity import FidelityProbe
from compiler.graph.modules import module_for_node
from compiler.graph.onnx_io import onnx_sha256
from compiler.passes.precision import convert_precision
from compiler.passes.qdq import QuantReport, insert_qdq
from compiler.passes.smoothquant import smooth
from compiler.quant.budget import quantize_within_budget
from compiler.settings import BuildSettings, ExportSettings, QuantSettings, TrainSettings, settings_hash
from compiler.training.distill import TrainReport, distill
from compiler.training.export import ExportReport, onnx_from_torch
from compiler.training.prune import input_axis, is_linear

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127  # symmetric INT8, zero point 0 (TensorRT and ONNX QuantizeLinear saturate here)
SMOOTH_SUFFIX = "_smooth_inv_scale"  # the 1/s initializer `compiler.passes.smoothquant.smooth` adds per tensor


class FakeQuantLinear(torch.nn.Module):
    """A linear layer computed with fake-quantized (INT8 quantize-dequantize) input and weight.

    Input (B..., K): optionally multiplied by the fixed SmoothQuant factors `inv_smooth` (K,)
    first (the weights then carry s = 1 / inv_smooth, see `insert_fake_quant`); then per tensor,
    symmetric INT8, scale = |act_scale| (a shared learnable Parameter of shape (1,), one per ONNX
    tensor, so Q, K and V projections reading the same tensor learn one scale, as the Q/DQ graph
    has one pair per tensor); its gradient by LSQ (Esser et al. 2020, through
    `torch._fake_quantize_learnable_per_tensor_affine`, gradient scale 1 / sqrt(numel x 127)).
    Weight: per output channel, scale = absmax / 127 of the current weight, gradient
    straight-through: nn.Linear (out, in) -> axis 0; GPT-2 Conv1D (in, out) -> axis 1.
    Computes in FP32, also under autocast.

    Attributes:
        linear: the wrapped nn.Linear or transformers Conv1D (its weight is what trains).
        act_scale: the learnable activation scale, (1,) FP32.
        inv_smooth: (K,) FP32 1/s or None (a plain tensor: `Module.to` leaves it).
    """

    def __init__(self, linear: Any, act_scale: Any, inv_smooth: Any = None) -> None:
        super().__init__()
        self.linear = linear
        self.act_scale = act_scale
        self.inv_smooth = inv_smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # INT8 simulation in FP32, also under bf16
            return self._forward(x.float())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth.to(x.device)
        scale = self.act_scale.abs() + 1e-12
        xq = torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, torch.zeros_like(scale), QMIN, QMAX, 1.0 / (x.numel() * QMAX) ** 0.5)
        w = self.linear.weight
        axis = 1 - input_axis(self.linear)  # the output channels
        w_scale = (w.detach().abs().amax(dim=1 - axis) / QMAX).clamp_min(1e-12)
        wq = torch.fake_quantize_per_channel_affine(
            w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), axis, QMIN, QMAX)
        if axis == 1:  # Conv1D: x (..., in) @ W (in, out) + b
            return torch.addmm(self.linear.bias, xq.reshape(-1, xq.shape[-1]), wq).reshape(
                *xq.shape[:-1], wq.shape[1])
        return torch.nn.functional.linear(xq, wq, self.linear.bias)


def linear_placement(onnx_model: Any, quantized_nodes: list[str], module: Any) -> dict[str, tuple[str, str]]:
    """{module path: (ONNX node, its activation tensor)} for each quantized MatMul/Gemm.

    Args:
        onnx_model: the student's export (node names carry module paths, see
            `compiler.graph.modules.module_for_node`; weights are not read).
        quantized_nodes: the MatMul/Gemm nodes PTQ quantized.
        module: the student whose modules the nodes map to.

    A quantized node outside the Hugging Face model (a sentence-transformers Dense layer of the
    export wrapper, after the pooling) is not fake-quantized: QAT fine-tunes the model's own
    Linear layers, and the Dense layers keep PTQ's calibrated scale (`_qdq_of_tuned`).

    Raises:
        ValueError: a quantized node whose weight MatMul maps to no Linear module (`is_linear`;
            e.g. the attention batched matmuls of `quantize_attention_bmm`): the QAT placement
            would then differ from PTQ's.
    """
    names = dict(module.named_modules())
    wanted = set(quantized_nodes)
    out, missing = {}, []
    for n in onnx_model.graph.node:
        if n.name in wanted and n.op_type in ("MatMul", "Gemm"):
            path = module_for_node(n.name)
            if is_linear(names.get(path)):
                out[path] = (n.name, n.input[0])
            else:
                missing.append(n.name)
    outside = [m for m in missing if not m.startswith("/model/")]
    if outside:  # the export wrapper's own layers: a sentence-transformers Dense head
        log.info("QAT: %d quantized layer(s) after the model (first: %s) keep PTQ's scales", len(outside), outside[0])
        missing = [m for m in missing if m not in outside]
    if missing:
        raise ValueError(f"QAT: {len(missing)} quantized MatMul/Gemm nodes map to no Linear module "
                         f"(first: {missing[0]}); QAT fake-quantizes Linear layers only (set "
                         "quantize_attention_bmm off)")
    return out


def insert_fake_quant(model: Any, placement: dict[str, tuple[str, str]], thresholds: dict[str, float],
                      smoothing: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Wrap each Linear of `placement` in a `FakeQuantLinear` (in place).

    Args:
        placement: {module path: (node, activation tensor)} (`linear_placement`).
        thresholds: {tensor: |x| threshold} of the (smoothed) input; the initial scale is
            threshold / 127 (threshold at least 1e-6).
        smoothing: {tensor: (K,) float32 1/s} SmoothQuant factors of PTQ
            (`compiler.passes.smoothquant.smooth`): the Linear's weight input channels are
            multiplied by s in place and the wrapper multiplies its input by 1/s, the same
            function PTQ quantized.

    Returns:
        {tensor: the shared learnable scale Parameter, (1,) FP32}.
    """
    smoothing = smoothing or {}
    params: dict[str, Any] = {}
    for path, (_node, tensor) in placement.items():
        if tensor not in params:
            params[tensor] = torch.nn.Parameter(torch.tensor([max(thresholds[tensor], 1e-6) / QMAX]))
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, child)
        inv = None
        if tensor in smoothing:
            inv = torch.from_numpy(np.array(smoothing[tensor], np.float32))  # a writable copy
            with torch.no_grad():  # W_j * s_j along the input channels
                linear.weight.mul_((1.0 / inv)[None, :] if input_axis(linear) == 1 else (1.0 / inv)[:, None])
        setattr(parent, child, FakeQuantLinear(linear, params[tensor], inv))
    return params


def remove_fake_quant(model: Any) -> None:
    """Put the (fine-tuned) Linears back in place of their `FakeQuantLinear` wrappers (in place).

    A smoothed Linear keeps its smoothed weights and gets a forward pre-hook multiplying its
    input by 1/s: the model computes the same function, and the export has Mul(x, 1/s) ->
    MatMul, node names unchanged, as PTQ's smoothed graph.
    """
    for path, mod in list(model.named_modules()):
        if isinstance(mod, FakeQuantLinear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, mod.linear)
            if mod.inv_smooth is not None:
                inv = mod.inv_smooth
                mod.linear.register_forward_pre_hook(lambda _m, args, inv=inv: (args[0] * inv, *args[1:]))


def qat_model(student: Any, teacher: Any, input_names: list[str], onnx_model: Any,
              quantized_nodes: list[str], thresholds: dict[str, float], tokens: Any,
              settings: TrainSettings, after_step: Callable[[Any], None] | None = None,
              smoothing: dict[str, np.ndarray] | None = None) -> tuple[dict[str, float], TrainReport]:
    """Quantization-aware fine-tuning of `student` (in place) by distillation from `teacher`.

    Args:
        student: the PyTorch model to fine-tune (FP32; fake quantization is inserted for the
            run and removed after it, leaving fine-tuned FP32 weights, smoothed where
            `smoothing` says so, see `remove_fake_quant`).
        teacher: the FP32 model whose `last_hidden_state` is the target (not modified).
        input_names: model inputs.
        onnx_model: the student's FP32 ONNX export (node names map to modules; weights unused).
        quantized_nodes: the MatMul/Gemm nodes PTQ quantized (the same placement).
        thresholds: {tensor of `onnx_model`: |x| maps to 127}, the initial scales (of the
            smoothed input where smoothed).
        tokens: real training text (`calibration.TokenizedSet`), never the held-out set.
        settings: steps, learning rates (`lr` for the weights, `scale_lr` for the activation
            scales), batch size.
        after_step: called after each optimizer step (the 2:4 masks of sparse QAT).
        smoothing: {tensor: (K,) 1/s} from PTQ's SmoothQuant, or None.

    Returns:
        ({quantized node: learned threshold (scale x 127)} for `compiler.passes.qdq.insert_qdq`
        on the fine-tuned export, TrainReport).

    Raises:
        ValueError: see `linear_placement`.
    """
    placement = linear_placement(onnx_model, quantized_nodes, student)
    params = insert_fake_quant(student, placement, thresholds, smoothing)
    scale_ids = {id(p) for p in params.values()}
    others = [p for p in student.parameters() if id(p) not in scale_ids]
    try:
        # whole padded batches: LSQ's step-size gradient scale 1 / sqrt(x.numel() x 127) depends
        # on the batch tensor's size, so sub-batches (`TrainSettings.split_by_length`) would
        # change the scales' gradients, not only the summation order
        report = distill(student, teacher, tokens, input_names, replace(settings, split_by_length=False),
                         param_groups=[{"params": others, "lr": settings.lr},
                                       {"params": list(params.values()), "lr": settings.scale_lr}],
                         after_step=after_step)
    finally:
        remove_fake_quant(student)
    learned = {node: float(params[tensor].detach().abs()) * QMAX for node, tensor in placement.values()}
    log.info("QAT: %d steps, loss %.4g -> %.4g, %d scales learned", report.steps, report.loss_first,
             report.loss_last, len(params))
    return learned, report


def smoothing_factors(qdq_model: Any) -> dict[str, np.ndarray]:
    """{activation tensor: (K,) float32 1/s} read from a SmoothQuant-ed graph
    (`compiler.passes.smoothquant.smooth` names them `<tensor>_smooth_inv_scale`)."""
    return {t.name[: -len(SMOOTH_SUFFIX)]: numpy_helper.to_array(t) for t in qdq_model.graph.initializer
            if t.name.endswith(SMOOTH_SUFFIX)}


# --------------------------------------------------------------------------------------------
# PRECISION=int8-qat: PTQ start, fine-tuning, Q/DQ export, PTQ and QAT side by side


@dataclass
class QatInputs:
    """What `int8_qat` works on (the pipeline's artifacts and token sets).

    Attributes:
        student: PyTorch model to fine-tune (in place): a copy of the teacher, or the 2:4 student.
        teacher: the dense FP32 PyTorch model (not modified).
        loaded: `compiler.training.models.LoadedModel` (tokenizer, input names, key).
        fp32_path: the student's FP32 ONNX export (opset >= 19).
        reference_path: the dense FP32 export, the reference of every fidelity figure.
        calib, heldout, train: disjoint `calibration.TokenizedSet`s of real text (calibration,
            held-out fidelity, fine-tuning).
        output_names: graph outputs; fidelity is measured on the first.
        texts: real text for the fine-tuned export's parity check.
        after_step: called after each optimizer step (`compiler.training.prune.hold_masks` for a
            2:4 student), or None.
    """

    student: Any
    teacher: Any
    loaded: Any
    fp32_path: Path
    reference_path: Path
    calib: Any
    heldout: Any
    train: Any
    output_names: list[str]
    texts: list[str]
    after_step: Callable[[Any], None] | None = None


def int8_qat(inputs: QatInputs, settings: BuildSettings, export: ExportSettings,
             qat_onnx: Path) -> tuple[Any, dict[str, Any]]:
    """PRECISION=int8-qat: PTQ placement and scales, distillation with fake quantization, Q/DQ export.

    1. PTQ with `settings.quant` (`compiler.quant.budget.quantize_within_budget`, SmoothQuant and
       the budget loop included): the placement (quantized MatMuls, nodes left float), the
       smoothing factors and thresholds QAT starts from, and the PTQ figure QAT is compared with.
    2. `qat_model`: the same smoothing applied to the student (an exact transform), then
       fine-tuning (`settings.train`) against the teacher on `inputs.train` with fake
       quantization at exactly PTQ's MatMuls, scales starting from PTQ's thresholds: QAT starts
       where PTQ ends.
    3. Export the fine-tuned student (FP32, parity-checked against itself) to `qat_onnx` and
       place Q/DQ with the learned thresholds and the same exclusions (`insert_qdq`).
    4. Held-out fidelity of PTQ and QAT side by side, both with what is not quantized in
       `settings.quant.float_mode` (e.g. hybrid FP16 on the faithful FP16 reference), against
       `inputs.reference_path` (dense FP32).
    5. With `quant.qat_fallback` (default), PTQ's graph is returned when QAT's held-out cosine
       min is below PTQ's or it has more non-finite outputs: fine-tuning that made the graph
       worse is not shipped (`summary.method` "ptq (qat rejected)", `summary.qat_kept` False).

    Args:
        inputs: the models, graphs and token sets.
        settings: reads `quant`, `train`, `precision` (with `mode=quant.float_mode`), and
            `data.cache_dir` / `data.batch_size` (calibration cache, held-out batch size).
        export: the fine-tuned model's export settings (opset >= 19: Q/DQ with FP16 scales).
        qat_onnx: where the fine-tuned FP32 export goes.

    Returns:
        (FP32 + Q/DQ onnx.ModelProto of the fine-tuned model, report dict with `summary`,
        `heldout` (PTQ and QAT side by side), `ptq`, `qat`, `training`, `qat_export`).

    Raises:
        ValueError: a quantized MatMul that is not a Linear (`linear_placement`), or a QAT
            placement that differs from PTQ's.
        compiler.errors.ExportParityError: the fine-tuned model's export disagrees with PyTorch.
    """
    float_precision = replace(settings.precision, mode=settings.quant.float_mode)
    input_names, data = inputs.loaded.input_names, settings.data
    ptq_model, ptq = quantize_within_budget(inputs.fp32_path, inputs.calib, inputs.heldout, input_names,
                                            inputs.output_names, settings.quant, data.cache_dir, data.batch_size,
                                            precision=float_precision)
    smoothing = smoothing_factors(ptq_model)
    light = onnx.load(str(inputs.fp32_path), load_external_data=False)
    thresholds = ptq_thresholds(light, ptq, smoothing)
    learned, training = qat_model(inputs.student, inputs.teacher, input_names, light, ptq.quantized_nodes,
                                  thresholds, inputs.train, settings.train, inputs.after_step, smoothing)
    # layers after the model (Dense) are not fine-tuned: they keep PTQ's scale and smoothing
    kept_inputs = {n.name: n.input[0] for n in light.graph.node if n.name in ptq.quantized_nodes and n.name not in learned}
    kept = {node: thresholds[t] for node, t in kept_inputs.items()}
    model, rep, export_report = _qdq_of_tuned(inputs, settings, export, qat_onnx, ptq, {**kept, **learned},
                                              {t: smoothing[t] for t in kept_inputs.values() if t in smoothing},
                                              list(kept))
    probe = FidelityProbe.on_tokens(inputs.reference_path, inputs.heldout, input_names, inputs.output_names[0],
                                    data.batch_size)
    fid_ptq = probe.score(convert_precision(ptq_model, float_precision)[0]).to_dict()
    fid_qat = probe.score(convert_precision(model, float_precision)[0]).to_dict()
    rep.method, rep.smoothquant_alpha = ptq.method, ptq.smoothquant_alpha
    rep.fidelity = {**fid_qat, "heldout_samples": len(inputs.heldout)}
    report = _qat_report(inputs, settings.quant, float_precision.mode, ptq, rep, training, export_report,
                         fid_ptq, fid_qat)
    log.info("QAT: held-out cosine_min %.5f (PTQ at the same placement %.5f)", fid_qat["cosine_min"],
             fid_ptq["cosine_min"])
    worse = (fid_qat["cosine_min"] < fid_ptq["cosine_min"]
             or fid_qat["nonfinite_count"] > fid_ptq["nonfinite_count"])
    report["summary"]["qat_kept"] = not (worse and settings.quant.qat_fallback)
    if report["summary"]["qat_kept"]:
        return model, report
    log.warning("QAT: the fine-tuned graph is worse than PTQ on held-out text (cosine min %.5f < %.5f): "
                "shipping PTQ's graph (--no-qat-fallback ships the fine-tuned one)", fid_qat["cosine_min"],
                fid_ptq["cosine_min"])
    report["summary"].update(method="ptq (qat rejected)", cosine_min=fid_ptq["cosine_min"],
                             budget_met=fid_ptq["cosine_min"] >= settings.quant.min_cosine
                             and fid_ptq["nonfinite_count"] == 0)
    return ptq_model, report


def ptq_thresholds(light: Any, ptq: QuantReport, smoothing: dict[str, np.ndarray]) -> dict[str, float]:
    """PTQ's threshold of each quantized node's input, keyed by the unsmoothed graph's tensor.

    Args:
        light: the FP32 graph PTQ started from (node names as in `ptq.quantized_nodes`).
        ptq: PTQ's report (`thresholds` keyed by the tensors of the smoothed graph, where a
            smoothed tensor `t` is read as `t_smoothed`).
        smoothing: `smoothing_factors` of PTQ's graph.
    """
    by_name = {n.name: n for n in light.graph.node}
    thresholds = {}
    for node in ptq.quantized_nodes:
        t = by_name[node].input[0]
        thresholds[t] = ptq.thresholds[f"{t}_smoothed" if t in smoothing else t]
    return thresholds


def _qdq_of_tuned(inputs: QatInputs, settings: BuildSettings, export: ExportSettings, qat_onnx: Path,
                  ptq: QuantReport, learned: dict[str, float], kept_smoothing: dict[str, np.ndarray],
                  kept_nodes: list[str]) -> tuple[Any, QuantReport, ExportReport]:
    """Export the fine-tuned student and place Q/DQ with the learned thresholds and PTQ's
    sensitivity exclusions; raises ValueError when the placement differs from PTQ's. Layers
    after the model (`kept_nodes`, not fine-tuned) get PTQ's smoothing back ({tensor: 1/s}),
    so that PTQ's thresholds of their smoothed inputs apply."""
    loaded, quant = inputs.loaded, settings.quant
    tuned = replace(loaded, module=inputs.student,
                    key=settings_hash("qat-v3", loaded.key, onnx_sha256(inputs.fp32_path), quant,
                                      settings.train, inputs.calib.key, inputs.train.key))
    path, export_report = onnx_from_torch(tuned, export, Path(qat_onnx), inputs.texts)
    exported = onnx.load(str(path))
    if kept_smoothing:
        s = {t: 1.0 / inv for t, inv in kept_smoothing.items()}
        exported, _ = smooth(exported, s, 0.0, nodes=kept_nodes, scales=s)
    act = {n.input[0]: learned[n.name] for n in exported.graph.node if n.name in learned}
    exclude = {e.name: "sensitivity" for e in ptq.excluded if e.reason == "sensitivity"}
    model, rep = insert_qdq(exported, act, replace(quant, smoothquant_alpha=None), exclude_nodes=exclude)
    del exported
    if sorted(rep.quantized_nodes) != sorted(ptq.quantized_nodes):
        raise ValueError("QAT placement differs from PTQ's: "
                         f"{sorted(set(rep.quantized_nodes) ^ set(ptq.quantized_nodes))[:5]}")
    return model, rep, export_report


def _qat_report(inputs: QatInputs, quant: QuantSettings, float_mode: str, ptq: QuantReport, rep: QuantReport,
                training: TrainReport, export_report: ExportReport, fid_ptq: dict[str, Any],
                fid_qat: dict[str, Any]) -> dict[str, Any]:
    """The report dict of `int8_qat` (fields as before the split: report.json readers rely on them)."""
    summary = {"method": "qat", "calibration_method": ptq.method, "smoothquant_alpha": ptq.smoothquant_alpha,
               "quantized_matmuls": rep.quantized_matmuls, "excluded": [e.name for e in rep.excluded],
               "int8_mac_fraction": round(rep.int8_mac_fraction, 4),
               "cosine_min": fid_qat["cosine_min"], "ptq_cosine_min": fid_ptq["cosine_min"],
               "budget_min_cosine": quant.min_cosine, "budget_met": fid_qat["cosine_min"] >= quant.min_cosine
               and fid_qat["nonfinite_count"] == 0, "float_mode": float_mode,
               "training_steps": training.steps, "training_seconds": training.seconds}
    return {"summary": summary,
            "heldout": {"reference": str(inputs.reference_path), "graph": f"{float_mode} + INT8",
                        "ptq_same_placement": fid_ptq, "qat": fid_qat},
            "ptq": ptq.to_dict(), "qat": rep.to_dict(), "training": training.to_dict(),
            "qat_export": {"onnx": export_report.onnx_path,
                           "parity_worst": max(p.max_abs_diff for p in export_report.parity)}}
