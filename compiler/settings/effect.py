"""Which command-line options take effect under a BuildSettings: an option given where its stage
does not run (`--exclude` with `--precision hybrid`, `--recover-steps` without `--sparsity 2:4`)
is named in a warning rather than ignored without a word."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from compiler.settings.sections import INT8_MODES

# (argparse destinations, whether they act under these settings, what makes them act)
RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("quant_method", "smoothquant_alpha", "quantize_attention_bmm", "exclude", "max_excluded", "int8_sensitivity",
      "float_mode"), lambda s: s.precision.mode in INT8_MODES, "--precision int8 or int8-qat"),
    (("train_steps", "lr", "train_batch_size", "train_bf16", "no_qat_fallback"),
     lambda s: s.precision.mode == "int8-qat", "--precision int8-qat"),
    (("train_samples", "train_text", "train_windows", "train_device", "no_split_batches"),
     lambda s: s.precision.mode == "int8-qat" or s.sparsity.pattern is not None,
     "--precision int8-qat or --sparsity 2:4"),
    (("sparsity_method", "sparse_layers", "recover_steps", "recover_batch_size", "recover_lr", "recover_from",
      "recover_schedule", "recover_layerwise_weight", "recover_samples", "recover_embeddings", "recover_bf16"),
     lambda s: s.sparsity.pattern is not None, "--sparsity 2:4"),
    (("vocab_min_count", "vocab_keep_top", "vocab_tied"), lambda s: bool(s.vocab.texts), "--prune-vocab FILE"),
    (("max_past",), lambda s: s.model.task == "text-generation-with-past", "--task text-generation-with-past"),
    (("max_nonfinite", "overflow_margin"), lambda s: s.precision.mode == "auto", "--precision auto"),
)


def options_without_effect(given: Iterable[str], settings: Any) -> list[str]:
    """One line per option in `given` (argparse destinations, e.g. "recover_steps") that no stage
    reads under `settings` (a resolved BuildSettings), naming what would make it act; [] when
    every option given acts."""
    given = set(given)
    lines = []
    for dests, acts, needs in RULES:
        idle = [d for d in dests if d in given]
        if idle and not acts(settings):
            flags = ", ".join("--" + d.replace("_", "-") for d in idle)
            lines.append(f"{flags}: no effect here (only with {needs})")
    return lines
