"""Benchmark: vocabulary pruning of MiniLM to SST-2's tokens, and the parameter share it saves on BERT-base.

    python -m benchmarks.vocab_prune [--domain ../shared/data/sst2/train.tsv] [--samples 64]
        [--runs 20] [--threads N] [--skip-bert-base] [--out engines/benchmarks]

MiniLM (real weights) is compiled four ways through the pipeline (`run_pipeline`, until verify):
fp32 and hybrid, each unpruned and pruned to the tokens of `--domain` (`--prune-vocab`). Then:

- sizes: kept tokens, embedding and model parameters, ONNX MiB of each variant;
- fidelity against the unpruned FP32 graph on SST-2 dev (a held-out text of the domain) and on
  held-out WikiText-2 (general text), with the out-of-vocabulary rate of each: the pruned FP32
  graph shows what pruning alone changes, the hybrid rows add FP16's own error;
- ONNX Runtime CPU latency (ORT_ENABLE_ALL, real WikiText-2 windows of 128 tokens, batch 1 and
  8, median of `--runs` after warm-up, graphs interleaved so a drifting load hits them alike) of
  the unpruned FP32 graph, the pruned one (the remap Gather in the graph: the engine takes the
  original tokenizer's ids) and the alternative without the remap (the ids remapped on the host,
  as a pruned tokenizer would emit them);
- BERT-base (random weights) pruned to the same tokens: the share of parameters saved.

Prints the tables, writes `<out>/vocab_prune.json` and (with matplotlib) `<out>/vocab_prune.png`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_out_argument, markdown_table, run_main, save_plot, write_result
from benchmarks.ort_latency import feeds_for, open_session, packed_ids, summarize
from calibration.layout import vocabulary_texts
from calibration.readers import shared_data_path
from calibration.text import tokenized_set
from calibration.vocabulary import oov_rate
from compiler.eval.fidelity import FidelityProbe
from compiler.graph.onnx_io import load_onnx, onnx_mib
from compiler.pipeline import run_pipeline
from compiler.settings import BuildSettings, DataSettings, ModelSettings, PrecisionSettings, VocabSettings


def settings_for(model: str, weights: str, mode: str, domain: Path | None, args: argparse.Namespace) -> BuildSettings:
    return BuildSettings(model=ModelSettings(name=model, weights=weights), precision=PrecisionSettings(mode=mode),
                         data=DataSettings(samples=args.samples),
                         vocab=VocabSettings(texts=(str(domain),) if domain else ()), output_dir=str(args.out))


def compile_minilm(args: argparse.Namespace) -> dict[str, Any]:
    """{variant: PipelineRun} for fp32 / hybrid, unpruned / pruned."""
    runs = {}
    for mode in ("fp32", "hybrid"):
        for pruned in (False, True):
            name = f"{mode}{'-vocab' if pruned else ''}"
            runs[name] = run_pipeline(settings_for("minilm", "pretrained", mode, args.domain if pruned else None, args),
                                      until="verify")
    return runs


def without_remap(path: Path) -> tuple[Any, np.ndarray]:
    """The pruned graph with its id remap taken out (what a pruned tokenizer would feed), and the
    remap table (original id -> row) the host then applies."""
    from onnx import numpy_helper

    model = load_onnx(path, check=False)
    g = model.graph
    node = next(n for n in g.node if n.op_type == "Gather" and n.input[0].endswith("_remap"))
    table = next(t for t in g.initializer if t.name == node.input[0])
    remap = numpy_helper.to_array(table).astype(np.int64)
    for n in g.node:
        n.input[:] = [node.input[1] if t == node.output[0] else t for t in n.input]
    g.node.remove(node)
    g.initializer.remove(table)
    return model, remap


def kept_ids(remap: np.ndarray, unk_id: int) -> np.ndarray:
    """The ids a pruned graph keeps: those its remap sends to their own row, and [UNK]."""
    return np.union1d(np.flatnonzero(remap != remap[unk_id]), [unk_id])


def fidelity(runs: dict[str, Any], remap: np.ndarray, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each variant against the unpruned FP32 graph on SST-2 dev (whole) and held-out WikiText-2."""
    base = runs["fp32"]
    data, tok, names = base.settings.data, base.loaded.tokenizer, base.loaded.input_names
    dev = tokenized_set(vocabulary_texts(VocabSettings(texts=(str(args.domain_dev),)), data), tok,
                        data.max_length, data.cache_dir)
    heldout = tokenized_set(base.export.heldout_texts, tok, data.max_length, data.cache_dir)
    sets = {"sst2_dev": dev, "wikitext_heldout": heldout}
    probe = FidelityProbe(base.reference_onnx, base.output_names,
                          {name: t.batches(data.batch_size, names) for name, t in sets.items()})
    kept = kept_ids(remap, tok.unk_token_id)
    oov = {name: round(oov_rate(t, kept), 4) for name, t in sets.items()}
    rows = []
    for name in ("hybrid", "fp32-vocab", "hybrid-vocab"):
        for which, f in probe.measure(load_onnx(runs[name].variant_onnx, check=False)).items():
            r = f.report()
            rows.append({"variant": name, "text": which, "oov_rate": oov[which] if "vocab" in name else 0.0,
                         **{k: r[k] for k in ("cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count",
                                              "samples")}})
    return rows


