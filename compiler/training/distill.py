"""The project's one training loop: distillation of a student against a frozen FP32 teacher.

The student is fine-tuned to reproduce the teacher's outputs on real text (no labels): loss =
mean squared error of `last_hidden_state` at valid tokens, plus (`TrainSettings.layerwise`) the
mean MSE of every intermediate block output times `TrainSettings.layerwise_weight` (TinyBERT,
Jiao et al. 2020). A model with a task
head (`*ForSequenceClassification`, `*ForQuestionAnswering`, `*ForMaskedLM`, `*ForCausalLM`)
returns no `last_hidden_state`: its final block output (`hidden_states[-1]`) takes that place and
the MSE of each head output (`logits`, `start_logits`/`end_logits`) is added, so the head's own
layers (pooler, classifier; fake-quantized by QAT) are pulled towards the teacher's answer too
(the prediction-layer term of TinyBERT, with MSE on logits). Two callers:

- QAT (`compiler.training.qat.qat_model`): fake quantization inserted, learnable activation
  scales in their own parameter group;
- 2:4 sparsity recovery (`compiler.training.prune.recover`): the masks re-applied after every
  optimizer step through `after_step`.

`compiler.training.teacher_cache.TeacherCache` keeps the teacher's outputs after the first
epoch; `length_groups` splits a padded batch into sub-batches of similar length
(`TrainSettings.split_by_length`); `lr_factor` is the learning rate schedule; `train_device`
resolves `TrainSettings.device`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from compiler.settings import TrainSettings
from compiler.training.teacher_cache import TeacherCache

log = logging.getLogger(__name__)

GROUP_CHUNK = 64  # batches per length-sorted chunk
# what one more sub-batch costs, in padded token positions (PyTorch's per-call work of a forward
# and backward): MiniLM on 2 CPU cores, batch 8 of the mixed recovery text, a step 1.063 s
# padded, 1.130 / 0.902 / 0.856 / 0.790 / 0.901 s split at 0 / 32 / 64 / 128 / 256
# (`python -m benchmarks.split_batches`, docs/sparsity.md)
SPLIT_COST_TOKENS = 128


@dataclass
class TrainReport:
    """What one `distill` run did.

    Attributes:
        steps: optimizer steps run.
        seconds: wall time of the loop.
        loss_first / loss_last: the loss of the first and the last step (0.0 when no step ran).
        losses: the loss of every step (`to_dict` keeps about 20 of them).
        curve: [step, training seconds, held-out value] before the first step and at every 5 %
            of the run, when `distill` was given `evaluate` (the seconds leave out the
            evaluations themselves); empty otherwise.
    """

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    losses: list[float] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"] = [round(v, 6) for v in self.losses[:: max(1, len(self.losses) // 20)]]
        return d


def batches_forever(tokens: Any, batch_size: int, input_names: list[str], seed: int,
                    group_by_length: bool = False) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """Padded training batches, epoch after epoch, each epoch in a new random order.

    `group_by_length`: within chunks of `GROUP_CHUNK` batches of the shuffled samples, sort by
    length and cut batches there, then shuffle the batches. Each batch holds samples of similar
    length, so padding (to the batch's longest) wastes little compute: on 2048 WikiText-2 lines
    at 128 tokens, 262k padded token positions per epoch become 186k (185k valid); on WikiText-2
    mixed with SST-2 sentences, 254k become 113k (the `group_by_length` of Hugging Face's Trainer).

    Args:
        tokens: `calibration.TokenizedSet`.
        batch_size: samples per batch (the last batch of an epoch may be smaller).
        input_names: model inputs to fill.
        seed: seed of the shuffling (`numpy.random.default_rng`).
        group_by_length: see above.

    Yields:
        (feeds {input: (B, T) int64}, valid lengths (B,), indices (B,) of the samples in `tokens`).
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


def length_groups(lengths: np.ndarray, cost_tokens: int | None = None) -> list[np.ndarray]:
    """Split one batch into sub-batches of similar length, each padded only to its own longest.

    The samples, longest first, are cut into runs that minimize the padded token positions
    (sum over sub-batches of samples x longest) plus `cost_tokens` per sub-batch (dynamic
    programming over the cut points; a batch holds a few samples). The batch itself is not
    changed, only how it is computed: `_distill` runs each sub-batch's forward and backward,
    the loss normalized by the whole batch's valid tokens, and takes one optimizer step, so the
    gradient is the padded batch's up to float summation order. On MiniLM's mixed recovery text
    (batch 8: SST-2 sentences of ~15 tokens beside WikiText-2 lines of up to 128) padding is 47 %
    of the positions; split, a step takes 0.79 s instead of 1.06 s (`benchmarks.split_batches`).

    Args:
        lengths: (B,) valid tokens per sample.
        cost_tokens: what one more sub-batch costs, in padded token positions (None:
            `SPLIT_COST_TOKENS`).

    Returns:
        Sub-batches as arrays of indices into `lengths`, longest first; together every index
        once.
    """
    cost_tokens = SPLIT_COST_TOKENS if cost_tokens is None else cost_tokens
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sizes = np.asarray(lengths)[order]
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # samples i..j-1 in one sub-batch, padded to sizes[i]
            cost = best[i] + (j - i) * float(sizes[i]) + cost_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier at step i (0-based) for `TrainSettings.schedule`.

    `constant`: 1. `linear`: warm-up from 1/w to 1 over the first w = max(1, steps // 20)
    steps, then linear decay, (steps - i) / (steps - w), to 0 at `steps` (BERT's fine-tuning
    schedule, Devlin et al. 2019).

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule == "constant":
        return lambda i: 1.0
    if schedule != "linear":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: expected constant or linear")
    warm = max(1, steps // 20)
    return lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm))


def bf16_matmul_available(device: str) -> bool:
    """Whether `device` (`TrainSettings.device`: cpu, cuda, cuda:N, auto) multiplies bfloat16 in
    hardware: a CUDA GPU with BF16 (`torch.cuda.is_bf16_supported`, Ampere and later), or a CPU
    with AVX512-BF16 or AMX-BF16 (the `/proc/cpuinfo` flags; False where that file is missing).
    Elsewhere bfloat16 autocast is emulated and slower than FP32."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def adamw(groups: list[dict]) -> Any:
    """AdamW without weight decay over `groups`, with PyTorch's fused kernel (one pass over all
    parameters; `torch.optim.AdamW(fused=True)`, CPU and CUDA): the default single-tensor loop
    cost MiniLM's distillation step 0.924 s against 0.747 s fused (batch 8 of WikiText-2 and
    SST-2 text, 2 CPU cores; 19 % of the step). Where the fused kernel is not available
    (another device, a parameter dtype it lacks) the default implementation runs instead."""
    import torch

    try:
        return torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, weight_decay=0.0)


def train_device(name: str) -> Any:
    """`TrainSettings.device` -> torch.device.

    `auto`: the first CUDA GPU when PyTorch sees one, else the CPU.

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
            after_step: Callable[[Any], None] | None = None,
            evaluate: Callable[[Any], float] | None = None) -> TrainReport:
    """Fine-tune `student` to match `teacher`'s last_hidden_state on real text (dropout off).

    Args:
        student, teacher: Hugging Face models with the same output shapes; the teacher is frozen.
        tokens: `calibration.TokenizedSet` of real text (training samples, not the held-out set).
        input_names: model inputs to feed (`input_ids`, `attention_mask`, `token_type_ids`).
        settings: steps, learning rate and its schedule, batch size, device (both models train
            there and are back on the CPU on return, even after an error), `bf16` autocast of the
            student, the teacher-output cache (`TeacherCache`, used when the run is longer
            than one epoch), and `split_by_length` (`length_groups`; on a CPU device only).
        param_groups: optimizer groups; default all student parameters at `settings.lr`.
        after_step: called with the student after every optimizer step (e.g. re-apply a 2:4 mask).
        evaluate: student -> a held-out figure (`compiler.training.heldout.heldout_cosine`),
            recorded in `TrainReport.curve` before the first step and with every progress line.

    Returns:
        TrainReport with the loss curve (MSE at valid tokens; plus the mean MSE of the
        intermediate block outputs when `settings.layerwise`).

    Raises:
        CompilerError: `settings.device` is a CUDA device PyTorch cannot see (`train_device`), or
            training there ran out of GPU memory (the fixes named; the models are back on the CPU).
    """
    import torch

    from compiler.errors import CompilerError

    device = train_device(settings.device)
    # Denormals (< 1.2e-38) flushed to zero while training, on the calling thread (PyTorch's
    # API): a microcode assist each on x86. MiniLM 2:4, 60 steps on 2 cores: 47.0 s, not 49.1-49.7 s,
    # the loss the same to 1e-9 (docs/sparsity.md). Back to PyTorch's default (off) on return.
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    log.info("distillation on %s (%s): %d steps of batch %d, bf16 autocast %s", device, where, settings.steps,
             settings.batch_size, "on" if settings.bf16 else "off")
    try:
        student.to(device)
        teacher.to(device)
        return _distill(student, teacher, tokens, input_names, settings, param_groups, after_step, evaluate,
                        device)
    except torch.cuda.OutOfMemoryError as e:  # `auto` picks any GPU PyTorch sees, a small or busy one too
        raise CompilerError(
            f"training on {device} ran out of GPU memory ({str(e).splitlines()[0][:160]}); use "
            "--train-device cpu, a smaller --recover-batch-size / --train-batch-size, or a GPU with more "
            "free memory") from e
    finally:
        student.to("cpu")
        teacher.to("cpu")
        if flushed:
            torch.set_flush_denormal(False)


