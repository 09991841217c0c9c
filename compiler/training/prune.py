"""2:4 structured sparsity in PyTorch: choose the layers, prune, hold the masks, recover.

2:4 ("two of four") sparsity means at least 2 zeros in every group of 4 consecutive weights
along a GEMM's reduction dimension K (the input features of a linear layer). NVIDIA's sparse
tensor cores (Ampere and later) store only the 2 kept values and a 2-bit index per value and
skip the zeros, up to twice the math throughput of the dense GEMM (Mishra et al. 2021,
"Accelerating Sparse Deep Neural Networks", arXiv:2104.08378). TensorRT uses sparse kernels only
when the builder flag `BuilderFlag.SPARSE_WEIGHTS` is set (`EngineSettings.sparse_weights`) and
a constant weight already has the pattern; it never prunes, and it times sparse against dense
kernels per layer, so the pattern is necessary, not sufficient, for a speed-up.

The stage, run in PyTorch before export:

1. `block_linears` picks the linear layers inside the transformer blocks (not the embeddings,
   pooler or head); `prune_2_4` keeps 2 of every 4 weights along the input dimension, in
   place, by |w| x input norm over calibration text (Wanda, the default), by |w|, or by
   SparseGPT's OBS saliency with an update of the kept weights (`compiler.training.sparsegpt`),
   and returns the masks.
2. `recover` fine-tunes the pruned model against the dense one with the project's one training
   loop (`compiler.training.distill.distill`), the masks re-applied after every optimizer step
   (`hold_masks`).
3. After export (and FP16 conversion or INT8 Q/DQ), `compiler.graph.sparsity.check_2_4` reads
   the ONNX graph and says which MatMul/Gemm weights TensorRT can run sparse.

torch is imported when a function is called.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from compiler.errors import SettingsError
from compiler.graph.sparsity import GROUP, KEEP
from compiler.settings import SparsitySettings, TrainSettings
from compiler.training.distill import TrainReport, distill
from compiler.training.sparsegpt import sparsegpt_2_4

CALIBRATED_METHODS = ("wanda", "sparsegpt")  # methods that read calibration text (SparsitySettings.method)


def needs_calibration(method: str) -> bool:
    """Whether pruning by `method` (`SparsitySettings.method`) runs the model on calibration text:
    `wanda` (input norms) and `sparsegpt` (input Hessians) do, `magnitude` does not."""
    return method in CALIBRATED_METHODS


@dataclass
class SparsityPruneReport:
    """What `prune_2_4` did.

    Attributes:
        pattern: `2:4`.
        method: `magnitude`, `wanda` or `sparsegpt` (`SparsitySettings.method`).
        pruned: module names pruned, in module order.
        skipped: {module name: reason} for selected layers left dense.
        zero_fraction: zeros / elements over the pruned layers' weights (0.5 for dense weights).
        seconds: wall time.
    """

    pattern: str
    method: str
    pruned: list[str]
    skipped: dict[str, str]
    zero_fraction: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_linear(module: Any) -> bool:
    """Whether `module` is a linear layer: `torch.nn.Linear` (weight (out, in)) or transformers'
    `Conv1D` (GPT-2; weight (in, out)), by isinstance (a lookalike class of the same name is not)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def block_linears(module: Any, layers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The linear layers to prune: {module name: nn.Linear or transformers Conv1D}.

    Args:
        module: a PyTorch model (e.g. `LoadedModel.module`); names are relative to it.
        layers: fnmatch patterns on module names (e.g. `encoder.layer.*.intermediate.dense`);
            when given, every linear layer of `module` whose name matches one is chosen.
            Empty: every linear inside the transformer blocks, i.e. the children of the
            `nn.ModuleList` holding the most parameters (BERT `encoder.layer`, GPT-2 `h`), which
            leaves out embeddings, pooler and output head.

    Returns:
        {name: module} in `module.named_modules()` order.

    Raises:
        SettingsError: (a ValueError; exit 1) no pattern matches a linear layer, or (default)
            no ModuleList of blocks holds one.
    """
    import torch

    linears = {n: m for n, m in module.named_modules() if is_linear(m)}
    if layers:
        chosen = {n: m for n, m in linears.items() if any(fnmatch.fnmatchcase(n, p) for p in layers)}
        if not chosen:
            some = ", ".join(list(linears)[:6]) or "none"
            raise SettingsError(f"--sparse-layers {' '.join(layers)}: matches no linear layer of "
                                f"{type(module).__name__}; linear layers are named like: {some} (fnmatch "
                                "patterns, e.g. '*ffn*')")
        return chosen
    lists = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise SettingsError(f"{type(module).__name__} has no nn.ModuleList of transformer blocks; "
                            "choose the layers with --sparse-layers (fnmatch patterns on module names)")
    name, _ = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    prefix = f"{name}." if name else ""
    chosen = {n: m for n, m in linears.items() if n.startswith(prefix)}
    if not chosen:
        raise SettingsError(f"the blocks {name!r} of {type(module).__name__} hold no nn.Linear or Conv1D; "
                            "choose the layers with --sparse-layers (fnmatch patterns on module names)")
    return chosen


def input_axis(m: Any) -> int:
    """Axis of the weight of linear layer `m` that is its input (reduction) dimension.

    Returns:
        1 for `torch.nn.Linear` (weight (out, in)), 0 for anything else, i.e. transformers'
        `Conv1D` (weight (in, out)); the output-channel axis is `1 - input_axis(m)`.
    """
    import torch

    return 1 if isinstance(m, torch.nn.Linear) else 0  # Linear (out, in); Conv1D (in, out)


def magnitude_mask_2_4(weight: Any, in_axis: int) -> Any:
    """Bool mask keeping the 2 largest |w| of every 4 consecutive weights along `in_axis`.

    Args:
        weight: 2-D float tensor (a weight or a per-weight score); its size along `in_axis`
            must be a multiple of 4.

    Returns:
        torch.bool tensor of `weight`'s shape with exactly 2 True per group (among equal |w|,
        the ones `torch.topk` returns first; its order of ties is not specified).
    """
    import torch

    w = weight.detach().abs().movedim(in_axis, -1)  # (..., K)
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    keep = groups.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape).movedim(-1, in_axis)


def input_norms(module: Any, layers: dict[str, Any], tokens: Any, input_names: list[str],
                batch_size: int = 8) -> dict[str, Any]:
    """||x_j||_2 of every input feature j of each layer over the valid tokens of `tokens`.

    Args:
        module: the model the layers belong to (run in eval mode, no gradients).
        layers: {name: nn.Linear or Conv1D}, e.g. from `block_linears`.
        tokens: `calibration.TokenizedSet` of real text (padding positions are left out).
        input_names: model inputs (`LoadedModel.input_names`).

    Returns:
        {name: float32 tensor (in_features,)}.
    """
    import torch

    sums = {n: torch.zeros(m.weight.shape[input_axis(m)], dtype=torch.float64) for n, m in layers.items()}
    valid: dict[str, Any] = {}  # the batch's attention mask (B, T), set before each forward

    def hook(name: str) -> Callable:
        def pre(_mod: Any, args: tuple) -> None:
            x = args[0].detach()[valid["mask"]]  # (valid tokens, in_features)
            sums[name] += (x.double() ** 2).sum(0)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for feeds, _lengths in tokens.batches(batch_size, input_names):
                inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
                valid["mask"] = inputs["attention_mask"].bool()
                module(**inputs)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return {n: v.sqrt().float() for n, v in sums.items()}


def prune_2_4(module: Any, settings: SparsitySettings, tokens: Any = None,
              input_names: list[str] | None = None) -> tuple[dict[str, Any], SparsityPruneReport]:
    """2:4 pruning of `block_linears(module, settings.layers)`, in place.

    In each group of 4 consecutive weights along the input dimension (nn.Linear weight
    (out, in): dim 1; Conv1D weight (in, out): dim 0) 2 weights are kept and the other 2 set to
    0; biases are untouched. Which 2 by `settings.method`: `magnitude` keeps the largest |w|;
    `wanda` keeps the largest |w_ij| * ||x_j||_2, the input norms measured on `tokens` with the
    dense model (Sun et al. 2023, arXiv:2306.11695), so a small weight on a large activation
    outranks a larger one on a quiet input; `sparsegpt` chooses by OBS saliency and also updates
    the kept weights to reconstruct each layer's output on `tokens`, layer by layer with the
    earlier layers already pruned (Frantar & Alistarh 2023, arXiv:2301.00774;
    `compiler.training.sparsegpt`).

    Args:
        module: PyTorch model, modified in place.
        settings: `pattern` must be `2:4`; `method`; `layers` as in `block_linears`.
        tokens: `calibration.TokenizedSet` of real calibration text (`wanda`, `sparsegpt`).
        input_names: model inputs (`wanda`, `sparsegpt`).

    Returns:
        ({module name: torch.bool mask of the weight's shape, True = kept}, report). A layer
        whose input dimension is not a multiple of 4 is left dense, listed in
        `report.skipped` with the reason, and has no mask.

    Raises:
        ValueError: `settings.pattern` is not `2:4`, `wanda` or `sparsegpt` without tokens,
            or no layer selected.
    """
    import torch

    if settings.pattern != "2:4":  # the method is checked by SparsitySettings itself
        raise ValueError(f"prune_2_4 needs pattern='2:4', got pattern={settings.pattern!r}")
    if needs_calibration(settings.method) and (tokens is None or input_names is None):
        raise ValueError(f"sparsity method {settings.method!r} measures the layers' inputs: pass calibration "
                         "tokens and input_names to prune_2_4, or use method='magnitude'")
    start = time.perf_counter()
    masks, skipped = {}, {}
    zeros = total = 0
    chosen = {}
    for name, m in block_linears(module, settings.layers).items():
        k = m.weight.shape[input_axis(m)]
        if k % GROUP:
            skipped[name] = f"input dimension {k} is not a multiple of {GROUP}"
            continue
        chosen[name] = m
    if not chosen:
        raise SettingsError(f"no layer could be pruned 2:4 (2:4 groups run along the input axis): {skipped}; "
                            "leave out --sparsity 2:4 for this model, or choose other layers with --sparse-layers")
    norms = input_norms(module, chosen, tokens, input_names) if settings.method == "wanda" else {}
    if settings.method == "sparsegpt":  # masks chosen and kept weights updated, layer by layer
        masks = sparsegpt_2_4(module, chosen, {n: input_axis(m) for n, m in chosen.items()}, tokens, input_names)
    for name, m in chosen.items():
        if name not in masks:
            axis = input_axis(m)
            score = m.weight.detach().abs()
            if name in norms:  # broadcast the per-input-feature norm along the input axis
                score = score * (norms[name][None, :] if axis == 1 else norms[name][:, None])
            masks[name] = magnitude_mask_2_4(score, axis)
        with torch.no_grad():
            m.weight.masked_fill_(~masks[name], 0.0)
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    masks = {n: masks[n] for n in chosen}  # module order (sparsegpt returns them in execution order)
    report = SparsityPruneReport("2:4", settings.method, list(masks), skipped, zeros / total,
                                 round(time.perf_counter() - start, 3))
    return masks, report


def hold_masks(masks: dict[str, Any], module: Any) -> Callable[[Any], None]:
    """An `after_step` for `compiler.training.distill.distill` that re-applies `masks` (pruned weights = 0).

    Args:
        masks: {module name: bool mask}, as returned by `prune_2_4`.
        module: the model the masks belong to (checked once: names and shapes).

    Returns:
        f(model): sets every masked-out weight of `model` to 0 under `torch.no_grad()`.

    Raises:
        ValueError: a name that is not a submodule with a weight of the mask's shape.
    """
    import torch

    for name, mask in masks.items():
        try:
            weight = module.get_submodule(name).weight
        except AttributeError as e:
            raise ValueError(f"mask {name!r}: no such submodule with a weight in {type(module).__name__}") from e
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")

    def weight_of(model: Any, name: str) -> Any:
        mod = model.get_submodule(name)
        # QAT wraps each Linear in a fake-quantizing module that holds it as `.linear`
        return mod.weight if hasattr(mod, "weight") else mod.linear.weight

    def apply(model: Any) -> None:
        with torch.no_grad():
            for name, mask in masks.items():
                weight = weight_of(model, name)
                weight.masked_fill_(~mask.to(weight.device), 0.0)

    return apply


def recover(student: Any, teacher: Any, masks: dict[str, Any], tokens: Any, input_names: list[str],
            train: TrainSettings, steps: int, evaluate: Callable[[Any], float] | None = None,
            train_embeddings: bool = True) -> TrainReport:
    """Distillation recovery of a pruned `student` with its 2:4 masks held fixed.

    Runs `compiler.training.distill.distill` (MSE of last_hidden_state against the dense `teacher` at valid
    tokens) for `steps` optimizer steps with `train`'s learning rate, schedule, batch size and
    seed; the masks are applied before the first step and after every step.

    Args:
        student: the pruned model (fine-tuned in place, left in eval mode).
        teacher: the dense FP32 model (frozen).
        masks: from `prune_2_4` on `student`.
        tokens: `calibration.TokenizedSet` of training text (never the held-out set).
        input_names: model inputs (`LoadedModel.input_names`).
        evaluate: a held-out figure recorded along the run (`distill`'s `evaluate`).
        train_embeddings: False holds the input token-embedding table (`get_input_embeddings()`,
            never pruned; with it an output head tied to it) at its weights: no gradient and no
            optimizer state for it (`SparsitySettings.recover_embeddings`). Its `requires_grad`
            is restored on return.

    Returns:
        compiler.training.distill.TrainReport (with the held-out curve when `evaluate` is given).

    Raises:
        ValueError: the student has no trainable parameter, or a mask does not fit it.
    """
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError("recover: no parameter of the student requires grad (a copy of a teacher that "
                         "distill already froze?); copy the model before the first distill run")
    after_step = hold_masks(masks, student)
    after_step(student)
    frozen = [] if train_embeddings else [p for p in student.get_input_embeddings().parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        return distill(student, teacher, tokens, input_names, dataclasses.replace(train, steps=steps),
                       after_step=after_step, evaluate=evaluate)
    finally:
        for p in frozen:
            p.requires_grad_(True)
