"""Benchmark: SST-2 accuracy of a linear probe on mean-pooled embeddings, per graph.

    python -m benchmarks.sst2_probe --fp32 engines/minilm/pretrained/model.fp32.onnx \
        --variant hybrid=engines/minilm/pretrained/hybrid/model.onnx \
        [--variant int8=PATH ...] [--retrain hybrid] [--train-samples 2000] \
        [--dev-samples 872] [--model minilm] [--out engines/benchmarks]

A logistic-regression probe (`compiler.eval.task_accuracy.train_probe`) is trained once on
the FP32 graph's embeddings of the first `--train-samples` SST-2 train sentences and
kept fixed; each graph's dev accuracy with that probe is reported, with the change in
points against FP32, so a difference comes from the variant's embeddings alone.
`--retrain NAME` also reports a probe trained on that graph's own train embeddings (how
much of a loss a retrained head wins back). Graphs with FP16 tensors run on the faithful
FP16 reference, the others on ONNX Runtime CPU.

Embeddings are cached as .npy under `<out>/cache/` (`compiler.artifacts.cached`), keyed by
the ONNX file's sha256, the split, the sample count, the tokenizer and max_length, so a
rerun only scores. Prints a markdown table and writes `<out>/sst2_probe.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (add_out_argument, graph_without_weights, load_tokenizer, markdown_table,
                               named_path, run_main, write_result)
from compiler.eval.fp16_reference import REFERENCE_NAME
from compiler.eval.task_accuracy import (ProbeResult, embedding_session, load_sst2, nonfinite_rows,
                                         probe_accuracy, sentence_embeddings, train_probe)

ORT_NAME = "onnxruntime CPU (ORT_ENABLE_ALL)"


def tokenizer_key(tokenizer: Any) -> str:
    """12 hex digits of sha256 over the tokenizer's class name and vocabulary (a cache key part)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    text = f"{type(tokenizer).__name__}\n{vocab}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly `path` (through a file object: np.save would append .npy to a path)."""
    with open(path, "wb") as f:
        np.save(f, array)


def graph_inputs(path: Path) -> list[str]:
    """The graph's inputs that are not initializers (weights unread).

    Raises:
        compiler.errors.InvalidOnnxError: no file at `path`.
    """
    light = graph_without_weights(path)
    weights = {t.name for t in light.graph.initializer}
    return [i.name for i in light.graph.input if i.name not in weights]


class Graph:
    """One ONNX graph: its embeddings per split, cached on disk, made on first need."""

    def __init__(self, name: str, path: Path, args: argparse.Namespace, tokenizer: Any, tok_key: str) -> None:
        from compiler.graph.onnx_io import onnx_sha256

        self.name, self.path, self.args, self.tokenizer = name, path, args, tokenizer
        self.inputs = graph_inputs(path)  # first: a missing file gets a clear error
        self.sha256 = onnx_sha256(path)
        self.tok_key = tok_key
        self.session = None
        self.faithful: bool | None = None
        self.seconds = 0.0
        self.cached: list[str] = []

    def cache_file(self, split: str, count: int) -> Path:
        key = (f"{self.sha256[:20]}-{split}-{count}-tok{self.tok_key}"
               f"-len{self.args.max_length}")
        return self.args.out / "cache" / f"sst2-{key}.npy"

    def embeddings(self, split: str, texts: list[str]) -> np.ndarray:
        """(len(texts), hidden) float32 mean-pooled embeddings, from the cache when it has them."""
        from compiler.artifacts import cached
        from compiler.settings import settings_hash

        file = self.cache_file(split, len(texts))
        meta = file.with_suffix(".json")
        key = settings_hash("sst2-embeddings-v1", self.sha256, split, len(texts), self.tok_key,
                            self.args.max_length)
        fresh: dict[str, np.ndarray] = {}
        if cached(key, [file, meta], lambda: fresh.update(emb=self.compute(split, texts, file, meta)),
                  f"sst2 {self.name} {split}"):
            self.faithful = json.loads(meta.read_text())["faithful_fp16"]
            self.cached.append(split)
            return np.load(file)
        return fresh["emb"]

    def compute(self, split: str, texts: list[str], file: Path, meta: Path) -> np.ndarray:
        """Run the graph over `texts` and write the embeddings to `file` and their record to `meta`."""
        from compiler.artifacts import atomic_write, write_json

        start = time.perf_counter()
        if self.session is None:
            self.session, self.faithful = embedding_session(self.path)
        emb = sentence_embeddings(self.session, texts, self.tokenizer, self.inputs,
                                  max_length=self.args.max_length,
                                  batch_size=self.args.batch_size)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        atomic_write(file, lambda p: save_npy(p, emb))
        write_json(meta, {"onnx": str(self.path), "sha256": self.sha256, "split": split,
                          "count": len(texts), "faithful_fp16": self.faithful,
                          "max_length": self.args.max_length,
                          "tokenizer_key": self.tok_key})
        where = "FP16 reference" if self.faithful else "ORT CPU"
        print(f"  {self.name:<12} {split:<5} {len(texts):>5} embeddings in "
              f"{seconds:6.1f} s ({where})", flush=True)
        return emb

    def release(self) -> None:
        self.session = None

    @property
    def reference(self) -> str:
        return REFERENCE_NAME if self.faithful else ORT_NAME


