"""The vocab stage (`--prune-vocab`): the embedding table cut to the tokens a domain's text uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from calibration.layout import TokenSets, vocabulary_texts
from calibration.text import tokenized_set
from calibration.vocabulary import choose_vocabulary, count_tokens, oov_rate, special_token_ids
from compiler.artifacts import cached, write_json
from compiler.eval.fidelity import FidelityProbe
from compiler.graph.onnx_io import load_onnx, onnx_mib, onnx_sha256, save_onnx
from compiler.passes.vocab_prune import prune_vocabulary
from compiler.results import ExportResult, VocabResult
from compiler.settings import BuildSettings, settings_hash

log = logging.getLogger(__name__)


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
        beyond = kept[kept >= loaded.vocab_size]  # tokenizer ids with no embedding row (an added token)
        if beyond.size:
            log.warning("vocab: %d tokenizer id(s) past the embedding table's %d rows are not kept (%s): the model "
                        "has no row for them", beyond.size, loaded.vocab_size,
                        ", ".join(repr(t) for t in tok.convert_ids_to_tokens(beyond[:5].tolist())))
            kept = kept[kept < loaded.vocab_size]
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
            "onnx_mib": {"before": onnx_mib(graph), "after": onnx_mib(out)},
            "oov_rate": {"domain": oov_rate(sample, kept), "heldout": oov_rate(tokens.heldout, kept)},
            "fidelity_vs_unpruned": {name: f.report() for name, f in fidelity.items()}})

    cached(key, [out, report_path], compute, "vocab")
    report = json.loads(report_path.read_text())
    log.info("vocab: %d of %d tokens kept, ONNX %.1f -> %.1f MiB, held-out OOV %.2f %%", report["kept"],
             report["vocab_size"], report["onnx_mib"]["before"], report["onnx_mib"]["after"],
             100 * report["oov_rate"]["heldout"])
    return VocabResult(out, report)