def distill_loss(student_out: Any, targets: list[Any], mask: Any, layerwise: bool,
                 tokens: float | None = None, samples: int | None = None, layerwise_weight: float = 1.0) -> Any:
    """The distillation loss of one batch, or one sub-batch's share of it (a scalar FP32 tensor).

    Args:
        student_out: the student's output (`last_hidden_state`, `hidden_states` when layer-wise;
            a head model's `hidden_states` and head outputs, see `split_outputs`).
        targets: [teacher final hidden state, its intermediate block outputs..., its head
            outputs...]; hidden states (B, T, H).
        mask: (B, T, 1) float, 1 at valid tokens.
        layerwise: add the mean MSE of the intermediate block outputs (Jiao et al. 2020, TinyBERT).
        tokens, samples: valid tokens and samples of the whole batch when this is one of its
            sub-batches (`length_groups`): the sub-batches' losses then add up to the batch's.
            None: this batch's own (`mask.sum()`, B).
        layerwise_weight: the layer-wise term's weight (`TrainSettings.layerwise_weight`).

    Returns:
        MSE of the final hidden state at valid tokens (sum of squared errors / (valid tokens x
        H)), computed in FP32, plus the layer-wise term, plus each head output's `head_mse`.
    """
    tokens = mask.sum() if tokens is None else tokens

    def mse(a: Any, b: Any) -> Any:  # at valid tokens, (B, T, H), in FP32
        return (((a.float() - b) ** 2) * mask).sum() / (tokens * a.shape[-1])

    states, heads = split_outputs(student_out, layerwise)
    loss = mse(states[0], targets[0])
    if layerwise:  # every block's output too: a denser signal
        pairs = list(zip(states[1:], targets[1:len(states)]))
        loss = loss + layerwise_weight * sum(mse(a, b) for a, b in pairs) / max(1, len(pairs))
    for (name, a), b in zip(heads, targets[len(states):]):
        loss = loss + head_mse(name, a, b, mask, tokens, samples)
    return loss


