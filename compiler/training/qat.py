"""Stage 3 (option): quantization-aware training (QAT) by distillation, exported as Q/DQ ONNX.

Fake quantization goes at the places PTQ (`compiler.quant.quantize`) puts Q/DQ, so the two compare
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

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from compiler.settings import TrainSettings  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

QMIN, QMAX = -128, 127  # symmetric INT8, zero point 0 (TensorRT and ONNX QuantizeLinear saturate here)


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


GROUP_CHUNK = 64  # batches per length-sorted chunk


def _batches_forever(tokens: Any, batch_size: int, input_names: list[str], seed: int,
                     group_by_length: bool = False) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """Padded training batches (feeds, lengths, sample indices into `tokens`), epoch after
    epoch, each epoch in a new random order.

    `group_by_length`: within chunks of `GROUP_CHUNK` batches of the shuffled samples, sort by
    length and cut batches there, then shuffle the batches. Each batch holds samples of similar
    length, so padding (to the batch's longest) wastes little compute: on 2048 WikiText-2 lines
    at 128 tokens, 262k padded token positions per epoch become 186k (185k valid); on WikiText-2
    mixed with SST-2 sentences, 254k become 113k (the `group_by_length` of Hugging Face's Trainer).
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([len(x) for x in tokens.input_ids])
    while True:
        order = rng.permutation(len(tokens))
        if group_by_length:
            chunk = batch_size * GROUP_CHUNK
            order = np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                                    for part in np.split(order, range(chunk, len(order), chunk))])
            batches = np.split(order, range(batch_size, len(order), batch_size))
            order = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
        shuffled = type(tokens)([tokens.input_ids[i] for i in order],
                                None if tokens.token_type_ids is None else [tokens.token_type_ids[i] for i in order],
                                tokens.pad_id, tokens.key)
        for start, (feeds, lengths) in zip(range(0, len(order), batch_size), shuffled.batches(batch_size, input_names)):
            yield feeds, lengths, order[start : start + batch_size]


