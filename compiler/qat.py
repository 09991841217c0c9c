"""Stage 3 (option): quantization-aware training (QAT) by distillation, exported as Q/DQ ONNX.

Fake quantization goes at the places PTQ (`compiler.quantize`) puts Q/DQ, so the two compare
one to one: the input of every quantized Linear (MatMul/Gemm in the graph) per tensor, with a
learnable scale initialised from PTQ calibration (LSQ, Esser et al. 2020), and its weight per
output channel (scale = absmax / 127 of the current weights, straight-through). The student is
fine-tuned to reproduce the FP32 teacher's outputs on real text (no labels): loss = mean squared
error of `last_hidden_state` at valid tokens. `distill` is the one training loop of the project;
the 2:4 sparsity recovery reuses it with its own `after_step` (masks held fixed).

Export: the fine-tuned FP32 weights are exported to ONNX as usual and `insert_qdq` places Q/DQ
with the learned activation scales; weight scales are recomputed from the fine-tuned weights,
exactly as the fake quantizer computed them.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127  # symmetric INT8, zero point 0 (TensorRT and ONNX QuantizeLinear saturate here)


@dataclass(frozen=True)
class TrainSettings:
    """Distillation fine-tuning.

    Attributes:
        steps: optimizer steps.
        lr: AdamW learning rate for weights; scales use `scale_lr`.
        scale_lr: learning rate of the learnable activation scales.
        batch_size: samples per step (padded to the batch's longest).
        seed: shuffling seed.
    """

    steps: int = 200
    lr: float = 1e-5
    scale_lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("need steps >= 0, lr > 0, batch_size >= 1")


@dataclass
class TrainReport:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"] = [round(v, 6) for v in self.losses[:: max(1, len(self.losses) // 20)]]
        return d


def _batches_forever(tokens: Any, batch_size: int, input_names: list[str], seed: int) -> Iterator[tuple[dict, np.ndarray]]:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(tokens))
        shuffled = type(tokens)([tokens.input_ids[i] for i in order],
                                None if tokens.token_type_ids is None else [tokens.token_type_ids[i] for i in order],
                                tokens.pad_id, tokens.key)
        yield from shuffled.batches(batch_size, input_names)


def distill(student: Any, teacher: Any, tokens: Any, input_names: list[str], settings: TrainSettings,
            param_groups: list[dict] | None = None,
            after_step: Callable[[Any], None] | None = None) -> TrainReport:
    """Fine-tune `student` to match `teacher`'s last_hidden_state on real text.

    Args:
        student, teacher: Hugging Face models with the same output shapes; the teacher is frozen.
        tokens: `calibration.TokenizedSet` of real text (training samples, not the held-out set).
        input_names: model inputs to feed (`input_ids`, `attention_mask`, `token_type_ids`).
        settings: steps, learning rate, batch size.
        param_groups: optimizer groups; default all student parameters at `settings.lr`.
        after_step: called with the student after every optimizer step (e.g. re-apply a 2:4 mask).

    Returns:
        TrainReport with the loss curve (MSE at valid tokens).
    """
    import torch

    torch.manual_seed(settings.seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    groups = param_groups or [{"params": [p for p in student.parameters() if p.requires_grad], "lr": settings.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    from tqdm import tqdm

    batches = _batches_forever(tokens, settings.batch_size, input_names, settings.seed)
    for _ in tqdm(range(settings.steps), desc="distillation", unit="step", disable=None, leave=False):
        feeds, _lengths = next(batches)
        inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        with torch.no_grad():
            target = teacher(**inputs).last_hidden_state  # (B, T, H)
        out = student(**inputs).last_hidden_state
        loss = (((out - target) ** 2) * mask).sum() / (mask.sum() * out.shape[-1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(student)
        losses.append(float(loss.detach()))
    student.eval()
    return TrainReport(settings.steps, round(time.perf_counter() - start, 1),
                       losses[0] if losses else 0.0, losses[-1] if losses else 0.0, losses)


class FakeQuantLinear:
    """nn.Linear with fake-quantized input (per tensor, learnable scale) and weight (per channel)."""

    def __new__(cls, linear: Any, act_scale: float):
        import torch

        class _FakeQuantLinear(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = linear
                self.act_scale = torch.nn.Parameter(torch.tensor([float(act_scale)]))
                self.register_buffer("zero", torch.zeros(1, dtype=torch.int32))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                scale = self.act_scale.abs() + 1e-12
                xq = torch._fake_quantize_learnable_per_tensor_affine(
                    x, scale, self.zero.float(), QMIN, QMAX, 1.0 / (x.numel() * QMAX) ** 0.5)
                w = self.linear.weight  # (out, in): per output channel = axis 0
                w_scale = (w.detach().abs().amax(dim=1) / QMAX).clamp_min(1e-12)
                wq = torch.fake_quantize_per_channel_affine(
                    w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0, QMIN, QMAX)
                return torch.nn.functional.linear(xq, wq, self.linear.bias)

        return _FakeQuantLinear()


def module_for_node(node_name: str) -> str:
    """ONNX node name of the exporter -> PyTorch module path.

    `/model/encoder/layer.0/attention/self/query/MatMul` -> `encoder.layer.0.attention.self.query`
    (the export wrapper holds the Hugging Face model as `model`).
    """
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1])


def linear_scales(onnx_model: Any, act_scales: dict[str, float], module: Any) -> dict[str, tuple[str, float]]:
    """{module path: (activation tensor, scale)} for each Linear whose MatMul/Gemm input has a scale."""
    import torch

    names = dict(module.named_modules())
    out = {}
    for n in onnx_model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[0] in act_scales:
            path = module_for_node(n.name)
            if isinstance(names.get(path), torch.nn.Linear):
                out[path] = (n.input[0], act_scales[n.input[0]])
    return out


def insert_fake_quant(model: Any, scales: dict[str, tuple[str, float]]) -> Any:
    """Replace each Linear named in `scales` by a FakeQuantLinear (in place); returns `model`."""
    for path, (_tensor, scale) in scales.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, FakeQuantLinear(getattr(parent, child), scale))
    return model


def remove_fake_quant(model: Any) -> dict[str, float]:
    """Put the (fine-tuned) Linears back; returns {module path: learned activation scale}."""
    learned = {}
    for path, mod in list(model.named_modules()):
        if type(mod).__name__ == "_FakeQuantLinear":
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, mod.linear)
            learned[path] = float(mod.act_scale.detach().abs())
    return learned


def qat_model(loaded: Any, onnx_model: Any, act_scales: dict[str, float], tokens: Any,
              settings: TrainSettings) -> tuple[Any, dict[str, float], TrainReport]:
    """Fine-tune a fake-quantized copy of `loaded.module` by distillation.

    Args:
        loaded: `compiler.models.LoadedModel` (FP32 teacher; not modified).
        onnx_model: the FP32 ONNX export of the teacher (node names map to modules).
        act_scales: PTQ activation scales {ONNX tensor: scale} (initial values).
        tokens: real training text (`calibration.TokenizedSet`), never the held-out set.

    Returns:
        (fine-tuned FP32 module with fake quantization removed, learned {ONNX tensor: scale},
        TrainReport).
    """
    teacher = loaded.module
    student = copy.deepcopy(teacher)
    placement = linear_scales(onnx_model, act_scales, student)
    insert_fake_quant(student, placement)
    scales = [p for n, p in student.named_parameters() if n.endswith("act_scale")]
    others = [p for n, p in student.named_parameters() if not n.endswith("act_scale")]
    report = distill(student, teacher, tokens, loaded.input_names, settings,
                     param_groups=[{"params": others, "lr": settings.lr},
                                   {"params": scales, "lr": settings.scale_lr}])
    learned_by_module = remove_fake_quant(student)
    learned = {placement[path][0]: s for path, s in learned_by_module.items()}
    log.info("QAT: %d steps, loss %.4g -> %.4g, %d scales learned", report.steps, report.loss_first,
             report.loss_last, len(learned))
    return student, learned, report