NOT_HEAD = ("loss", "last_hidden_state", "pooler_output", "hidden_states", "attentions", "cross_attentions",
            "past_key_values")
PER_TOKEN_2D = ("start_logits", "end_logits")  # (B, T); a classifier's `logits` is (B, labels)


def split_outputs(out: Any, layerwise: bool) -> tuple[list[Any], list[tuple[str, Any]]]:
    """A model output -> ([final hidden state, intermediate block outputs when `layerwise`],
    [(name, head output)]).

    The final hidden state is `last_hidden_state`, or for a head model (run with
    `output_hidden_states=True`) `hidden_states[-1]`, the last block's output (BERT: after its
    LayerNorm; GPT-2: after `ln_f`). Head outputs are every other tensor but the hidden states,
    attentions, cache, pooler and loss, in the model's output order.
    """
    import torch

    has_base = "last_hidden_state" in out
    final = out.last_hidden_state if has_base else out.hidden_states[-1]
    states = [final] + (list(out.hidden_states[1:-1]) if layerwise else [])
    heads = [] if has_base else [(k, v) for k, v in out.items() if k not in NOT_HEAD and isinstance(v, torch.Tensor)]
    return states, heads


def head_mse(name: str, a: Any, b: Any, mask: Any, tokens: Any = None, samples: int | None = None) -> Any:
    """MSE of a head output `a` (student) against `b` (teacher), in FP32: at valid tokens for a
    per-token output ((B, T, V) LM logits, (B, T) span logits), else over every element
    ((B, labels) classification logits). `mask`: (B, T, 1) float. `tokens`, `samples`: the
    whole batch's valid tokens and samples when this is a sub-batch (`distill_loss`)."""
    a = a.float()
    if a.dim() == 3 or name in PER_TOKEN_2D:
        m = mask if a.dim() == 3 else mask[..., 0]
        count = m.sum() if tokens is None else tokens
        return (((a - b) ** 2) * m).sum() / (count * (a.shape[-1] if a.dim() == 3 else 1))
    return ((a - b) ** 2).sum() / ((a.shape[0] if samples is None else samples) * a[0].numel())


