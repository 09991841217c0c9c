"""The one fidelity probe: a variant graph against the FP32 reference, per output, per input set.

Used by the verify stage (`compiler.eval.verify`), the `auto` precision budget
(`compiler.passes.auto_precision`), the INT8 budget (`compiler.quant.budget`), QAT's report
and the benchmarks. The reference outputs are computed once, on ONNX Runtime CPU (FP32 graph,
graph optimizations on); each variant then runs on:

- the faithful FP16 reference (`compiler.eval.fp16_reference`) when it holds any FP16 tensor:
  ONNX Runtime's CPU provider runs FP16 chains in FP32 and hides overflow, the emulation does not;
- ONNX Runtime CPU with graph optimizations off otherwise (`optimize=False`, the default), so
  QuantizeLinear / DequantizeLinear run as written (round half to even, saturate to [-128, 127]);
  `optimize=True` lets ONNX Runtime fuse them (what its own INT8 kernels compute).

Per sample and output, at the sample's valid (unpadded) positions: cosine similarity of the
flattened values, max |variant - reference|, and the count of NaN/Inf values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from compiler.eval.fp16_reference import REFERENCE_NAME, fp16_emulation, has_fp16, session
from compiler.eval.reference_outputs import Batch, chunked_batches, reference_outputs, set_keys

ORT_FP32_NAME = "onnxruntime CPU (FP32 graph)"


# sample_fidelity reads a sample in chunks of this many values (32 MiB as float64): one sample of
# LM logits at 512 tokens x 250k vocabulary is 128M values, 1 GiB as float64 for each copy
FIDELITY_CHUNK = 1 << 22


def valid_positions(x: np.ndarray, i: int, length: int) -> np.ndarray:
    """Sample i's values at its `length` valid positions of a (batch, sequence, ...) output, of a
    KV cache (batch, heads, sequence, head_dim: rank 4, `present.*`), or its row of a (batch, ...)
    output of rank 2 or less (pooled outputs, classification logits have no sequence axis)."""
    if x.ndim == 4:
        return x[i, :, :length]
    return x[i, :length] if x.ndim >= 3 else x[i]


def sample_fidelity(ref: np.ndarray, got: np.ndarray, i: int, length: int) -> tuple[float, int, float]:
    """(cosine, non-finite count, max abs error) of sample `i` of one output at its valid positions.

    Args:
        ref, got: the same output of the reference and the variant, (batch, sequence, ...) or
            (batch, ...), any float dtype (compared in float64).
        i: the sample's row. length: its valid tokens.

    Returns:
        A sample with a non-finite value scores cosine -1 and max error nan; a zero vector
        matches only a zero vector (cosine 1 or 0).
    """
    g_all, r_all = valid_positions(got, i, length).ravel(), valid_positions(ref, i, length).ravel()
    dot = g_norm = r_norm = err = 0.0
    bad, equal = 0, True
    for start in range(0, max(g_all.size, 1), FIDELITY_CHUNK):  # float64 copies of one chunk at a time
        g = g_all[start:start + FIDELITY_CHUNK].astype(np.float64)
        r = r_all[start:start + FIDELITY_CHUNK].astype(np.float64)
        bad += g.size - int(np.count_nonzero(np.isfinite(g)))
        if bad:
            continue
        dot, g_norm, r_norm = dot + float(g @ r), g_norm + float(g @ g), r_norm + float(r @ r)
        err, equal = max(err, float(np.max(np.abs(g - r))) if g.size else 0.0), equal and np.array_equal(g, r)
    if bad:
        return -1.0, bad, float("nan")
    denom = np.sqrt(g_norm) * np.sqrt(r_norm)
    return (float(dot / denom) if denom else float(equal)), 0, err


@dataclass
class OutputFidelity:
    """One output of a variant against the reference over one input set.

    Attributes:
        name: the graph output.
        cosine_min / cosine_mean: over samples; a sample with a non-finite value scores -1.
        deficit_mean: mean of (1 - cosine): the error a budget search ranks nodes by.
        max_abs_err: largest |variant - reference| over the samples without a non-finite value.
        nonfinite_count: NaN/Inf values of the variant at valid positions.
        samples: samples compared.
        reference_nonfinite_count: NaN/Inf values of the reference at valid positions (a
            variant is not to blame for those; verify's refusal counts on it).
    """

    name: str
    cosine_min: float
    cosine_mean: float
    deficit_mean: float
    max_abs_err: float
    nonfinite_count: int
    samples: int
    reference_nonfinite_count: int = 0

    def report(self) -> dict[str, Any]:
        """The verify report's view: cosine and error are None (JSON null) once any value is
        non-finite, so a NaN never reads as a figure."""
        clean = not self.nonfinite_count
        return {"cosine_min": self.cosine_min if clean else None,
                "cosine_mean": self.cosine_mean if clean else None,
                "max_abs_err": self.max_abs_err if clean else None,
                "nonfinite_count": self.nonfinite_count, "samples": self.samples}


@dataclass
class Fidelity:
    """A variant against the reference over one input set: every output, the first one headline.

    Attributes:
        outputs: one entry per probed output, in the probe's order.
        seconds: wall time of the variant's runs.
        reused: the figures were read from the measurement cache (`FidelityProbe`): the same
            variant graph was measured on the same samples before, e.g. by the precision budget.
    """

    outputs: list[OutputFidelity]
    seconds: float
    reused: bool = False

    @property
    def first(self) -> OutputFidelity:
        return self.outputs[0]

    @property
    def cosine_min(self) -> float:
        return self.first.cosine_min

    @property
    def cosine_mean(self) -> float:
        return self.first.cosine_mean

    @property
    def deficit_mean(self) -> float:
        return self.first.deficit_mean

    @property
    def max_abs_err(self) -> float:
        return self.first.max_abs_err

    @property
    def nonfinite_count(self) -> int:
        """NaN/Inf values over every probed output."""
        return sum(o.nonfinite_count for o in self.outputs)

    @property
    def samples(self) -> int:
        return self.first.samples

    def within(self, min_cosine: float, max_nonfinite: int = 0) -> bool:
        """The budget test: cosine_min >= min_cosine and nonfinite_count <= max_nonfinite."""
        return self.cosine_min >= min_cosine and self.nonfinite_count <= max_nonfinite

    def to_dict(self) -> dict[str, Any]:
        """Headline figures (first output; cosine -1 for a non-finite sample) and `deficit_mean`."""
        return {"cosine_min": self.cosine_min, "cosine_mean": self.cosine_mean,
                "deficit_mean": self.deficit_mean, "max_abs_err": self.max_abs_err,
                "nonfinite_count": self.nonfinite_count, "samples": self.samples}

    def report(self) -> dict[str, Any]:
        """The verify report's view: the first output's figures (None once it has a non-finite
        value), non-finite values over every output, and each output's own figures."""
        head = self.first.report()
        head["nonfinite_count"] = self.nonfinite_count
        head["reference_nonfinite_count"] = sum(o.reference_nonfinite_count for o in self.outputs)
        return {**head, "seconds": self.seconds, "reused": self.reused,
                "outputs": {o.name: o.report() for o in self.outputs}}

    def to_json(self) -> dict[str, Any]:
        """Every figure, for the measurement cache (`from_json` reads it back)."""
        return {"seconds": self.seconds, "outputs": [vars(o) for o in self.outputs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], reused: bool = True) -> Fidelity:
        return cls([OutputFidelity(**o) for o in d["outputs"]], float(d["seconds"]), reused)


class FidelityProbe:
    """Variants against one FP32 reference; the reference outputs computed once per input set.

    Args:
        reference: the FP32 onnx.ModelProto, or its path (cheaper: ONNX Runtime reads the file).
        output_names: outputs to compare; the first is the headline (cosine, error).
        sets: {set name: (feeds, lengths) batches}, e.g. {"real": tokens.batches(8, names)}.
            Each iterable is read once, here.
        cache_dir: with a `reference` path, each set's reference outputs are kept in
            `<cache_dir>/fp32-outputs-<key>.npz`, key = sha256 over the graph file(s), the output
            name, the set's feeds (names, shapes, bytes) and the ONNX Runtime version: the
            `auto` budget, the INT8 budget and verify run the FP32 graph on the same held-out
            batches, and the second one reads them back. Outputs over `REFERENCE_CACHE_MAX_MIB`
            per set are not cached. The figures of each variant measured are kept there too
            (`<cache_dir>/fidelity-<key>.json`, key = the reference's key, the outputs, the
            engine and `compiler.graph.onnx_io.model_digest` of the variant): verify measures
            the graph the precision or INT8 budget measured last on the same held-out batches,
            and reads its figures back instead of running it again (BERT-large: ~50 s). None:
            no cache.
        graph_sha256: the `reference` file's `onnx_sha256` when the caller has it (not read again).

    Attributes:
        samples: {set name: samples}. evaluations: variants measured so far.
        reused: set names whose reference outputs came from the cache.
        streamed: set names whose reference outputs would exceed `REFERENCE_MEMORY_MAX_MIB`: not
            kept, the FP32 graph runs again beside each variant, batch by batch (nothing cached).

    Raises:
        ValueError: no set, or a set without a sample.
    """

    def __init__(self, reference: Any, output_names: list[str], sets: Mapping[str, Iterable[Batch]],
                 cache_dir: str | None = None, graph_sha256: str | None = None) -> None:
        self.output_names = list(output_names)
        self.batches = {name: list(b) for name, b in sets.items()}
        if not self.batches or not all(self.batches.values()):
            raise ValueError(f"FidelityProbe needs at least one non-empty input set, got {list(self.batches)}")
        self.cache_dir, self.set_keys = cache_dir, set_keys(reference, self.batches, cache_dir, graph_sha256)
        self.reference, self.reused = reference_outputs(reference, self.output_names, self.batches, self.set_keys,
                                                         cache_dir)
        self.streamed = [name for name, outputs in self.reference.items() if outputs is None]
        self._reference_model, self._reference_session = reference, None
        self.samples = {name: int(sum(len(n) for _, n in b)) for name, b in self.batches.items()}
        self.evaluations = 0

    @classmethod
    def on_tokens(cls, reference: Any, tokens: Any, input_names: list[str], outputs: str | list[str],
                  batch_size: int, cache_dir: str | None = None) -> FidelityProbe:
        """A probe of one output, or of several (the first the headline), over one token set
        (`calibration.TokenizedSet`), the set named "heldout": what the accuracy budgets use.
        Batched longest first (`TokenizedSet.batches(by_length=True)`), as verify batches its
        real text, so that verify finds the budget's reference outputs and figures."""
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        return cls(reference, names, {"heldout": tokens.batches(batch_size, input_names, by_length=True)}, cache_dir)

    def session_for(self, variant: Any, optimize: bool = False, consume: bool = False) -> Any:
        """The ONNX Runtime session a variant (ModelProto) runs on: the faithful FP16 reference
        when it holds FP16 tensors, else ORT CPU with optimizations off unless `optimize`."""
        if has_fp16(variant):  # the widened weights go to ONNX Runtime as arrays, not through a file
            weights: dict[str, np.ndarray] = {}
            return session(fp16_emulation(variant, weights), faithful_fp16=True, consume=True, weights=weights)
        return session(variant, faithful_fp16=not optimize, consume=consume)

    def measure(self, variant: Any, optimize: bool = False, consume: bool = False) -> dict[str, Fidelity]:
        """{set name: Fidelity} of `variant` (a ModelProto with the reference's inputs and outputs).

        Args:
            optimize: let ONNX Runtime optimize a graph without FP16 tensors (fuses Q/DQ).
            consume: let a large ModelProto give its weights to the session.
        """
        keys = self._measurement_keys(variant, optimize)
        result = {name: f for name in self.batches if (f := self._cached(keys.get(name))) is not None}
        todo = [name for name in self.batches if name not in result]
        if todo:
            sess = self.session_for(variant, optimize, consume)
            for name in todo:
                result[name] = self._compare(sess, name)
                self._store(keys.get(name), result[name])
            del sess
        self.evaluations += 1
        return {name: result[name] for name in self.batches}

    def _measurement_keys(self, variant: Any, optimize: bool) -> dict[str, str]:
        """{set: cache key of this variant's figures}; empty without a cache (or a digest)."""
        if not self.set_keys:
            return {}
        from compiler.graph.onnx_io import model_digest
        from compiler.settings import settings_hash

        digest = model_digest(variant)
        if digest is None:
            return {}
        engine = reference_name(variant, optimize)
        # the version tag stands for the emulation (`fp16_emulation`) and the metrics
        # (`sample_fidelity`): bump it when either changes, so that no stale figure is read back
        return {name: settings_hash("variant-fidelity-v2", key, self.output_names, engine, digest)
                for name, key in self.set_keys.items()}

    def _path(self, key: str) -> Path:
        return Path(str(self.cache_dir)) / f"fidelity-{key[:32]}.json"

    def _cached(self, key: str | None) -> Fidelity | None:
        import json

        if key is None or not self._path(key).is_file():
            return None
        try:
            d = json.loads(self._path(key).read_text())
            return Fidelity.from_json(d["fidelity"]) if d.get("key") == key else None
        except (OSError, ValueError, KeyError, TypeError):  # a damaged entry: measure again
            return None

    def _store(self, key: str | None, fidelity: Fidelity) -> None:
        from compiler.artifacts import write_json

        if key is not None:
            write_json(self._path(key), {"key": key, "fidelity": fidelity.to_json()})

    def score(self, variant: Any, optimize: bool = False, consume: bool = False) -> Fidelity:
        """`measure` of a probe with one input set: that set's Fidelity."""
        if len(self.batches) != 1:
            raise ValueError(f"score() needs a probe of one input set, this one has {list(self.batches)}")
        return next(iter(self.measure(variant, optimize, consume).values()))

    def _compare(self, sess: Any, name: str) -> Fidelity:
        start = time.perf_counter()
        tally = FidelityTally(self.output_names)
        if self.reference[name] is not None:
            for (feeds, lengths), ref in zip(self.batches[name], self.reference[name]):
                tally.add(ref, sess.run(self.output_names, feeds), lengths)
        else:  # streamed: the reference beside the variant, a few rows at a time
            for feeds, lengths in chunked_batches(self.batches[name], self._reference_run):
                tally.add(self._reference_run(feeds), sess.run(self.output_names, feeds), lengths)
        return Fidelity(tally.outputs(), round(time.perf_counter() - start, 2))

    def _reference_run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The FP32 outputs of one batch of a streamed set (its session opened once)."""
        if self._reference_session is None:
            self._reference_session = session(self._reference_model, faithful_fp16=False)
        return self._reference_session.run(self.output_names, feeds)


class FidelityTally:
    """Per-sample fidelity accumulated over batches, per output: what `FidelityProbe` and the
    deployment host's `run --check` both report.

    Args:
        output_names: the outputs compared, in the order `add` receives them.
    """

    def __init__(self, output_names: list[str]) -> None:
        self.output_names = list(output_names)
        self.cosines: list[list[float]] = [[] for _ in self.output_names]
        self.max_err = [0.0] * len(self.output_names)
        self.nonfinite = [0] * len(self.output_names)
        self.reference_nonfinite = [0] * len(self.output_names)

    def add(self, ref: list[np.ndarray], got: list[np.ndarray], lengths: Iterable[int]) -> None:
        """One batch: `ref[k]` / `got[k]` are output k, (batch, ...) float arrays; `lengths[i]` is
        sample i's unpadded token count (`sample_fidelity`)."""
        lengths = [int(n) for n in lengths]
        for k in range(len(self.output_names)):
            for i, n in enumerate(lengths):
                cosine, bad, err = sample_fidelity(ref[k], got[k], i, n)
                self.cosines[k].append(cosine)
                self.nonfinite[k] += bad
                r = valid_positions(ref[k], i, n)
                self.reference_nonfinite[k] += r.size - int(np.count_nonzero(np.isfinite(r)))
                if not bad:
                    self.max_err[k] = max(self.max_err[k], err)

    def outputs(self) -> list[OutputFidelity]:
        """One `OutputFidelity` per output over every sample added (at least one is needed)."""
        result = []
        for k, out in enumerate(self.output_names):
            c = np.array(self.cosines[k])
            result.append(OutputFidelity(out, float(c.min()), float(c.mean()), float(np.mean(1.0 - c)),
                                         float(self.max_err[k]), self.nonfinite[k], len(c),
                                         self.reference_nonfinite[k]))
        return result


def reference_name(variant: Any, optimize: bool = False) -> str:
    """What the variant runs on in `FidelityProbe` (for reports)."""
    if has_fp16(variant):
        return REFERENCE_NAME
    return ORT_FP32_NAME if optimize else "onnxruntime CPU (graph optimizations off)"
