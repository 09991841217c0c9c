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

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from compiler.eval.fp16_reference import REFERENCE_NAME, fp16_emulation, has_fp16, session

Batch = tuple[dict[str, np.ndarray], np.ndarray]  # (feeds of (batch, sequence) int64, valid lengths (batch,))
ORT_FP32_NAME = "onnxruntime CPU (FP32 graph)"
REFERENCE_CACHE_MAX_MIB = 256  # larger reference outputs (per set and output) are not cached


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
    g = valid_positions(got, i, length).astype(np.float64).ravel()
    r = valid_positions(ref, i, length).astype(np.float64).ravel()
    bad = g.size - int(np.count_nonzero(np.isfinite(g)))
    if bad:
        return -1.0, bad, float("nan")
    denom = np.linalg.norm(g) * np.linalg.norm(r)
    cosine = float(g @ r / denom) if denom else float(np.array_equal(g, r))
    return cosine, 0, float(np.max(np.abs(g - r))) if g.size else 0.0


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

    Raises:
        ValueError: no set, or a set without a sample.
    """

    def __init__(self, reference: Any, output_names: list[str], sets: Mapping[str, Iterable[Batch]],
                 cache_dir: str | None = None, graph_sha256: str | None = None) -> None:
        self.output_names = list(output_names)
        self.batches = {name: list(b) for name, b in sets.items()}
        if not self.batches or not all(self.batches.values()):
            raise ValueError(f"FidelityProbe needs at least one non-empty input set, got {list(self.batches)}")
        self.cache_dir, self.set_keys = cache_dir, _set_keys(reference, self.batches, cache_dir, graph_sha256)
        self.reference, self.reused = _reference_outputs(reference, self.output_names, self.batches, self.set_keys,
                                                         cache_dir)
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
        for (feeds, lengths), ref in zip(self.batches[name], self.reference[name]):
            tally.add(ref, sess.run(self.output_names, feeds), lengths)
        return Fidelity(tally.outputs(), round(time.perf_counter() - start, 2))


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



def _set_digest(batches: list[Batch]) -> str:
    import hashlib

    h = hashlib.sha256()
    for feeds, lengths in batches:
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
        h.update(np.asarray(lengths, np.int64).tobytes())
    return h.hexdigest()


def _set_keys(reference: Any, sets: Mapping[str, list[Batch]], cache_dir: str | None,
              graph_sha256: str | None = None) -> dict[str, str]:
    """{set: key of the FP32 reference on that set}: sha256 over the graph file(s), the set's feeds
    and the ONNX Runtime version; empty without a cache folder or with a ModelProto reference.
    `graph_sha256`: the file's `onnx_sha256` when the caller has it (saves reading it again)."""
    if not cache_dir or not isinstance(reference, (str, os.PathLike)):
        return {}
    import onnxruntime

    from compiler.graph.onnx_io import onnx_sha256
    from compiler.settings import settings_hash

    graph = graph_sha256 or onnx_sha256(reference)
    return {name: settings_hash("fp32-reference-v1", graph, _set_digest(b), onnxruntime.__version__)
            for name, b in sets.items()}


def _output_key(set_key: str, output: str) -> str:
    from compiler.settings import settings_hash

    return settings_hash("fp32-reference-outputs-v2", set_key, output)


def _output_path(cache_dir: str, key: str) -> Path:
    return Path(str(cache_dir)) / f"fp32-outputs-{key[:32]}.npz"


