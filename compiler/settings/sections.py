"""The settings of the stages before the build: model, export, precision, data, quantization,
training, sparsity, vocabulary. Re-exported by `compiler.settings`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PRECISION_MODES = ("fp32", "fp16", "hybrid", "auto", "int8", "int8-qat")
INT8_MODES = ("int8", "int8-qat")
SENSITIVITY_METHODS = ("local", "end-to-end")
FLOAT_MODES = ("fp32", "fp16", "hybrid")  # what runs outside Q/DQ in an INT8 variant
SPARSITY_PATTERNS = (None, "2:4")
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
LR_SCHEDULES = ("constant", "linear")
# the 2:4 recovery's default steps (`SparsitySettings.recover_steps` None), in FP32 / under BF16
# autocast: MiniLM's one command within the hour on 2 CPU cores either way (docs/sparsity.md)
RECOVER_STEPS_FP32 = 3000
RECOVER_STEPS_BF16 = 6000
QUANT_METHODS = ("max", "entropy", "percentile")
WEIGHT_MODES = ("pretrained", "random")
TASKS = ("feature-extraction", "sentence-embedding", "text-classification", "token-classification",
         "question-answering", "fill-mask", "text-generation", "text-generation-with-past")  # Optimum's names


@dataclass(frozen=True)
class ModelSettings:
    """Which transformer to compile.

    Attributes:
        name: a registered name (`bert-base`, `bert-large`, `gpt2`, `minilm`), a Hugging Face
            model id, or a local directory holding `config.json` and weights.
        weights: `pretrained` loads real weights; `random` builds the published architecture
            with `seed` (for structure and speed work where weights are not at hand).
        seed: RNG seed for `random` weights.
        trust_remote_code: passed to transformers only when the user asks for it.
        task: what the graph answers, Optimum's names (`compiler.training.tasks`):
            `feature-extraction` (the base model's hidden states), `sentence-embedding`,
            `text-classification`, `question-answering`, `fill-mask`, `text-generation`,
            `text-generation-with-past` (with a KV cache). None: the checkpoint's natural task,
            resolved by the CLI (`compiler.training.models.resolve_task`); code that builds the
            settings itself gets the base model's graph.
    """

    name: str = "minilm"
    weights: str = "pretrained"
    seed: int = 0
    trust_remote_code: bool = False
    task: str | None = field(default=None, metadata={"hash": "if-set"})  # keys of earlier caches unchanged

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed}: expected 0 <= seed < 2**32 (NumPy's and PyTorch's seed range)")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights={self.weights!r}: expected one of {WEIGHT_MODES}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}")


@dataclass(frozen=True)
class ExportSettings:
    """PyTorch -> ONNX export.

    Attributes:
        opset: ONNX opset; 17 is the first with a native LayerNormalization.
        parity_atol: FP32 max abs difference allowed between ONNX Runtime and PyTorch.
        parity_batches / parity_sequences: shapes the parity check runs at (odd sizes on purpose).
    """

    opset: int = 17
    parity_atol: float = 1e-4
    parity_batches: tuple[int, ...] = (1, 3)
    parity_sequences: tuple[int, ...] = (8, 33, 128)

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset={self.opset}: need 17 or newer for native LayerNormalization")


@dataclass(frozen=True)
class PrecisionSettings:
    """ONNX-to-ONNX precision pass (strongly typed output for TensorRT 11).

    Attributes:
        mode: `fp32` (unchanged), `fp16` (everything ONNX allows), `hybrid` (softmax, layer
            and RMS norms, accumulating reductions and position angles in FP32, the rest in FP16), `auto` (the fewest
            FP32 nodes that meet the budget below, measured; see compiler.passes.auto_precision),
            `int8` (post-training INT8 Q/DQ on MatMul/Gemm inputs, see `QuantSettings`; the rest
            in `QuantSettings.float_mode`), `int8-qat` (the same placement with scales and
            weights from quantization-aware training, see `TrainSettings`).
        fp16_clamp: magnitude that out-of-range FP32 constants are clamped to. Half of FP16's
            maximum (65504) so that adding a bounded activation to a clamped mask fill value
            (-3.4e38 in Hugging Face attention masks) stays finite.
        min_cosine / max_nonfinite: `auto`'s budget on held-out real text.
        overflow_margin: `auto` pins a node when observed absmax x margin >= 65504.
        percentile: the high percentile of |x| recorded per tensor.
        max_search_steps: nodes `auto` may move to FP32 by measured sensitivity.
        sensitivity_samples: calibration samples per sensitivity measurement.
        random_samples: samples of random ids whose activation statistics are compared with the
            real text's in the report, at the first held-out samples' lengths; they decide
            nothing. When they cover the held-out set (the default, 64 of 64), verify's
            random-id set is the same set and reads this pass's FP32 outputs back.
        allow_nonfinite: keep a variant that verify found giving NaN/Inf on real text (held-out
            or at the profile's max shape) where the FP32 graph gives none. Off: the run stops
            after writing the report, before the build or bundle (exit 1;
            `compiler.stages.verify.nonfinite_verdict`). Any mode, whatever `auto`'s budget.
    """

    mode: str = "hybrid"
    fp16_clamp: float = 32768.0
    # `auto` only: the accuracy budget on held-out real text and the search's knobs.
    min_cosine: float = 0.9998  # the published hybrid figure on BERT-base and GPT-2
    max_nonfinite: int = 0
    overflow_margin: float = 2.0  # pin when observed absmax * margin >= 65504
    percentile: float = 99.99
    max_search_steps: int = 32
    sensitivity_samples: int = 8  # calibration samples per sensitivity measurement
    random_samples: int = 64  # random-id samples for the report's real-vs-random statistics
    allow_nonfinite: bool = field(default=False, metadata={"hash": False})  # what ships, not what is made

    def __post_init__(self) -> None:
        if self.mode not in PRECISION_MODES:
            raise ValueError(f"precision={self.mode!r}: expected one of {PRECISION_MODES}")
        if not -1.0 <= self.min_cosine <= 1.0 or self.max_nonfinite < 0 or self.overflow_margin < 1.0:
            raise ValueError("need -1 <= min_cosine <= 1, max_nonfinite >= 0, overflow_margin >= 1")
        if self.random_samples < 1:
            raise ValueError(f"random_samples={self.random_samples}: expected >= 1")


@dataclass(frozen=True)
class DataSettings:
    """Real text for verification (and later calibration).

    Attributes:
        path: a plain text file (one sample a line) or a TSV/CSV file with a header; None
            means WikiText-2 test from `../shared/data` when it exists.
        text_column: column of a TSV/CSV file; None picks `sentence` or `text`.
        samples: held-out samples for verification and the `auto` budget (taken after the
            calibration samples, never overlapping them).
        calib_samples: calibration samples (activation statistics, INT8 thresholds), from the
            start of the text.
        train_samples: fine-tuning samples (QAT, sparsity recovery), at most: taken after the
            held-out samples, so the text is laid out [calibration | held-out | training], never
            overlapping; fewer are used (with a warning) when the text runs out first.
        train_path: separate texts for fine-tuning (formats of `path`), each read from its start;
            the verification text itself is read after its calibration and held-out samples.
            Several texts share `train_samples` evenly, interleaved. Empty: the rest of `path`.
        train_windows: a fine-tuning line longer than `max_length` tokens gives each of its
            consecutive windows as a sample (cut at word boundaries,
            `calibration.windows.split_windows`), counted in `train_samples`; off, it is
            truncated to its first window.
        max_length: tokens per sample, after truncation.
        min_words: lines with fewer words are skipped (WikiText-2 has empty lines and
            `= Heading =` lines); a word is a run of non-space characters, or one character of
            a script written without spaces (`calibration.text.word_count`).
        batch_size: samples per inference batch (padded to the longest in the batch).
        profile_max_rows: windows of real text verified at the optimization profile's max
            sequence length (None: the profile's max batch). The CPU references compute each
            window on its own, so more rows repeat the check on more text, not at another shape;
            BERT-large at 32 x 512 costs ~4x the 8 x 512 check in verify.
        cache_dir: where tokenized sets, activation statistics, INT8 thresholds and FP32 reference
            outputs are cached by content hash. None: `<BuildSettings.output_dir>/cache` inside a `BuildSettings`
            (beside the artifacts, never in the code folder), no cache when used alone. Where
            the caches lie does not change what they hold, so it is left out of cache keys.
    """

    path: str | None = None
    text_column: str | None = None
    samples: int = 64
    calib_samples: int = 128
    train_samples: int = 2048
    train_path: tuple[str, ...] = ()
    train_windows: bool = field(default=False, metadata={"hash": "if-set"})  # keys of earlier caches unchanged
    max_length: int = 128
    min_words: int = 8
    batch_size: int = 8
    profile_max_rows: int | None = field(default=8, metadata={"hash": False})  # verify only: no artifact
    cache_dir: str | None = field(default=None, metadata={"hash": False})  # where, not what

    def __post_init__(self) -> None:
        if (self.samples < 1 or self.calib_samples < 1 or self.train_samples < 1 or self.max_length < 2
                or self.batch_size < 1):
            raise ValueError("samples, calib_samples, train_samples, batch_size must be >= 1 and max_length >= 2")
        if self.profile_max_rows is not None and self.profile_max_rows < 1:
            raise ValueError(f"profile_max_rows={self.profile_max_rows}: expected None (all) or >= 1")
        paths = self.train_path
        paths = () if paths is None else (paths,) if isinstance(paths, str) else tuple(str(p) for p in paths)
        if len(paths) > self.train_samples:
            raise ValueError(f"{len(paths)} training texts but train_samples={self.train_samples}: "
                             "need at least one sample per text")
        object.__setattr__(self, "train_path", paths)


@dataclass(frozen=True)
class QuantSettings:
    """INT8 post-training quantization (`PRECISION=int8`, and the PTQ start of `int8-qat`).

    Defaults are the measured best on MiniLM (compiler/quant/budget.py's docstring and
    docs/int8.md; `python -m benchmarks.int8_ptq`).

    Attributes:
        method: activation threshold per tensor: `max` (absolute maximum), `entropy` (the
            threshold minimizing the KL divergence between the float and the quantized
            histogram, TensorRT's calibrator), `percentile` (the `percentile`-th percentile of
            |x|). All three are ONNX Runtime's calibrators.
        percentile: percentile of |x| for `percentile`, in (0, 100].
        num_bins: histogram bins of the `entropy` and `percentile` calibrators. ONNX Runtime's
            default of 128 for entropy, with its 128 quantized bins, leaves the KL search a
            single candidate (the maximum): entropy then equals max.
        num_quantized_bins: bins of the quantized distribution in the entropy search.
        quantize_attention_bmm: quantize the two attention batched matmuls (Q.K^T and
            probs.V: MatMuls whose both inputs are activations).
        exclude: fnmatch patterns on node names; matching MatMul/Gemm nodes stay float.
        min_cosine: the INT8 budget: minimum per-sample cosine vs FP32 on held-out text.
        max_excluded: most nodes the budget loop may leave unquantized.
        smoothquant_alpha: SmoothQuant migration strength (Xiao et al. 2023) or None (off):
            per input channel j of a quantized weight MatMul's activation X,
            s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X / s feeds the MatMul, W_j * s_j
            replaces W_j.
        calib_windows: calibration windows (None: one per calibration sample).
        calib_batch_size: windows per ONNX Runtime run during calibration.
        sensitivity_samples: calibration windows each sensitivity measurement runs on.
        sensitivity: how the budget loop orders the MatMuls it may leave float. `local`: each
            node's relative INT8 error on FP32 inputs, every node in one pass
            (`compiler.quant.local_error`); `end-to-end`: the output's cosine deficit removed
            by leaving only that node float, one pass per quantized node (BERT-large: over
            an hour on 2 cores).
        float_mode: precision of everything not quantized (`hybrid`: FP16 with softmax and
            layer norm pinned to FP32; `fp16`; `fp32`).
        qat_fallback: `int8-qat` ships PTQ's graph (same placement) when the fine-tuned one
            has a lower held-out cosine min than PTQ's, and says so in the report; False
            always ships the fine-tuned graph.
    """

    method: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    num_quantized_bins: int = 128
    quantize_attention_bmm: bool = False
    exclude: tuple[str, ...] = ()
    min_cosine: float = 0.99
    max_excluded: int = 8
    smoothquant_alpha: float | None = 0.8
    calib_windows: int | None = None
    calib_batch_size: int = 8
    sensitivity_samples: int = 16
    sensitivity: str = "local"
    float_mode: str = "hybrid"
    qat_fallback: bool = field(default=True, metadata={"hash": "if-set"})  # PTQ keys unchanged

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {QUANT_METHODS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile}: expected 0 < percentile <= 100")
        if self.num_quantized_bins < 2 or self.num_bins < 2 * self.num_quantized_bins:
            raise ValueError(f"num_bins={self.num_bins}, num_quantized_bins={self.num_quantized_bins}: "
                             "need num_quantized_bins >= 2 and num_bins >= 2 * num_quantized_bins "
                             "(else the entropy search has no threshold below the maximum)")
        if not isinstance(self.exclude, tuple) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"exclude={self.exclude!r}: expected a tuple of non-empty fnmatch patterns")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine={self.min_cosine}: expected -1 <= min_cosine <= 1")
        if self.max_excluded < 0:
            raise ValueError(f"max_excluded={self.max_excluded}: expected >= 0")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha={self.smoothquant_alpha}: expected None or 0 <= alpha <= 1")
        if self.calib_windows is not None and self.calib_windows < 1:
            raise ValueError(f"calib_windows={self.calib_windows}: expected None or >= 1")
        if self.calib_batch_size < 1 or self.sensitivity_samples < 1:
            raise ValueError("calib_batch_size and sensitivity_samples must be >= 1")
        if self.float_mode not in FLOAT_MODES:
            raise ValueError(f"float_mode={self.float_mode!r}: expected one of {FLOAT_MODES}")
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise ValueError(f"sensitivity={self.sensitivity!r}: expected one of {SENSITIVITY_METHODS}")

    def calibration_key(self) -> dict[str, Any]:
        """The settings that change calibrated thresholds (the cache key's share)."""
        return {"method": self.method, "calib_windows": self.calib_windows,
                # histograms are merged batch by batch (their bins grow): batching matters there
                **({"num_bins": self.num_bins, "calib_batch_size": self.calib_batch_size}
                   if self.method != "max" else {}),
                **({"num_quantized_bins": self.num_quantized_bins} if self.method == "entropy" else {}),
                **({"percentile": self.percentile} if self.method == "percentile" else {})}


@dataclass(frozen=True)
class TrainSettings:
    """Distillation fine-tuning against the FP32 model on real text (QAT and sparsity recovery).

    One loop (`compiler.training.distill.distill`) serves both. The loss is the mean squared error of the
    student's `last_hidden_state` against the FP32 teacher's at valid tokens (no labels).

    Attributes:
        steps: optimizer steps (AdamW, no weight decay, PyTorch's fused kernel where it runs:
            `compiler.training.distill.adamw`).
        lr: learning rate of the weights.
        scale_lr: learning rate of QAT's learnable activation scales (LSQ, Esser et al. 2020).
        batch_size: samples per step (padded to the batch's longest, or split: `split_by_length`).
        seed: shuffling seed.
        layerwise: add the MSE of every intermediate block output to the loss (TinyBERT-style
            layer-wise distillation, Jiao et al. 2020): the student must match the teacher's
            hidden states, not only its last one. Measured (`python -m benchmarks.recovery_sweep
            --steps 250 wanda,1e-3 [--no-layerwise]`, MiniLM 2:4): held-out cosine mean 0.9387
            with it, 0.9233 without.
        layerwise_weight: weight of the layer-wise term (the mean MSE of the intermediate block
            outputs) against the final hidden state's MSE; 1 for QAT, the 2:4 recovery's own
            (`SparsitySettings.recover_layerwise_weight`) there.
        schedule: learning-rate schedule of every parameter group: `constant`, or `linear`
            (linear warm-up over the first 5% of the steps, then linear decay to 0, as in
            BERT's fine-tuning recipe, Devlin et al. 2019).
        group_by_length: batch samples of similar length together, so padding wastes little
            compute. Off by default: measured it cost 0.011-0.012 of held-out cosine for 5-43 %
            of the time (the loss averages over a batch's tokens; docs/sparsity.md).
        split_by_length: compute each batch as sub-batches of similar length, each padded to its
            own longest, gradients accumulated into one optimizer step
            (`compiler.training.distill.length_groups`): the same batches and the same gradient
            up to float summation order, for less padding. MiniLM, batch 8 of the mixed
            recovery text: 47 % of the padded positions are padding; a step 0.79 s instead of
            1.06 s (`python -m benchmarks.split_batches`, docs/sparsity.md). On a CPU training
            device only: a GPU computes a small padded batch in about the time of its longest
            part, so there the batch runs whole (not measured: no GPU was lent). QAT always
            runs whole batches: LSQ's step-size gradient scale depends on the batch tensor's
            size.
        bf16: the student's forward and backward under bfloat16 autocast (FP32 master weights
            and optimizer state; Micikevicius et al. 2018, `torch.autocast`), as Hugging Face
            Trainer's `bf16`; the teacher, the loss and QAT's fake quantizers stay FP32. Pays
            where BF16 matrix multiply is in hardware: 2:4 recovery 1.4x faster at the same
            cosine on an AVX512-BF16 CPU; no gain for QAT (docs/sparsity.md, docs/int8.md).
        teacher_cache_mib: memory (MiB, CPU) for the teacher's outputs on the training
            samples, computed in the first epoch and reused after (`compiler.training.teacher_cache.TeacherCache`);
            0 turns it off. It saves the teacher's forward pass on every later epoch and changes
            nothing else, so it is left out of cache keys. A cap, not a reservation: MiniLM on
            6,093 samples of mixed text (412k tokens, 7 states of 384) uses ~4.2 GiB, all of
            them (the earlier 4 GiB left ~5 % of the samples to the teacher every epoch).
            Samples past the cap cost the teacher's forward on those samples only.
        device: where the student and teacher train: `auto` (default: the first CUDA GPU when
            PyTorch sees one, else the CPU), `cpu`, or `cuda` / `cuda:N`. The models return to
            the CPU afterwards (export runs there). A CUDA device PyTorch cannot see raises
            `compiler.errors.CompilerError` before any training.
    """

    steps: int = 200
    lr: float = 1e-5
    scale_lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    layerwise: bool = True
    layerwise_weight: float = field(default=1.0, metadata={"hash": "if-set"})  # keys of earlier caches unchanged
    schedule: str = "constant"
    group_by_length: bool = False
    split_by_length: bool = True
    bf16: bool = field(default=False, metadata={"hash": "if-set"})  # keys of earlier caches unchanged
    teacher_cache_mib: int = field(default=6144, metadata={"hash": False})  # cost, not result
    device: str = field(default="auto", metadata={"hash": False})  # where, not what: caches reuse across devices

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.scale_lr <= 0 or self.batch_size < 1 or self.teacher_cache_mib < 0:
            raise ValueError("need steps >= 0, lr > 0, scale_lr > 0, batch_size >= 1, teacher_cache_mib >= 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed}: expected 0 <= seed < 2**32 (NumPy's and PyTorch's seed range)")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}: expected cpu, auto, cuda or cuda:N")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: expected one of {LR_SCHEDULES}")
        if not self.layerwise_weight >= 0:
            raise ValueError(f"layerwise_weight={self.layerwise_weight}: expected >= 0")


@dataclass(frozen=True)
class SparsitySettings:
    """2:4 structured sparsity (`SPARSITY=2:4`), applied in PyTorch before export.

    Attributes:
        pattern: None (dense) or `2:4`: at least 2 zeros in every 4 consecutive weights along
            the reduction (input) dimension, what sparse tensor cores (Ampere and later) and
            TensorRT's `SPARSE_WEIGHTS` need.
        method: `sparsegpt` (default: the 2 of every 4 with the largest OBS saliency, the kept
            weights updated to reconstruct each layer's output on the calibration text, layer
            by layer; Frantar & Alistarh 2023, arXiv:2301.00774), `wanda` (keep the 2 largest
            |w_ij| * ||x_j||_2 of every 4, x_j the layer's input feature j over the calibration
            text; Sun et al. 2023, arXiv:2306.11695; no weight update) or `magnitude` (the 2
            largest |w|). On MiniLM SparseGPT starts 0.095 closer to the dense model than Wanda
            and stays ahead through recovery; it costs a few minutes more, once (docs/sparsity.md).
        layers: fnmatch patterns on module names choosing the pruned linear layers; empty
            means every linear layer inside the transformer blocks (no embeddings, no head).
        recover_steps: distillation steps with the masks held fixed (0: no recovery); the
            loop's other knobs (seed, layer-wise loss) come from `TrainSettings`. None (default):
            by the recovery's precision (`recover_bf16` resolved on the training device),
            `RECOVER_STEPS_FP32` (3,000) or `RECOVER_STEPS_BF16` (6,000), each sized so MiniLM's
            whole `make onnx SPARSITY=2:4` fits the hour on 2 CPU cores: in FP32 (AVX2, no BF16
            hardware) 51.8 min for held-out cosine mean 0.9690; under BF16 autocast (an
            AVX512-BF16 CPU) 45.5 min for 0.9706 (docs/sparsity.md). Resolved before the cache
            key is taken, so a default run and the same count given by hand share their student.
        recover_batch_size: samples a recovery step (`TrainSettings.batch_size` of the
            recovery; QAT keeps its own). 16: on 2 CPU cores a sample costs 16 % less than at
            8 (larger matrix products), and MiniLM's one command reached 0.9690 in 51.8 min
            against 0.9685 in 61.0 min for 5,400 steps of 8 (docs/sparsity.md).
        recover_lr: peak learning rate of the recovery, 100x QAT's `TrainSettings.lr`: pruning
            moves the model much further than quantization; 1e-3 beat 2e-4, 5e-4 and 2e-3 on
            MiniLM (docs/sparsity.md).
        recover_schedule: the recovery's learning-rate schedule (`TrainSettings.schedule`).
        recover_layerwise_weight: weight of the layer-wise term of the recovery's loss (the mean
            MSE of the intermediate block outputs, `TrainSettings.layerwise_weight`) against the
            last hidden state's MSE. 3 (QAT keeps 1): MiniLM, the one command with
            `--recover-steps 600`, held-out cosine mean 0.9502 at 1, 0.9524 at 3, 0.9527 at 8,
            0.9478 with the weight decayed from 1 to 0 over the run; the lead of 3 over 1 shrank
            from 0.005 to 0.002 as the learning rate decayed, 8's over 3 from 0.003 to 0.0003.
            Over 5,400 steps 3 led 1 by up to 0.003 mid-run and ended level (0.9685 against
            0.9683 at 5,300; docs/sparsity.md).
        recover_from: a `student.safetensors` of an earlier 2:4 run of the same model to start
            the recovery from instead of pruning the dense model (e.g. a second, low learning
            rate stage after a long one, or a student recovered on another machine). Its zeros
            are the masks; a chosen layer that is not 2:4 in it is an error. Keyed by content.
        recover_samples: training samples of the default recovery text, the mix of SST-2
            train sentences, the rest of WikiText-2 test and WikiText-2 valid in even shares
            (`calibration.layout.recovery_data`), used when no `--train-text` is given, the
            verification text is the default and the shared data holds all three. Otherwise
            the fine-tuning text and `DataSettings.train_samples` apply as for QAT.
        recover_embeddings: train the input token-embedding table in the recovery too. Off by
            default: the table is not pruned, and on MiniLM it is half the parameters (11.7 M
            of 22.7 M), so its gradient and AdamW update are a large share of a CPU step
            (docs/sparsity.md). An output head tied to the table is held with it.
        recover_bf16: the recovery under bfloat16 autocast (`TrainSettings.bf16`): `auto`
            (default: where the training device multiplies BF16 in hardware, an AVX512-BF16 or
            AMX CPU or a CUDA GPU with BF16, `compiler.training.distill.bf16_matmul_available`),
            `on` or `off`. `--train-bf16` turns it on. On an AVX512-BF16 CPU: 1.4x faster steps
            at the same cosine; on an AVX2-only CPU emulated and slower than FP32 (docs/sparsity.md).
    """

    pattern: str | None = None
    method: str = "sparsegpt"
    layers: tuple[str, ...] = ()
    recover_steps: int | None = None  # None: RECOVER_STEPS_FP32 or _BF16, resolved by the sparsity stage
    recover_batch_size: int = field(default=16, metadata={"hash": False})  # resolved into TrainSettings.batch_size
    recover_samples: int = 6144
    recover_bf16: str = field(default="auto", metadata={"hash": False})  # resolved into TrainSettings.bf16
    recover_lr: float = 1e-3
    recover_schedule: str = "linear"
    recover_layerwise_weight: float = 3.0
    recover_from: str | None = field(default=None, metadata={"hash": "if-set"})
    recover_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.recover_lr <= 0:
            raise ValueError(f"recover_lr={self.recover_lr}: expected > 0")
        if self.recover_batch_size < 1:
            raise ValueError(f"recover_batch_size={self.recover_batch_size}: expected >= 1")
        if not self.recover_layerwise_weight >= 0:
            raise ValueError(f"recover_layerwise_weight={self.recover_layerwise_weight}: expected >= 0")
        if self.recover_schedule not in LR_SCHEDULES:
            raise ValueError(f"recover_schedule={self.recover_schedule!r}: expected one of {LR_SCHEDULES}")
        if self.pattern not in SPARSITY_PATTERNS:
            raise ValueError(f"sparsity={self.pattern!r}: expected one of {SPARSITY_PATTERNS}")
        if self.method not in SPARSITY_METHODS:
            raise ValueError(f"sparsity method={self.method!r}: expected one of {SPARSITY_METHODS}")
        steps = self.recover_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"recover_steps={steps!r}: expected a count >= 0, or None (the default by the "
                             "recovery's precision)")
        if not isinstance(self.layers, tuple) or self.recover_samples < 1:
            raise ValueError("layers must be a tuple of fnmatch patterns, recover_samples >= 1")
        if self.recover_bf16 not in ("auto", "on", "off"):
            raise ValueError(f"recover_bf16={self.recover_bf16!r}: expected auto, on or off")


@dataclass(frozen=True)
class VocabSettings:
    """Vocabulary pruning (`--prune-vocab FILE`): keep only the embedding rows a deployment's text uses.

    The engine still takes the original tokenizer's ids: an int32 remap table inside the graph
    sends each kept id to its row of the smaller table and every other id to `[UNK]`'s
    (`compiler.passes.vocab_prune`). The table is half of MiniLM's parameters (11.7 M of 22.7 M).

    Attributes:
        texts: domain text files (the formats of `DataSettings.path`), read whole; empty: off.
        min_count: keep every token seen at least this often in `texts`.
        keep_top: also keep the N most frequent tokens of the general text (the verification
            text's calibration samples), for inputs outside the domain.
        tied: accept pruning an embedding that an output head shares (GPT-2's tied LM head):
            its logits then cover the kept tokens only. Off: such a model is refused.
    """

    texts: tuple[str, ...] = ()
    min_count: int = 1
    keep_top: int = 0
    tied: bool = False

    def __post_init__(self) -> None:
        texts = (self.texts,) if isinstance(self.texts, str) else tuple(str(t) for t in self.texts)
        object.__setattr__(self, "texts", texts)
        if self.min_count < 1 or self.keep_top < 0:
            raise ValueError(f"vocabulary: min_count={self.min_count}, keep_top={self.keep_top}: need "
                             "min_count >= 1 and keep_top >= 0")