@dataclass
class Sst2:
    """The SST-2 sentences and labels of both splits; labels (N,) int 0/1."""

    train_texts: list[str]
    train_labels: np.ndarray
    dev_texts: list[str]
    dev_labels: np.ndarray


@dataclass
class FixedProbe:
    """The probe trained on FP32 train embeddings, with what the report says of it."""

    probe: Any
    fp32_train: np.ndarray
    kept: int
    hidden: int
    train_accuracy: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path,
                    default=Path("engines/minilm/pretrained/model.fp32.onnx"),
                    help="the FP32 ONNX whose train embeddings train the probe")
    ap.add_argument("--variant", type=named_path, action="append", default=[],
                    metavar="NAME=PATH",
                    help="an ONNX graph with the FP32 graph's inputs (repeatable)")
    ap.add_argument("--retrain", action="append", default=[], metavar="NAME",
                    help="also report a probe retrained on this graph's own train "
                         "embeddings (repeatable)")
    ap.add_argument("--train-samples", type=int, default=2000,
                    help="the first N SST-2 train sentences")
    ap.add_argument("--dev-samples", type=int, default=None,
                    help="the first N SST-2 dev sentences (default: all 872)")
    ap.add_argument("--model", default="minilm",
                    help="model whose tokenizer feeds the graphs")
    ap.add_argument("--weights", default="pretrained", choices=("pretrained", "random"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-relative-std", type=float, default=1e-3,
                    help="the probe drops features whose train std is at most this x "
                         "the median std (0: keep all non-constant features)")
    ap.add_argument("--sst2", type=Path, default=None,
                    help="folder with train.tsv/dev.tsv (default ../shared/data/sst2)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    names = [n for n, _ in args.variant]
    if "fp32" in names or len(set(names)) != len(names):
        ap.error(f"variant names must be unique and not 'fp32': {names}")
    unknown = [n for n in args.retrain if n not in ("fp32", *names)]
    if unknown:
        ap.error(f"--retrain {unknown}: not a graph name; known: {['fp32', *names]}")
    if args.train_samples < 2:
        ap.error("--train-samples must be >= 2")
    return args


def open_graphs(args: argparse.Namespace, tokenizer: Any, tok_key: str) -> list[Graph]:
    """The FP32 graph first, then the variants; exits when a variant's inputs differ from FP32's."""
    graphs = [Graph("fp32", args.fp32, args, tokenizer, tok_key)]
    graphs += [Graph(n, p, args, tokenizer, tok_key) for n, p in args.variant]
    fp32 = graphs[0]
    for g in graphs[1:]:
        if sorted(g.inputs) != sorted(fp32.inputs):
            sys.exit(f"{g.name}: graph inputs {g.inputs} differ from the FP32 graph's "
                     f"{fp32.inputs}")
    return graphs


def fit_fixed_probe(fp32: Graph, data: Sst2, args: argparse.Namespace) -> FixedProbe:
    """Train the probe on the FP32 graph's train embeddings (`train_probe`)."""
    fp32_train = fp32.embeddings("train", data.train_texts)
    probe = train_probe(fp32_train, data.train_labels, seed=args.seed, min_relative_std=args.min_relative_std)
    return FixedProbe(probe, fp32_train, int(probe[0].get_support().sum()), int(probe[0].n_features_in_),
                      probe_accuracy(probe, fp32_train, data.train_labels))


def retrained_accuracy(g: Graph, fixed: FixedProbe, dev: np.ndarray, data: Sst2,
                       args: argparse.Namespace) -> float | None:
    """Dev accuracy of a probe trained on the graph's own train embeddings (None when non-finite)."""
    train = fixed.fp32_train if g.name == "fp32" else g.embeddings("train", data.train_texts)
    if nonfinite_rows(train):
        print(f"  {g.name}: {nonfinite_rows(train)} non-finite train embeddings, no retrained probe")
        return None
    own = train_probe(train, data.train_labels, seed=args.seed, min_relative_std=args.min_relative_std)
    return probe_accuracy(own, dev, data.dev_labels)


def score_graphs(graphs: list[Graph], fixed: FixedProbe, data: Sst2, args: argparse.Namespace) -> list[ProbeResult]:
    """Each graph's dev accuracy with the fixed probe, its change against FP32 (the first graph)
    in points, and the retrained probe's accuracy where `--retrain` asks for it."""
    rows: list[ProbeResult] = []
    base = None
    for g in graphs:
        t0 = time.perf_counter()
        dev = g.embeddings("dev", data.dev_texts)
        acc = probe_accuracy(fixed.probe, dev, data.dev_labels)
        base = acc if base is None else base
        retrained = retrained_accuracy(g, fixed, dev, data, args) if g.name in args.retrain else None
        g.release()
        seconds = round(time.perf_counter() - t0, 1)
        rows.append(ProbeResult(g.name, str(g.path), g.sha256, g.reference, acc,
                                round((acc - base) * 100, 2), retrained,
                                nonfinite_rows(dev), seconds))
    return rows


def print_table(rows: list[ProbeResult], fixed: FixedProbe, majority: float) -> None:
    print(f"\nprobe: VarianceThreshold ({fixed.kept} of {fixed.hidden} features kept) + "
          "StandardScaler + LogisticRegression(C=1.0, lbfgs, max_iter 2000) on FP32 "
          f"train embeddings; train accuracy {fixed.train_accuracy:.4f}; dev majority class "
          f"{majority:.4f}\n")
    print(markdown_table(
        ["graph", "dev accuracy (FP32 probe)", "vs FP32 (points)", "retrained probe", "non-finite dev rows",
         "runs on", "seconds", "sha256"],
        [[r.name, f"{r.accuracy:.4f}", f"{r.delta_points:+.2f}",
          "-" if r.retrained_accuracy is None else f"{r.retrained_accuracy:.4f}", r.nonfinite_rows,
          "FP16 reference" if r.reference == REFERENCE_NAME else "ORT CPU", r.seconds, r.sha256[:12]]
         for r in rows],
        align="lrrrrlrl"))


def result_json(args: argparse.Namespace, tok_key: str, data: Sst2, fixed: FixedProbe, majority: float,
                rows: list[ProbeResult], graphs: list[Graph]) -> dict[str, Any]:
    import onnxruntime
    import sklearn

    return {
        "model": args.model, "weights": args.weights, "tokenizer_key": tok_key,
        "max_length": args.max_length,
        "data": {"train": "SST-2 train.tsv, first rows",
                 "dev": "SST-2 dev.tsv, first rows",
                 "train_samples": len(data.train_texts), "dev_samples": len(data.dev_texts),
                 "train_positive": int(data.train_labels.sum()),
                 "dev_positive": int(data.dev_labels.sum())},
        "probe": {"kind": "VarianceThreshold + StandardScaler + LogisticRegression",
                  "C": 1.0, "solver": "lbfgs", "max_iter": 2000, "seed": args.seed,
                  "min_relative_std": args.min_relative_std, "features_kept": fixed.kept,
                  "features": fixed.hidden, "trained_on": "fp32",
                  "train_accuracy": fixed.train_accuracy},
        "dev_majority_class_accuracy": majority,
        "rows": [{**r.to_dict(), "cached": g.cached, "embedding_seconds": round(g.seconds, 1)}
                 for r, g in zip(rows, graphs)],
        "versions": {"onnxruntime": onnxruntime.__version__, "scikit-learn": sklearn.__version__},
        "cache": str(args.out / "cache"),
    }


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model, args.weights)
    tok_key = tokenizer_key(tokenizer)
    data = Sst2(*load_sst2("train", args.train_samples, args.sst2), *load_sst2("dev", args.dev_samples, args.sst2))
    print(f"SST-2: {len(data.train_texts)} train / {len(data.dev_texts)} dev sentences; "
          f"tokenizer of {args.model} ({args.weights}), max_length {args.max_length}")
    graphs = open_graphs(args, tokenizer, tok_key)
    fixed = fit_fixed_probe(graphs[0], data, args)
    rows = score_graphs(graphs, fixed, data, args)
    majority = float(max(data.dev_labels.mean(), 1 - data.dev_labels.mean()))
    print_table(rows, fixed, majority)
    result = result_json(args, tok_key, data, fixed, majority, rows, graphs)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_result(args.out, "sst2_probe", result)


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