def _distill(student: Any, teacher: Any, tokens: Any, input_names: list[str], settings: TrainSettings,
             param_groups: list[dict] | None, after_step: Callable[[Any], None] | None,
             evaluate: Callable[[Any], float] | None, device: Any) -> TrainReport:
    import torch
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    teacher.eval()
    # Dropout off: the target is the teacher's deterministic output, and with few steps on
    # little text dropout noise dominates the loss. Gradients flow in eval mode all the same.
    student.eval()
    groups = param_groups or [{"params": [p for p in student.parameters() if p.requires_grad], "lr": settings.lr}]
    opt = adamw(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(settings.schedule, settings.steps))
    losses = []
    curve: list[list[float]] = []
    spent_evaluating = 0.0

    def point(step: int) -> None:  # one point of the held-out curve, its cost left out of the time
        nonlocal spent_evaluating
        t0 = time.perf_counter()
        value = evaluate(student)
        curve.append([step, round(t0 - start - spent_evaluating, 1), round(value, 6)])
        spent_evaluating += time.perf_counter() - t0
        log.info("distillation step %d: held-out cosine mean %.4f", step, value)

    start = time.perf_counter()
    if evaluate is not None:
        point(0)
    more_than_an_epoch = settings.steps * settings.batch_size > len(tokens)
    head = is_head_model(teacher)  # head outputs are not per-token states: not cached
    cache = (TeacherCache(settings.teacher_cache_mib)
             if settings.teacher_cache_mib and more_than_an_epoch and not head else None)
    batches = batches_forever(tokens, settings.batch_size, input_names, settings.seed, settings.group_by_length)
    # a GPU runs a small padded batch in about the time of its longest part: split on CPUs only
    split = settings.split_by_length and device.type == "cpu"
    every = max(1, settings.steps // 20)  # a log line per 5% of the run: tqdm stays silent off a terminal
    for step in tqdm(range(settings.steps), desc="distillation", unit="step", disable=None, leave=False):
        feeds, lengths, idx = next(batches)
        parts = length_groups(lengths) if split else [np.arange(len(lengths))]
        opt.zero_grad(set_to_none=True)
        loss = sum(_sub_batch_backward(student, teacher, feeds, lengths, idx, part, cache, settings, device)
                   for part in parts)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(student)
        losses.append(float(loss))
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            _log_progress(step, settings.steps, losses[-every:], time.perf_counter() - start)
            if evaluate is not None:
                point(step + 1)
    student.eval()
    return TrainReport(settings.steps, round(time.perf_counter() - start, 1),
                       losses[0] if losses else 0.0, losses[-1] if losses else 0.0, losses, curve)


def _sub_batch_backward(student: Any, teacher: Any, feeds: dict, lengths: np.ndarray, idx: np.ndarray,
                        part: np.ndarray, cache: TeacherCache | None, settings: TrainSettings, device: Any) -> float:
    """Forward and backward of samples `part` of one padded batch (cut to their own longest);
    returns their share of the batch's loss."""
    import torch

    inputs = _inputs(feeds, lengths, part, device)
    mask = inputs["attention_mask"].unsqueeze(-1).float()  # (b, t, 1)
    hidden = settings.layerwise or is_head_model(teacher)
    if cache:  # [last_hidden_state, block outputs...]; the teacher runs on unstored samples only

        def teacher_states(rows: np.ndarray) -> list[Any]:
            with torch.no_grad():
                out = teacher(**_inputs(feeds, lengths, part[rows], device), output_hidden_states=hidden)
            return split_outputs(out, settings.layerwise)[0]

        targets = cache.targets(idx[part], lengths[part], device, teacher_states)
    else:  # + head outputs (a head model is never cached)
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=hidden)
        states, heads = split_outputs(t_out, settings.layerwise)
        targets = states + [v.float() for _, v in heads]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        s_out = student(**inputs, output_hidden_states=hidden)
    loss = distill_loss(s_out, targets, mask, settings.layerwise, float(lengths.sum()), len(lengths),
                        settings.layerwise_weight)
    loss.backward()
    return float(loss.detach())


def _inputs(feeds: dict, lengths: np.ndarray, rows: np.ndarray, device: Any) -> dict:
    """Rows `rows` of a padded batch's feeds, cut to their own longest: {input: (b, t) tensor on `device`}."""
    import torch

    longest = int(lengths[rows].max())
    return {k: torch.from_numpy(np.ascontiguousarray(v[rows, :longest])).to(device) for k, v in feeds.items()}


def is_head_model(model: Any) -> bool:
    """True for a Hugging Face model with a task head (`*ForSequenceClassification` ...): its
    class is not its base model's (`model.base_model is not model`)."""
    return getattr(model, "base_model", model) is not model


def _log_progress(step: int, steps: int, recent: list[float], elapsed: float) -> None:
    log.info("distillation step %d/%d: loss %.4g (mean of the last %d), %.0f s, about %.0f s left",
             step + 1, steps, sum(recent) / len(recent), len(recent), elapsed,
             elapsed / (step + 1) * (steps - step - 1))