def _write_reference(cache_dir: str, set_key: str, run_names: list[str], results: list[list[np.ndarray]],
                     wanted: list[str]) -> None:
    """Store one set's FP32 outputs (`results[batch][k]` is output `run_names[k]`): every output
    when they fit `REFERENCE_CACHE_MAX_MIB` together, else only `wanted`, each within it."""
    from compiler.artifacts import atomic_write, write_key

    per = {o: {f"b{i}": r[k] for i, r in enumerate(results)} for k, o in enumerate(run_names)}
    cap = REFERENCE_CACHE_MAX_MIB << 20
    store = run_names if sum(a.nbytes for d in per.values() for a in d.values()) <= cap else wanted
    for o in store:
        if o not in per or sum(a.nbytes for a in per[o].values()) > cap:
            continue  # e.g. LM logits over a 50k vocabulary: recomputing beats the disk

        def write(tmp: Path, arrays: dict = per[o]) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, **arrays)

        key = _output_key(set_key, o)
        path = _output_path(cache_dir, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        write_key(path, key)


def store_reference_outputs(reference: str | os.PathLike, graph_sha256: str, batches: list[Batch],
                            output_names: list[str], results: list[list[np.ndarray]], cache_dir: str) -> None:
    """Put FP32 outputs computed elsewhere into the reference cache, where a `FidelityProbe` of
    the same graph file and the same batches finds them (the `auto` statistics pass runs the
    FP32 graph over verify's random-id set and stores its outputs here).

    Args:
        reference: the FP32 ONNX file; graph_sha256: its `onnx_sha256`.
        batches: the (feeds, lengths) batches run, as the probe will receive them.
        output_names: the graph outputs in `results`' order.
        results: per batch, one array per output, (batch, ...) float32.
        cache_dir: the probe's cache folder.
    """
    key = _set_keys(reference, {"set": batches}, cache_dir, graph_sha256)["set"]
    _write_reference(cache_dir, key, list(output_names), results, list(output_names))


def reference_cached(reference: Any, batches: list[Batch], output_names: list[str], cache_dir: str | None,
                     graph_sha256: str | None = None) -> bool:
    """Whether a `FidelityProbe` of `reference` (an ONNX path) would read the FP32 outputs of
    `batches` for every one of `output_names` from `cache_dir` instead of running the graph.
    `graph_sha256`: as `FidelityProbe`'s."""
    from compiler.artifacts import read_key

    keys = _set_keys(reference, {"set": batches}, cache_dir, graph_sha256)
    return bool(keys) and all(read_key(_output_path(str(cache_dir), k)) == k
                              for k in (_output_key(keys["set"], o) for o in output_names))


def _reference_outputs(reference: Any, output_names: list[str], sets: Mapping[str, list[Batch]],
                       set_keys: Mapping[str, str],
                       cache_dir: str | None) -> tuple[dict[str, list[list[np.ndarray]]], list[str]]:
    """{set: [per batch: [per output: array]]} of the FP32 reference, read from the cache where a
    content key shows them unchanged (see `FidelityProbe`); the names of the sets reused.

    A set computed here with a cache stores every output of the graph, not only the ones asked
    for (the forward pass computes them all anyway; a later probe of more outputs, like verify
    after a one-output budget, then finds them), unless they exceed `REFERENCE_CACHE_MAX_MIB`
    together; then only the outputs asked for, each within that limit.
    """
    from compiler.artifacts import read_key

    out: dict[str, list[list[np.ndarray]]] = {}
    reused = []
    for name in sets if set_keys and cache_dir else []:
        keys = [_output_key(set_keys[name], o) for o in output_names]
        if all(read_key(_output_path(cache_dir, k)) == k for k in keys):
            per_output = []
            for k in keys:
                with np.load(_output_path(cache_dir, k)) as z:
                    per_output.append([z[f"b{i}"] for i in range(len(sets[name]))])
            out[name] = [list(row) for row in zip(*per_output)]
            reused.append(name)
    todo = [name for name in sets if name not in out]
    if todo:
        ref = session(reference, faithful_fp16=False)
        every = [o.name for o in ref.get_outputs()] if set_keys and cache_dir else []
        run_names = list(output_names) + [o for o in every if o not in output_names]
        for name in todo:
            results = [ref.run(run_names, feeds) for feeds, _ in sets[name]]
            out[name] = [r[: len(output_names)] for r in results]
            if set_keys and cache_dir:
                _write_reference(cache_dir, set_keys[name], run_names, results, list(output_names))
            del results
        del ref
    return {name: out[name] for name in sets}, reused