class TeacherCache:
    """The teacher's outputs per training sample, kept after the first epoch.

    Each sample's states (last_hidden_state first, then the intermediate block outputs when the
    loss is layer-wise) are stored at its valid tokens only, in FP32 on the CPU, until
    `budget_mib` is spent; later samples are recomputed every epoch. The teacher is frozen and
    runs in eval mode, so a stored output is the one it would compute again (up to float
    summation order in another batch): caching changes the cost of a step, not what it trains
    towards. On MiniLM (6 layers) a teacher forward is ~20% of an FP32 step on the CPU.
    """

    def __init__(self, budget_mib: int) -> None:
        self.free = budget_mib * 2**20
        self.store: dict[int, list[Any]] = {}

    def get(self, idx: np.ndarray, device: Any) -> list[Any] | None:
        """(B, T, H) FP32 tensors on `device`, zero-padded, or None unless every sample is stored."""
        from torch.nn.utils.rnn import pad_sequence

        if not all(int(i) in self.store for i in idx):
            return None
        rows = [self.store[int(i)] for i in idx]
        return [pad_sequence([r[k] for r in rows], batch_first=True).to(device) for k in range(len(rows[0]))]

    def put(self, idx: np.ndarray, lengths: np.ndarray, states: list[Any]) -> None:
        for j, (i, n) in enumerate(zip(idx, lengths)):
            if int(i) in self.store:
                continue
            parts = [s[j, :n].detach().float().cpu().clone() for s in states]
            size = sum(p.numel() * p.element_size() for p in parts)
            if size > self.free:
                return
            self.store[int(i)] = parts
            self.free -= size


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier at step i (0-based) for `TrainSettings.schedule`.

    `constant`: 1. `linear`: warm-up from 1/w to 1 over the first w = max(1, 5% of steps)
    steps, then linear decay to 0 at `steps` (BERT's fine-tuning schedule, Devlin et al. 2019).
    """
    if schedule == "constant":
        return lambda i: 1.0
    if schedule != "linear":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: expected constant or linear")
    warm = max(1, steps // 20)
    return lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm))


def train_device(name: str) -> Any:
    """`TrainSettings.device` -> torch.device.

    Raises:
        CompilerError: a CUDA device that PyTorch cannot see (a CPU build of PyTorch, no GPU, or
            an index past the last GPU): names the fix (`--train-device cpu`, or a CUDA build).
    """
    import torch

    from compiler.errors import CompilerError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise CompilerError(
                f"training device {name!r}: PyTorch {torch.__version__} sees {count} CUDA GPU(s) "
                f"(torch.version.cuda={torch.version.cuda}); use --train-device cpu (or auto), or "
                "install a CUDA build of PyTorch on a machine with a GPU")
    return device


def distill(student: Any, teacher: Any, tokens: Any, input_names: list[str], settings: TrainSettings,
            param_groups: list[dict] | None = None,
            after_step: Callable[[Any], None] | None = None) -> TrainReport:
    """Fine-tune `student` to match `teacher`'s last_hidden_state on real text (dropout off).

    Args:
        student, teacher: Hugging Face models with the same output shapes; the teacher is frozen.
        tokens: `calibration.TokenizedSet` of real text (training samples, not the held-out set).
        input_names: model inputs to feed (`input_ids`, `attention_mask`, `token_type_ids`).
        settings: steps, learning rate and its schedule, batch size, device (both models train
            there and are back on the CPU on return, even after an error), `bf16` autocast of the
            student, and the teacher-output cache (`TeacherCache`, used when the run is longer
            than one epoch).
        param_groups: optimizer groups; default all student parameters at `settings.lr`.
        after_step: called with the student after every optimizer step (e.g. re-apply a 2:4 mask).

    Returns:
        TrainReport with the loss curve (MSE at valid tokens; plus the mean MSE of the
        intermediate block outputs when `settings.layerwise`).

    Raises:
        CompilerError: `settings.device` is a CUDA device PyTorch cannot see (`train_device`).
    """
    device = train_device(settings.device)
    try:
        student.to(device)
        teacher.to(device)
        return _distill(student, teacher, tokens, input_names, settings, param_groups, after_step, device)
    finally:
        student.to("cpu")
        teacher.to("cpu")


def _distill(student: Any, teacher: Any, tokens: Any, input_names: list[str], settings: TrainSettings,
             param_groups: list[dict] | None, after_step: Callable[[Any], None] | None,
             device: Any) -> TrainReport:
    import torch

    torch.manual_seed(settings.seed)
    teacher.eval()
    # Dropout off: the target is the teacher's deterministic output, and with few steps on
    # little text dropout noise dominates the loss. Gradients flow in eval mode all the same.
    student.eval()
    groups = param_groups or [{"params": [p for p in student.parameters() if p.requires_grad], "lr": settings.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(settings.schedule, settings.steps))
    losses = []
    start = time.perf_counter()
    from tqdm import tqdm

    more_than_an_epoch = settings.steps * settings.batch_size > len(tokens)
    cache = TeacherCache(settings.teacher_cache_mib) if settings.teacher_cache_mib and more_than_an_epoch else None
    batches = _batches_forever(tokens, settings.batch_size, input_names, settings.seed, settings.group_by_length)
    every = max(1, settings.steps // 20)  # a log line per 5% of the run: tqdm stays silent off a terminal
    for step in tqdm(range(settings.steps), desc="distillation", unit="step", disable=None, leave=False):
        feeds, lengths, idx = next(batches)
        inputs = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        layerwise = settings.layerwise
        targets = cache.get(idx, device) if cache else None  # [last_hidden_state, block outputs...]
        if targets is None:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=layerwise)
            targets = [t_out.last_hidden_state] + (list(t_out.hidden_states[1:-1]) if layerwise else [])
            if cache:
                cache.put(idx, lengths, targets)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            s_out = student(**inputs, output_hidden_states=layerwise)

        def mse(a: Any, b: Any) -> Any:  # at valid tokens, (B, T, H), in FP32
            return (((a.float() - b) ** 2) * mask).sum() / (mask.sum() * a.shape[-1])

        loss = mse(s_out.last_hidden_state, targets[0])
        if layerwise:  # every block's output too (Jiao et al. 2020, TinyBERT): a denser signal
            pairs = list(zip(s_out.hidden_states[1:-1], targets[1:]))
            loss = loss + sum(mse(a, b) for a, b in pairs) / max(1, len(pairs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(student)
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - start
            recent = losses[-every:]
            log.info("distillation step %d/%d: loss %.4g (mean of the last %d), %.0f s, about %.0f s left",
                     step + 1, settings.steps, sum(recent) / len(recent), len(recent), elapsed,
                     elapsed / (step + 1) * (settings.steps - step - 1))
    student.eval()
    return TrainReport(settings.steps, round(time.perf_counter() - start, 1),
                       losses[0] if losses else 0.0, losses[-1] if losses else 0.0, losses)


def _fake_quant_module(linear: Any, act_scale: Any, inv_smooth: Any = None) -> Any:
    """A module computing `linear` with fake-quantized input and weight.

    Input: optionally multiplied by the fixed SmoothQuant factors `inv_smooth` (K,) first (the
    weights then carry s = 1 / inv_smooth, see `insert_fake_quant`); then per tensor, symmetric
    INT8, scale = |act_scale| (a shared learnable Parameter, one per ONNX tensor, so Q, K and V
    projections reading the same tensor learn one scale, as the Q/DQ graph has one pair per
    tensor); gradient by LSQ (Esser et al. 2020, through
    torch._fake_quantize_learnable_per_tensor_affine). Weight: per output channel,
    scale = absmax / 127 of the current weight (straight-through): nn.Linear (out, in) ->
    axis 0; GPT-2 Conv1D (in, out) -> axis 1.
    """
    import torch

    conv1d = type(linear).__name__ == "Conv1D"

    class _FakeQuantLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear
            self.act_scale = act_scale
            self.inv_smooth = inv_smooth

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):  # INT8 simulation in FP32, also under bf16
                return self._forward(x.float())

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.inv_smooth is not None:
                x = x * self.inv_smooth.to(x.device)  # a plain tensor: Module.to leaves it
            scale = self.act_scale.abs() + 1e-12
            xq = torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, torch.zeros_like(scale), QMIN, QMAX, 1.0 / (x.numel() * QMAX) ** 0.5)
            w = self.linear.weight
            axis = 1 if conv1d else 0
            w_scale = (w.detach().abs().amax(dim=1 - axis) / QMAX).clamp_min(1e-12)
            wq = torch.fake_quantize_per_channel_affine(
                w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), axis, QMIN, QMAX)
            if conv1d:
                return torch.addmm(self.linear.bias, xq.reshape(-1, xq.shape[-1]), wq).reshape(
                    *xq.shape[:-1], wq.shape[1])
            return torch.nn.functional.linear(xq, wq, self.linear.bias)

    return _FakeQuantLinear()


def _is_linear(mod: Any) -> bool:
    import torch

    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_placement(onnx_model: Any, quantized_nodes: list[str], module: Any) -> dict[str, tuple[str, str]]:
    """{module path: (ONNX node, its activation tensor)} for each quantized MatMul/Gemm.

    Raises:
        ValueError: a quantized node whose weight MatMul maps to no Linear module (the QAT
            placement would then differ from PTQ's).
    """
    names = dict(module.named_modules())
    wanted = set(quantized_nodes)
    out, missing = {}, []
    for n in onnx_model.graph.node:
        if n.name in wanted and n.op_type in ("MatMul", "Gemm"):
            path = module_for_node(n.name)
            if _is_linear(names.get(path)):
                out[path] = (n.name, n.input[0])
            else:
                missing.append(n.name)
    if missing:
        raise ValueError(f"QAT: {len(missing)} quantized MatMul/Gemm nodes map to no Linear module "
                         f"(first: {missing[0]}); QAT fake-quantizes Linear layers only (set "
                         "quantize_attention_bmm off)")
    return out


def insert_fake_quant(model: Any, placement: dict[str, tuple[str, str]], thresholds: dict[str, float],
                      smoothing: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Wrap each Linear of `placement` in fake quantization (in place).

    Args:
        placement: {module path: (node, activation tensor)} (`linear_placement`).
        thresholds: {tensor: |x| threshold} of the (smoothed) input; the initial scale is
            threshold / 127.
        smoothing: {tensor: (K,) float32 1/s} SmoothQuant factors of PTQ (`compiler.quant.quantize.
            smooth`): the Linear's weight input channels are multiplied by s in place and the
            wrapper multiplies its input by 1/s, the same function PTQ quantized.

    Returns:
        {tensor: the shared learnable scale Parameter}.
    """
    import torch

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
                linear.weight.mul_((1.0 / inv)[:, None] if type(linear).__name__ == "Conv1D" else (1.0 / inv)[None, :])
        setattr(parent, child, _fake_quant_module(linear, params[tensor], inv))
    return params


def remove_fake_quant(model: Any) -> None:
    """Put the (fine-tuned) Linears back in place of their fake-quantized wrappers.

    A smoothed Linear keeps its smoothed weights and gets a forward pre-hook multiplying its
    input by 1/s: the model computes the same function, and the export has Mul(x, 1/s) ->
    MatMul, node names unchanged, as PTQ's smoothed graph.
    """
    for path, mod in list(model.named_modules()):
        if type(mod).__name__ == "_FakeQuantLinear":
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
        settings: steps, learning rates, batch size.
        after_step: called after each optimizer step (the 2:4 masks of sparse QAT).
        smoothing: {tensor: (K,) 1/s} from PTQ's SmoothQuant, or None.

    Returns:
        ({quantized node: learned threshold (scale x 127)} for `compiler.quant.quantize.insert_qdq`
        on the fine-tuned export, TrainReport).

    Raises:
        ValueError: see `linear_placement`.
    """
    placement = linear_placement(onnx_model, quantized_nodes, student)
    params = insert_fake_quant(student, placement, thresholds, smoothing)
    scale_ids = {id(p) for p in params.values()}
    others = [p for p in student.parameters() if id(p) not in scale_ids]
    try:
        report = distill(student, teacher, tokens, input_names, settings,
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
    """{activation tensor: (K,) 1/s} read from a SmoothQuant-ed graph (`compiler.quant.quantize.smooth`
    names them `<tensor>_smooth_inv_scale`)."""
    from onnx import numpy_helper

    suffix = "_smooth_inv_scale"
    return {t.name[: -len(suffix)]: numpy_helper.to_array(t) for t in qdq_model.graph.initializer
            if t.name.endswith(suffix)}


def int8_qat(student: Any, teacher: Any, loaded: Any, fp32_path: Any, reference_path: Any, calib: Any,
             heldout: Any, train_tokens: Any, output_names: list[str], quant: Any, train: TrainSettings,
             float_precision: Any, export: Any, qat_onnx_path: Any, parity_texts: list[str], cache_dir: Any,
             batch_size: int, after_step: Callable[[Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """PRECISION=int8-qat: PTQ placement and scales, distillation with fake quantization, Q/DQ export.

    1. PTQ with `quant` (`compiler.quant.quantize.quantize_within_budget`, SmoothQuant and the
       budget loop included): the placement (quantized MatMuls, nodes left float), the
       smoothing factors and thresholds QAT starts from, and the PTQ figure QAT is compared with.
    2. `qat_model`: the same smoothing applied to `student` (an exact transform), then
       fine-tuning against `teacher` on `train_tokens` with fake quantization at exactly PTQ's
       MatMuls, scales starting from PTQ's thresholds: QAT starts where PTQ ends.
    3. Export the fine-tuned student (FP32, parity-checked against itself) to `qat_onnx_path`
       and place Q/DQ with the learned thresholds and the same exclusions (`insert_qdq`).
    4. Held-out fidelity of PTQ and QAT side by side, both through `float_precision` (e.g.
       hybrid FP16 on the faithful FP16 reference) against `reference_path` (dense FP32).

    Args:
        student: PyTorch model to fine-tune (in place); `teacher`: the dense FP32 model.
        loaded: `compiler.training.models.LoadedModel` (tokenizer, input names, key).
        fp32_path: the student's FP32 ONNX export (opset >= 19); reference_path: the dense one.
        calib, heldout, train_tokens: disjoint `calibration.TokenizedSet`s of real text.
        quant: `QuantSettings`; train: `TrainSettings`; float_precision: `PrecisionSettings`
            for what is not quantized; export: `ExportSettings` (opset >= 19).
        qat_onnx_path: where the fine-tuned FP32 export goes; parity_texts: its parity text.

    Returns:
        (FP32 + Q/DQ onnx.ModelProto of the fine-tuned model, report dict with `summary`,
        `heldout` (PTQ and QAT side by side), `ptq`, `qat`, `training`).

    Raises:
        ValueError: a quantized MatMul that is not a Linear (`linear_placement`), or a QAT
            placement that differs from PTQ's.
        compiler.errors.ExportParityError: the fine-tuned model's export disagrees with PyTorch.
    """
    from dataclasses import replace
    from pathlib import Path

    import onnx

    from compiler.training.export import onnx_from_torch
    from compiler.passes.precision import convert_precision
    from compiler.eval.fidelity import FidelityProbe
    from compiler.quant.quantize import insert_qdq, quantize_within_budget
    from compiler.settings import settings_hash

    input_names = loaded.input_names
    ptq_model, ptq = quantize_within_budget(fp32_path, calib, heldout, input_names, output_names, quant,
                                            cache_dir, batch_size, precision=float_precision)
    smoothing = smoothing_factors(ptq_model)
    light = onnx.load(str(fp32_path), load_external_data=False)
    by_name = {n.name: n for n in light.graph.node}
    thresholds = {}
    for node in ptq.quantized_nodes:  # PTQ's thresholds, keyed by the unsmoothed graph's tensor
        t = by_name[node].input[0]
        thresholds[t] = ptq.thresholds[f"{t}_smoothed" if t in smoothing else t]
    learned, training = qat_model(student, teacher, input_names, light, ptq.quantized_nodes, thresholds,
                                  train_tokens, train, after_step, smoothing)
    from compiler.graph.onnx_io import onnx_sha256

    tuned = replace(loaded, module=student, key=settings_hash("qat-v2", loaded.key, onnx_sha256(fp32_path), quant,
                                                               train, calib.key, train_tokens.key))
    path, export_report = onnx_from_torch(tuned, export, Path(qat_onnx_path), parity_texts)
    exported = onnx.load(str(path))
    act = {n.input[0]: learned[n.name] for n in exported.graph.node if n.name in learned}
    exclude = {e.name: "sensitivity" for e in ptq.excluded if e.reason == "sensitivity"}
    model, rep = insert_qdq(exported, act, replace(quant, smoothquant_alpha=None), exclude_nodes=exclude)
    del exported
    if sorted(rep.quantized_nodes) != sorted(ptq.quantized_nodes):
        raise ValueError("QAT placement differs from PTQ's: "
                         f"{sorted(set(rep.quantized_nodes) ^ set(ptq.quantized_nodes))[:5]}")
    probe = FidelityProbe.on_tokens(reference_path, heldout, input_names, output_names[0], batch_size)
    fid_ptq = probe.score(convert_precision(ptq_model, float_precision)[0]).to_dict()
    fid_qat = probe.score(convert_precision(model, float_precision)[0]).to_dict()
    rep.method, rep.smoothquant_alpha = ptq.method, ptq.smoothquant_alpha
    rep.fidelity = {**fid_qat, "heldout_samples": len(heldout)}
    parity = max(p.max_abs_diff for p in export_report.parity)
    summary = {"method": "qat", "calibration_method": ptq.method, "smoothquant_alpha": ptq.smoothquant_alpha,
               "quantized_matmuls": rep.quantized_matmuls, "excluded": [e.name for e in rep.excluded],
               "int8_mac_fraction": round(rep.int8_mac_fraction, 4),
               "cosine_min": fid_qat["cosine_min"], "ptq_cosine_min": fid_ptq["cosine_min"],
               "budget_min_cosine": quant.min_cosine, "budget_met": fid_qat["cosine_min"] >= quant.min_cosine
               and fid_qat["nonfinite_count"] == 0, "float_mode": float_precision.mode,
               "training_steps": training.steps, "training_seconds": training.seconds}
    report = {"summary": summary,
              "heldout": {"reference": str(reference_path), "graph": f"{float_precision.mode} + INT8",
                          "ptq_same_placement": fid_ptq, "qat": fid_qat},
              "ptq": ptq.to_dict(), "qat": rep.to_dict(), "training": training.to_dict(),
              "qat_export": {"onnx": str(path), "parity_worst": parity}}
    log.info("QAT: held-out cosine_min %.5f (PTQ at the same placement %.5f)", fid_qat["cosine_min"],
             fid_ptq["cosine_min"])
    return model, report