def latency(runs: dict[str, Any], no_remap: Any, remap: np.ndarray, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ORT CPU latency (ms) at batch 1 and 8, sequence 128: unpruned, pruned, pruned without remap."""
    tok = runs["fp32"].loaded.tokenizer
    ids = packed_ids(tok, 128, max(args.batch))
    graphs = {"fp32": runs["fp32"].variant_onnx, "fp32-vocab (remap in graph)": runs["fp32-vocab"].variant_onnx,
              "fp32-vocab (pruned tokenizer)": no_remap}
    sessions = {name: open_session(model, args.threads)[0] for name, model in graphs.items()}
    rows = []
    for batch in args.batch:
        feeds = {}
        for name, sess in sessions.items():
            batch_ids = ids[:batch] if "tokenizer" not in name else remap[ids[:batch]]
            feeds[name] = feeds_for(sess, batch_ids)
            for _ in range(args.warmup):
                sess.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.runs):  # interleaved: each round runs every graph once
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds[name])
                times[name].append((time.perf_counter() - start) * 1e3)
        rows += [{"graph": name, "batch": batch, "seq": 128, **summarize(t)} for name, t in times.items()]
    return rows


def bert_base(args: argparse.Namespace) -> dict[str, Any]:
    """BERT-base (random weights) pruned to the same tokens: the vocab stage's parameter counts."""
    run = run_pipeline(settings_for("bert-base", "random", "fp32", args.domain, args), until="vocab")
    v = run.report["vocabulary"]
    return {k: v[k] for k in ("vocab_size", "kept", "embedding_params_before", "embedding_params_after",
                              "model_params_before", "model_params_after", "onnx_mib")} | {
        "params_saved_share": round(1 - v["model_params_after"] / v["model_params_before"], 4)}


def sizes(runs: dict[str, Any]) -> list[dict[str, Any]]:
    v = runs["hybrid-vocab"].report["vocabulary"]
    out = [{"variant": name, "onnx_mib": onnx_mib(run.variant_onnx)} for name, run in runs.items()]
    return out + [{"variant": "embedding params", "before": v["embedding_params_before"],
                   "after": v["embedding_params_after"]},
                  {"variant": "model params", "before": v["model_params_before"], "after": v["model_params_after"]}]


def print_tables(result: dict[str, Any]) -> None:
    v = result["minilm_vocabulary"]
    print(f"MiniLM pruned to {result['domain']}: {v['kept']} of {v['vocab_size']} tokens kept; model params "
          f"{v['model_params_before']:,} -> {v['model_params_after']:,}")
    print(markdown_table(["variant", "ONNX MiB"], [(r["variant"], r["onnx_mib"]) for r in result["sizes"] if "onnx_mib" in r], "lr"))
    fmt = lambda x: "nan" if x is None else f"{x:.6f}"  # noqa: E731
    print("\n" + markdown_table(["variant", "text", "OOV", "cosine min", "cosine mean", "max abs err", "non-finite"],
                                [(r["variant"], r["text"], r["oov_rate"], fmt(r["cosine_min"]), fmt(r["cosine_mean"]),
                                  fmt(r["max_abs_err"]), r["nonfinite_count"]) for r in result["fidelity"]], "llrrrrr"))
    print("\n" + markdown_table(["graph", "batch", "median ms", "p90 ms"],
                                [(r["graph"], r["batch"], r["median_ms"], r["p90_ms"]) for r in result["latency"]], "lrrr"))
    if result.get("bert_base"):
        b = result["bert_base"]
        print(f"\nBERT-base (random weights): {b['kept']} of {b['vocab_size']} tokens kept, parameters "
              f"{b['model_params_before']:,} -> {b['model_params_after']:,} ({100 * b['params_saved_share']:.1f} % saved)")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from benchmarks.common import grouped_bars

    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    batches = sorted({r["batch"] for r in rows})

    def draw(ax: Any) -> None:
        series = {f"batch {b}": [next(r["median_ms"] for r in rows if r["graph"] == g and r["batch"] == b)
                                 for g in graphs] for b in batches}
        grouped_bars(ax, graphs, series)
        ax.set_ylabel("median latency, ms (ORT CPU, sequence 128)")
        ax.set_title("MiniLM: vocabulary pruned to SST-2 vs unpruned")

    save_plot(path, draw)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    runs = compile_minilm(args)
    no_remap, remap = without_remap(runs["fp32-vocab"].variant_onnx)  # read once
    result = {"domain": str(args.domain), "minilm_vocabulary": runs["hybrid-vocab"].report["vocabulary"],
              "sizes": sizes(runs), "fidelity": fidelity(runs, remap, args),
              "latency": latency(runs, no_remap, remap, args),
              "bert_base": None if args.skip_bert_base else bert_base(args)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_tables(result)
    write_result(args.out, "vocab_prune", result)
    plot(result["latency"], args.out / "vocab_prune.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", type=Path, default=shared_data_path("sst2/train.tsv"),
                    help="the domain text the vocabulary is pruned to (default SST-2 train)")
    ap.add_argument("--domain-dev", type=Path, default=shared_data_path("sst2/dev.tsv"),
                    help="held-out text of the same domain (default SST-2 dev)")
    ap.add_argument("--samples", type=int, default=64, help="held-out WikiText-2 samples")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-bert-base", action="store_true")
    add_out_argument(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
