"""`PRECISION=auto`: keep the fewest nodes in FP32 that meet an accuracy budget on real text.

The hybrid rule pins by op type and is wrong both ways on real models: a MatMul or residual Add
whose activations pass 65504 on real text overflows under it, and a layer norm whose inputs are
small is pinned for nothing (its Cast pairs cost time and break fusions in TensorRT). Here
precision is measured, always with the faithful FP16 reference (`compiler.eval.fp16_reference`):

1. Activation statistics of the FP32 graph over the calibration text, reduced inside the graph
   (`compiler.passes.reduced_stats`: only per-tensor scalars and a small subsample leave ONNX
   Runtime): exact absmax and a sampled high percentile per tensor; the same over random ids
   at the held-out samples' lengths (`random_samples` of them, verify's random-id set), for
   the report.
2. Rules, each firing or declining with its reason and measured value:
   - `overflow`: absmax * `overflow_margin` >= 65504 on a node's float input or output
     (declines for mask fill values, |v| >= 1e30, which the precision pass clamps);
   - `initializer-underflow`: a constant input whose nonzero values are mostly below FP16's
     smallest normal (2**-14), where FP16 keeps few bits or flushes to zero;
   - `fp16-range` (in `compiler.passes.precision`): a constant beyond 65504;
   - `position-angle` (`compiler.passes.precision_rules.rule_position_angles`): rotary and
     sinusoidal angles, whose FP16 error grows with the position up to the profile's longest
     sequence, which the held-out text does not reach;
   - `sensitivity`: measured, see 4.
3. Start: everything FP16 except what 2 pins. Budget (`min_cosine`, `max_nonfinite`) measured
   on held-out real text, never the calibration samples.
4. While the budget fails: expose every tensor of the FP32 graph and of the current variant on
   a few calibration samples; a node's sensitivity is the relative error it adds (its output's
   error minus the largest error of its inputs; a non-finite output from finite inputs is
   infinite). The most sensitive FP16 node moves to FP32.
5. Then each node moved in 4, and every op-type-rule node (layer norm, softmax) left in FP32,
   is tried in FP16 again and stays there when the budget still holds.
6. Islands are merged: an FP16 node (not a MatMul/Gemm) whose float producers and consumers
   are all FP32 joins them, which removes its Cast pair.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from calibration.stats import exposed_outputs, float_activations
from compiler.artifacts import run_in_child
from compiler.eval.fidelity import FidelityProbe
from compiler.eval.fp16_reference import fp16_emulation, session
from compiler.graph.analysis import FLOAT, FP16_MAX, FP16_SMALLEST_NORMAL, GEMM_OPS, array, tensor_consumers
from compiler.graph.onnx_io import load_onnx, session_with_outputs, without_weights
from compiler.passes.precision import PrecisionReport, convert_precision
from compiler.passes.precision_rules import HYBRID_RULES, MASK_FILL_MIN, rule_position_angles
from compiler.passes.reduced_stats import StatsSessions, cached_reduced_stats
from compiler.settings import PrecisionSettings

log = logging.getLogger(__name__)

Pins = dict[str, tuple[str, str]]


def rule_overflow(model: Any, stats: Any, margin: float) -> tuple[Pins, list[str]]:
    """Nodes whose float inputs or outputs reach FP16's maximum on real text.

    Args:
        model: FP32 onnx.ModelProto.
        stats: `calibration.stats.ActivationStats` over real calibration text.
        margin: safety factor on the observed absmax.

    Returns:
        ({node name: ("overflow", detail)}, [declined reasons]).
    """
    pins: Pins = {}
    declined: list[str] = []
    for n in model.graph.node:
        if n.op_type == "Constant":  # the fp16-range rule keeps an out-of-range constant's reader FP32
            continue
        for t in [*n.input, *n.output]:
            s = stats.tensors.get(t)
            if s is None or s.absmax * margin < FP16_MAX:
                continue
            if s.absmax >= MASK_FILL_MIN:
                declined.append(f"{n.name}: {t} absmax {s.absmax:.3g} is a mask fill value (clamped, not pinned)")
                continue
            pins[n.name] = ("overflow", f"{t}: absmax {s.absmax:.6g} x margin {margin:g} >= {FP16_MAX:g} "
                                        f"(p{stats.percentile:g} {s.percentile:.4g})")
            break
    return pins, declined


def rule_initializer_underflow(model: Any, share: float = 0.5, base_dir: str | None = None) -> Pins:
    """Nodes with a float constant whose nonzero values are mostly below FP16's smallest normal.

    FP16 keeps fewer mantissa bits below 2**-14 (subnormals) and flushes |v| < 2**-24 to zero.

    Args:
        model: FP32 onnx.ModelProto (its initializers are read).
        share: a constant pins its readers when more than this share of its nonzero values is
            below 2**-14; constants with fewer than 16 nonzero values are never judged.
        base_dir: the folder of the model's external data, for a graph loaded without its
            weights (`onnx.load(..., load_external_data=False)`): each constant is read from
            there alone, one at a time, and the graph stays light (BERT-large, two runs: 0.76 and
            1.79 s, against 1.62 and 2.37 s loading all 1.3 GB first; no second copy in memory).

    Returns:
        {node name: ("initializer-underflow", detail)}.
    """
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    inits = {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}
    judged: dict[str, float | None] = {}  # share of small nonzero values; None: too few to judge

    def small_share(t: Any) -> float | None:
        if base_dir is not None and uses_external_data(t):
            copy = onnx.TensorProto()  # reading fills raw_data: the graph's own tensor stays light
            copy.CopyFrom(t)
            v = np.abs(numpy_helper.to_array(copy, base_dir))
        else:
            v = np.abs(array(t))
        v = v[v > 0]
        return float(np.mean(v < FP16_SMALLEST_NORMAL)) if v.size >= 16 else None

    pins: Pins = {}
    for n in model.graph.node:
        for t in n.input:
            if t not in inits:
                continue
            if t not in judged:
                judged[t] = small_share(inits[t])
            small = judged[t]
            if small is not None and small > share:
                pins[n.name] = ("initializer-underflow",
                                f"{t}: {small:.0%} of nonzero values below {FP16_SMALLEST_NORMAL:.3g}")
    return pins


def node_sensitivity(fp32_model: Any, variant: Any, batches: list[tuple[dict, np.ndarray]],
                     candidates: set[str], fp32_path: Any = None) -> dict[str, float]:
    """Relative error each candidate FP16 node adds, measured on `batches`.

    Every float tensor of the FP32 graph is exposed and compared with the same tensor of the
    variant's FP16 reference run: err(t) = ||x16 - x32|| / ||x32||. A node's sensitivity is
    err(output) - max err(float activation inputs); a non-finite output whose inputs are finite
    scores inf.

    Args:
        fp32_model: the FP32 onnx.ModelProto (weights may be absent when `fp32_path` is given).
        variant: the converted model (FP16 tensors), run on the faithful FP16 reference.
        batches: (feeds, lengths) pairs, as `TokenizedSet.batches` yields.
        candidates: names of the nodes to score (the FP16 ones).
        fp32_path: the FP32 ONNX file; ONNX Runtime then reads its weights from the file.

    Returns:
        {node name: sensitivity} for the candidates with a float output (relative errors, no unit).
    """
    names = float_activations(fp32_model)
    emu = fp16_emulation(variant)
    emu_names = {t for n in emu.graph.node for t in n.output}
    names = [t for t in names if t in emu_names]

    if fp32_path is not None:
        ref_sess = session_with_outputs(fp32_path, names)
    else:
        with exposed_outputs(fp32_model, names):
            ref_sess = session(fp32_model, faithful_fp16=False)
    with exposed_outputs(emu, names):
        emu_sess = session(emu, faithful_fp16=True, consume=True)
    del emu
    sq_err = dict.fromkeys(names, 0.0)
    sq_ref = dict.fromkeys(names, 0.0)
    bad = set()
    for feeds, _ in batches:
        for t, r, g in zip(names, ref_sess.run(names, feeds), emu_sess.run(names, feeds)):
            if not np.isfinite(g).all():
                bad.add(t)
                continue
            d = g.astype(np.float64) - r
            sq_err[t] += float(np.sum(d * d))
            sq_ref[t] += float(np.sum(r.astype(np.float64) ** 2))
    err = {t: np.inf if t in bad else (sq_err[t] / sq_ref[t]) ** 0.5 if sq_ref[t] else 0.0 for t in names}
    scores = {}
    for n in fp32_model.graph.node:
        if n.name not in candidates:
            continue
        outs = [err[t] for t in n.output if t in err]
        if not outs:
            continue
        ins = [err[t] for t in n.input if t in err]
        worst_in = max(ins, default=0.0)
        out = max(outs)
        scores[n.name] = np.inf if np.isinf(out) and not np.isinf(worst_in) else (
            0.0 if np.isinf(out) else out - worst_in)
    return scores


def merge_islands(model: Any, pins: Pins) -> Pins:
    """FP16 nodes (not MatMul/Gemm) whose float producers and consumers are all FP32 join them.

    Args:
        model: the FP32 onnx.ModelProto. pins: {node name: (rule, detail)} kept in FP32.

    Returns:
        {node name: ("island-merge", detail)} of the nodes to add (graph outputs never join).
    """
    g = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    is_float = {v.name for v in [*g.value_info, *g.output, *g.input] if v.type.tensor_type.elem_type == FLOAT}
    inits = {t.name for t in model.graph.initializer}
    nodes = list(model.graph.node)
    producer = {t: n.name for n in nodes for t in n.output}
    consumers = tensor_consumers(nodes)
    graph_io = {v.name for v in [*model.graph.input, *model.graph.output]}
    merged: Pins = {}
    for i, n in enumerate(nodes):
        if n.name in pins or n.op_type in GEMM_OPS + ("Constant",) or not any(t in is_float for t in n.output):
            continue  # a Constant is an initializer to the conversion: it takes its readers' type
        ins = [t for t in n.input if t in is_float and t not in inits]
        outs = [t for t in n.output if t in is_float]
        srcs = [producer.get(t) for t in ins]
        dsts = [nodes[j].name for t in outs for j in consumers.get(t, [])]
        fp32_neighbours = all(s in pins or (s is None and t in graph_io) for s, t in zip(srcs, ins)) \
            and all(d in pins for d in dsts) and (ins or dsts) and not any(t in graph_io for t in outs)
        if fp32_neighbours:
            merged[n.name] = ("island-merge", "every float producer and consumer is FP32: "
                                              "joining them removes a Cast pair")
    return merged


@dataclass
class Variant:
    """One FP32/FP16 assignment of the search, converted and measured.

    Attributes:
        pins: {node name: (rule, detail)} kept in FP32.
        model: the converted onnx.ModelProto. report: its PrecisionReport.
        fidelity: {"cosine_min", "cosine_mean", "nonfinite_count", "ok"} on the held-out text;
            `ok` says whether the budget holds.
    """

    pins: Pins
    model: Any
    report: PrecisionReport
    fidelity: dict[str, Any]


class Evaluator:
    """Converts the FP32 graph with given pins and measures it on held-out text.

    Args:
        fp32_model: the FP32 onnx.ModelProto, or None when `fp32_path` is read per conversion.
        fp32_path: the FP32 ONNX file, or None.
        settings: the budget (`min_cosine`, `max_nonfinite`); conversions run in mode `auto`.
        probe: a `FidelityProbe` of one held-out set (its FP32 outputs computed once).
    """

    def __init__(self, fp32_model: Any, fp32_path: Any, settings: PrecisionSettings,
                 probe: FidelityProbe) -> None:
        self.fp32_model, self.fp32_path, self.probe = fp32_model, fp32_path, probe
        self.settings = settings
        self.conv = replace(settings, mode="auto")

    def __call__(self, pins: Pins) -> Variant:
        source = load_onnx(self.fp32_path, check=False) if self.fp32_path else self.fp32_model
        model, report = convert_precision(source, self.conv, fp32_nodes=pins)
        del source
        f = self.probe.score(model, consume=True)
        return Variant(pins, model, report, {
            "cosine_min": f.cosine_min, "cosine_mean": f.cosine_mean, "nonfinite_count": f.nonfinite_count,
            "ok": f.within(self.settings.min_cosine, self.settings.max_nonfinite)})


def auto_precision(fp32_model: Any, settings: PrecisionSettings, calib_tokens: Any, heldout_tokens: Any,
                   input_names: list[str], output_names: list[str], batch_size: int, vocab_size: int,
                   graph_sha256: str, cache_dir: str | None, seed: int = 0) -> tuple[Any, PrecisionReport]:
    """Search the FP32/FP16 assignment (see the module docstring) and convert the graph.

    Args:
        fp32_model: the FP32 onnx.ModelProto, or the path of an FP32 ONNX file saved with
            external data (statistics and FP32 runs then read the weights from the file, and
            the proto is loaded only after the statistics: BERT-large stays under 6 GB).
        settings: mode `auto` with the budget (`min_cosine`, `max_nonfinite`) and search knobs.
        calib_tokens, heldout_tokens: `calibration.TokenizedSet`s of real text, disjoint.
        input_names, output_names: graph I/O; the budget's cosine is the first output's, its
            non-finite count over every output (as verify's).
        batch_size: held-out batch size; statistics run up to this many samples of one length
            at a time (`compiler.passes.reduced_stats.equal_length_batches`: no padding).
        vocab_size: random ids for the real-vs-random statistics are drawn below it.
        graph_sha256, cache_dir: key and folder for cached activation statistics.
        seed: seed of the random ids.

    Returns:
        (converted model, PrecisionReport whose `search` holds the statistics summary, the
        budget, every step with its measured fidelity, and the rules that declined).
    """
    start = time.perf_counter()
    fp32_path = fp32_model if isinstance(fp32_model, (str, os.PathLike)) else None
    stats = _activation_stats(fp32_model, graph_sha256, calib_tokens, heldout_tokens, input_names, cache_dir,
                              settings, vocab_size, seed, batch_size)
    if fp32_path is not None:  # the graph without its weights; they are read per conversion
        fp32_model = onnx.load(str(fp32_path), load_external_data=False)
    init_pins = rule_initializer_underflow(fp32_model, base_dir=os.path.dirname(os.path.abspath(fp32_path))
                                           if fp32_path else None)
    overflow, declined = rule_overflow(fp32_model, stats["real"], settings.overflow_margin)
    random_overflow, _ = rule_overflow(fp32_model, stats["random"], settings.overflow_margin)
    # position angles grow with the profile's longest sequence, which the held-out text does not reach
    angle_nodes = list(fp32_model.graph.node)
    angles = {angle_nodes[i].name: why for i, why in rule_position_angles(angle_nodes, {}).items()
              if angle_nodes[i].name}
    pins: Pins = {**init_pins, **overflow, **angles}
    fixed = set(pins)  # measured hazards and position angles: never tried back in FP16
    # every output: the budget reads the first (and non-finite values of all), verify reuses the figures
    probe = FidelityProbe.on_tokens(fp32_path or fp32_model, heldout_tokens, input_names, output_names,
                                    batch_size, cache_dir)
    evaluate = Evaluator(None if fp32_path else fp32_model, fp32_path, settings, probe)
    sens_batches = list(calib_tokens.batches(1, input_names))[: settings.sensitivity_samples]

    best = evaluate(pins)
    steps = [{"action": "start: FP16 except measured hazards", "fp32_nodes": len(pins), **best.fidelity}]
    best, added = _add_sensitive_nodes(evaluate, best, fp32_model, fp32_path, sens_batches,
                                       settings.max_search_steps, steps)
    if best.fidelity["ok"]:  # step 5: move back to FP16 whatever the budget does not need
        names = [*reversed(added), *sorted(_op_rule_nodes(fp32_model) & set(best.pins) - fixed)]
        best = _try_fp16_again(evaluate, best, names, steps)
    else:
        log.warning("auto: budget min_cosine %.6g / max_nonfinite %d not met after %d steps (%s)",
                    settings.min_cosine, settings.max_nonfinite, len(added), best.fidelity)
    merged = merge_islands(fp32_model, best.pins)
    if merged:
        best = evaluate({**best.pins, **merged})
        steps.append({"action": f"merge islands: {len(merged)} nodes", "fp32_nodes": len(best.pins),
                      **best.fidelity})

    report, fid = best.report, best.fidelity
    report.mode = "auto"
    report.search = {
        "budget": {"min_cosine": settings.min_cosine, "max_nonfinite": settings.max_nonfinite,
                   "heldout_samples": len(heldout_tokens), "met": bool(fid["ok"])},
        "heldout_fidelity": {k: v for k, v in fid.items() if k != "ok"},
        "steps": steps,
        "evaluations": probe.evaluations,
        "declined": declined[:50],
        "activation_stats": {src: _stats_summary(s, settings.overflow_margin) for src, s in stats.items()},
        "overflow_pins": {"real": len(overflow), "random": len(random_overflow)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("auto: %d FP32 nodes, %d Casts, budget %s after %d evaluations", len(best.pins),
             report.casts_inserted, "met" if fid["ok"] else "NOT met", probe.evaluations)
    return best.model, report


def _activation_stats(fp32_model: Any, graph_sha256: str, calib_tokens: Any, heldout_tokens: Any,
                      input_names: list[str], cache_dir: str | None, settings: PrecisionSettings, vocab_size: int,
                      seed: int, batch_size: int) -> dict[str, Any]:
    """{"real": ActivationStats, "random": ActivationStats} of the FP32 graph (step 1), reduced in
    the graph (`compiler.passes.reduced_stats`), `batch_size` equal-length samples a run: real
    over the calibration text; random over the random-id set at the held-out samples' lengths
    (the first `settings.random_samples`), the set verify measures its random-id fidelity on,
    so that verify reads the FP32 outputs of this pass back (`cached_reduced_stats`)."""
    tokens = {"real": calib_tokens, "random": heldout_tokens}
    args = {src: (fp32_model, graph_sha256, tokens[src], input_names, cache_dir) for src in tokens}
    kw = {src: {"batch_size": batch_size, "percentile": settings.percentile, "vocab_size": vocab_size,
                "seed": seed, "limit": settings.random_samples if src == "random" else None}
          for src in ("real", "random")}
    if isinstance(fp32_model, (str, os.PathLike)) and cache_dir:
        _stats_in_child(args, kw)  # fills the cache; read back below
    return {src: cached_reduced_stats(*args[src], src, **kw[src]) for src in ("real", "random")}


def _add_sensitive_nodes(evaluate: Evaluator, current: Variant, fp32_model: Any, fp32_path: Any,
                         batches: list[tuple[dict, np.ndarray]], max_steps: int,
                         steps: list[dict[str, Any]]) -> tuple[Variant, list[str]]:
    """Step 4: while the budget fails, move the most sensitive FP16 node to FP32.

    Returns:
        (the last variant measured, the names moved in order); each step is appended to `steps`.
    """
    added: list[str] = []
    while not current.fidelity["ok"] and len(added) < max_steps:
        candidates = {n.name for n in fp32_model.graph.node if n.name not in current.pins}
        scores = node_sensitivity(fp32_model, current.model, batches, candidates, fp32_path)
        if not scores:
            break
        name = max(scores, key=scores.get)
        added.append(name)
        current = evaluate({**current.pins, name: ("sensitivity", f"adds relative error {scores[name]:.4g} in FP16")})
        steps.append({"action": f"to FP32: {name}", "score": scores[name], "fp32_nodes": len(current.pins),
                      **current.fidelity})
    return current, added


def _try_fp16_again(evaluate: Evaluator, current: Variant, names: list[str],
                    steps: list[dict[str, Any]]) -> Variant:
    """Step 5: each of `names` still in FP32 goes back to FP16 when the budget still holds."""
    for name in names:
        if name not in current.pins:
            continue
        trial = evaluate({k: v for k, v in current.pins.items() if k != name})
        steps.append({"action": f"try FP16: {name}", "kept": trial.fidelity["ok"], "fp32_nodes": len(trial.pins),
                      **trial.fidelity})
        if trial.fidelity["ok"]:
            current = trial
    return current


def _op_rule_nodes(fp32_model: Any) -> set[str]:
    """Names of the nodes the hybrid op-type rules (layer norm, softmax, reduction) pin."""
    nodes = list(fp32_model.graph.node)
    consumers = tensor_consumers(nodes)
    return {nodes[i].name for rule in HYBRID_RULES for i in rule(nodes, consumers)}


def _collect_both(args: dict, kw: dict) -> None:
    with StatsSessions() as sessions:  # one statistics session for both sets
        for src in ("real", "random"):
            cached_reduced_stats(*args[src], src, **kw[src], sessions=sessions)


def _stats_in_child(args: dict, kw: dict) -> None:
    """Collect the real and random statistics into the cache in a child process: the statistics
    session holds its own copy of the weights (1.3 GB for BERT-large), which the child returns
    to the OS when it exits, before the search loads the graph.
    """
    run_in_child(_collect_both, args, kw, what="activation statistics")


def _stats_summary(stats: Any, margin: float) -> dict[str, Any]:
    finite = {t: s for t, s in stats.tensors.items() if s.absmax < MASK_FILL_MIN}
    top = sorted(finite.items(), key=lambda kv: -kv[1].absmax)[:5]
    return {"samples": stats.samples, "tensors": len(stats.tensors), "percentile": stats.percentile,
            "over_fp16_max": sum(s.absmax * margin >= FP16_MAX for s in finite.values()),
            "largest": [{"tensor": t, "absmax": s.absmax, "percentile": s.percentile} for t, s in top]}
