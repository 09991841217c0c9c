"""compiler/passes/precision_rules.py: each rule on node lists whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from compiler.graph.analysis import tensor_consumers
from compiler.passes.precision_rules import (constant_absmax, rule_fp16_range, rule_layer_norm, rule_reduction,
                                             rule_softmax)


def node(op, inputs, outputs, **kw):
    return helper.make_node(op, inputs, outputs, **kw)


def layer_norm_chain(affine_readers: int = 1):
    """x -> ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(gamma) -> Add(beta)."""
    nodes = [node("ReduceMean", ["x"], ["mean"]), node("Sub", ["x", "mean"], ["d"]),
             node("Pow", ["d", "two"], ["sq"]), node("ReduceMean", ["sq"], ["var"]),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["std"]),
             node("Div", ["d", "std"], ["n"]), node("Mul", ["n", "gamma"], ["g"]),
             node("Add", ["g", "beta"], ["y"])]
    nodes += [node("Relu", ["n"], [f"r{k}"]) for k in range(affine_readers - 1)]
    return nodes


def test_decomposed_layer_norm_with_and_without_affine():
    nodes = layer_norm_chain()
    pins = rule_layer_norm(nodes, tensor_consumers(nodes))
    assert sorted(pins) == list(range(9))  # the chain and its gamma / beta
    assert {why[0] for why in pins.values()} == {"layer-norm"}
    # the normalized tensor has a second reader: the affine Mul is not part of the norm
    nodes = layer_norm_chain(affine_readers=2)
    assert sorted(rule_layer_norm(nodes, tensor_consumers(nodes))) == list(range(7))
    # Sub(mean, x) is not x - mean: no layer norm, but d / sqrt(mean(d^2) + eps) is d's RMS norm
    nodes = layer_norm_chain()
    nodes[1] = node("Sub", ["mean", "x"], ["d"])
    pins = rule_layer_norm(nodes, tensor_consumers(nodes))
    assert sorted(pins) == [2, 3, 4, 5, 6, 7] and all("RMS" in why[1] for why in pins.values())


def test_softmax_ops_and_decomposed_softmax():
    nodes = [node("Softmax", ["a"], ["p"]), node("Exp", ["b"], ["e"]), node("ReduceSum", ["e"], ["s"]),
             node("Div", ["e", "s"], ["q"]), node("Exp", ["c"], ["lonely"]), node("Relu", ["lonely"], ["r"])]
    pins = rule_softmax(nodes, tensor_consumers(nodes))
    assert sorted(pins) == [0, 1, 2, 3]  # the Exp without ReduceSum and Div is not a softmax
    assert pins[0][1] == "Softmax exponentiates and normalizes over a row"
    assert pins[2][1] == "decomposed softmax: Exp -> ReduceSum -> Div"


def test_reduction_rule_is_by_op_type():
    nodes = [node("ReduceSum", ["a"], ["b"]), node("ReduceMax", ["b"], ["c"]), node("CumSum", ["c", "ax"], ["d"])]
    assert rule_reduction(nodes, {}) == {0: ("reduction", "ReduceSum accumulates over a whole axis"),
                                         2: ("reduction", "CumSum accumulates over a whole axis")}  # max adds nothing


def test_fp16_range_ignores_mask_fill_values():
    big = numpy_helper.from_array(np.array([1.0, -70000.0, -3.4e38], np.float32), "big")
    fill = numpy_helper.from_array(np.array([0.0, -3.4e38], np.float32), "fill")
    ints = numpy_helper.from_array(np.array([100000], np.int64), "ints")
    nodes = [node("Add", ["x", "big"], ["y"]), node("Add", ["y", "fill"], ["z"]), node("Reshape", ["z", "ints"], ["w"])]
    pins, out_of_range = rule_fp16_range(nodes, {"big": big, "fill": fill, "ints": ints})
    assert pins == {0: ("fp16-range", "constant big holds |v| = 7e+04 > 65504")}
    assert out_of_range == {"big": nodes[0].name}
    assert constant_absmax(big) == np.float64(np.float32(3.4e38))  # every value counts without `below`
    assert constant_absmax(big, below=1e30) == 70000.0 and constant_absmax(fill, below=1e30) == 0.0


def test_constant_absmax_fast_path_agrees_with_the_filtered_one():
    rng = np.random.default_rng(0)
    for values in (rng.normal(0, 3, 1000), -np.abs(rng.normal(0, 3, 1000)), np.array([np.nan, 2.0, -5.0]),
                   np.array([np.inf, -7.0]), np.array([2e30, -9.0]), np.zeros(0)):
        t = numpy_helper.from_array(values.astype(np.float32), "w")
        v = np.abs(values.astype(np.float32).astype(np.float64))
        v = v[np.isfinite(v) & (v < 1e30)]
        assert constant_absmax(t, below=1e30) == (float(v.max()) if v.size else 0.0)


def rms_norm_chain(form: str):
    """Cast(x) -> x^2 -> ReduceMean -> Add(eps) -> Sqrt -> normalize -> Cast -> Mul(gamma), as
    PyTorch exports Llama's / T5's RMS norm (`form`: how x is squared and divided)."""
    square = node("Mul", ["x", "x"], ["sq"]) if form == "mul" else node("Pow", ["x", "two"], ["sq"])
    nodes = [node("Cast", ["h"], ["x"], to=1), square, node("ReduceMean", ["sq"], ["var"]),
             node("Add", ["var", "eps"], ["ve"]), node("Sqrt", ["ve"], ["std"])]
    if form == "div":
        nodes += [node("Div", ["x", "std"], ["n"])]
    else:
        inverse = node("Reciprocal", ["std"], ["inv"]) if form == "reciprocal" else node("Div", ["one", "std"], ["inv"])
        nodes += [inverse, node("Mul", ["x", "inv"], ["n"])]
    return nodes + [node("Cast", ["n"], ["c"], to=1), node("Mul", ["gamma", "c"], ["y"]),
                    node("MatMul", ["y", "w"], ["o"])]


def test_decomposed_rms_norm_in_its_exported_forms():
    for form in ("rsqrt", "reciprocal", "mul", "div"):
        nodes = rms_norm_chain(form)
        pins = rule_layer_norm(nodes, tensor_consumers(nodes))
        # from the square to gamma's Mul; not the Cast into it, not the MatMul after it
        assert sorted(pins) == list(range(1, len(nodes) - 1)), form
        assert {why[1] for why in pins.values()} == {"decomposed RMS norm: Pow/ReduceMean/Add/Sqrt/Div/Mul"}
    nodes = rms_norm_chain("rsqrt")
    nodes[6] = node("Mul", ["h", "inv"], ["n"])  # scales another tensor than the one squared: no norm
    assert rule_layer_norm(nodes, tensor_consumers(nodes)) == {}
    nodes = rms_norm_chain("rsqrt")[:4] + [node("Relu", ["ve"], ["std"])]  # no Sqrt: a plain mean of squares
    assert rule_layer_norm(nodes, tensor_consumers(nodes)) == {}


def _LastHidden(module):  # noqa: N802 - a class made here: torch is imported inside the test
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, input_ids, attention_mask):
            return self.module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    return LastHidden()


@pytest.mark.filterwarnings("ignore")  # the exporter's TracerWarnings on the mask arithmetic
def test_hybrid_keeps_a_llama_whose_residual_stream_passes_256_where_fp16_squares_overflow(tmp_path):
    """A Llama's RMS norm squares its input: past |x| = 256 the FP16 square is inf, the norm 0,
    and the output unrelated to FP32's (cosine ~0 on the FP16 reference, no NaN to stop it).
    The decomposed RMS norm rule keeps the square in FP32 with the mean."""
    import onnx
    import torch
    import transformers

    from compiler.eval.fp16_reference import fp16_emulation, session
    from compiler.passes.precision import convert_precision
    from compiler.settings import PrecisionSettings
    from tests.models import ort_run

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    module = transformers.LlamaModel(config).eval()
    with torch.no_grad():
        module.embed_tokens.weight.normal_(0, 300.0)  # embeddings past 256, as a real Llama's outliers
    ids = torch.randint(0, 500, (2, 12))
    path = tmp_path / "llama.onnx"
    wrapper = _LastHidden(module)
    mask = torch.ones_like(ids)
    torch.onnx.export(wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], output_names=["h"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    fp32 = onnx.load(str(path))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    ref = ort_run(fp32, feeds)[0].reshape(-1, 32)

    def cosine(mode: str) -> float:
        variant, report = convert_precision(fp32, PrecisionSettings(mode=mode))
        got = session(fp16_emulation(variant), True).run(None, feeds)[0].reshape(-1, 32)
        return float(np.min(np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / (np.linalg.norm(got, axis=1) + 1e-30)))

    assert cosine("hybrid") > 0.9999
    assert cosine("fp16") < 0.5  # the hazard is there: the squares overflow (the output is all zeros)


def rotary_graph(positions: str = "position_ids"):
    """position_ids (1, S) int64 -> Cast -> Unsqueeze -> Mul(inv_freq) -> Concat -> Cos, Sin ->
    Cos + Sin: Llama's rotary angles as PyTorch exports them, and an output that reads both."""
    from onnx import TensorProto

    from tests.models import f32, make_model

    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    nodes = [node("Cast", [positions], ["p"], to=TensorProto.FLOAT),
             node("Unsqueeze", ["p", "axis"], ["pu"]), node("Mul", ["pu", "inv_freq"], ["freqs"]),
             node("Concat", ["freqs", "freqs"], ["emb"], axis=-1), node("Cos", ["emb"], ["cos"]),
             node("Sin", ["emb"], ["sin"]), node("Add", ["cos", "sin"], ["out"])]
    for k, n in enumerate(nodes):
        n.name = f"{n.op_type}_{k}"  # as exports name them: `auto` pins by name
    inp = helper.make_tensor_value_info(positions, TensorProto.INT64, ["b", "s"])
    return make_model(nodes, [inp], [f32("out", ["b", "s", 16])],
                      {"inv_freq": inv_freq, "axis": np.array([-1], np.int64)})


def test_position_angles_stay_fp32_and_only_them():
    from compiler.passes.precision_rules import rule_position_angles

    nodes = list(rotary_graph().graph.node)
    pins = rule_position_angles(nodes, tensor_consumers(nodes))
    assert sorted(nodes[j].op_type for j in pins) == ["Cast", "Concat", "Cos", "Mul", "Sin", "Unsqueeze"]
    # a Cos of an activation (here behind a layer norm) is not a position angle: nothing pinned
    nodes[2] = node("LayerNormalization", ["pu", "g", "b"], ["freqs"])
    assert rule_position_angles(nodes, tensor_consumers(nodes)) == {}


def test_hybrid_keeps_rotary_angles_exact_at_long_positions():
    """At position 3000 FP16's spacing is 2: cos/sin of the fastest pair were of the wrong angle."""
    from compiler.eval.fp16_reference import fp16_emulation, session
    from compiler.passes.precision import convert_precision
    from compiler.settings import PrecisionSettings
    from tests.models import ort_run

    model = rotary_graph()
    feeds = {"position_ids": np.arange(2990, 3010, dtype=np.int64)[None]}
    ref = ort_run(model, feeds)[0]

    def max_error(mode: str) -> float:
        variant, _ = convert_precision(model, PrecisionSettings(mode=mode))
        return float(np.abs(session(fp16_emulation(variant), True).run(None, feeds)[0] - ref).max())

    assert max_error("hybrid") < 2e-3  # cos + sin rounded to FP16 once, at the island's border
    assert max_error("fp16") > 0.5


def test_auto_starts_with_the_position_angles_in_fp32():
    """The held-out text (<= 128 tokens) cannot show an angle's error at the profile's longest
    sequence: `auto` keeps them FP32 from the start and never tries them back."""
    from calibration import TokenizedSet
    from compiler.passes.auto_precision import auto_precision
    from compiler.settings import PrecisionSettings

    model = rotary_graph("input_ids")  # the positions, fed where the statistics pass feeds ids
    rows = lambda seed: TokenizedSet([np.arange(8, dtype=np.int64) + seed] * 4, None, 0, f"t{seed}")  # noqa: E731
    _, report = auto_precision(model, PrecisionSettings(mode="auto"), rows(0), rows(1), ["input_ids"], ["out"],
                               2, 100, "rotary", None)
    pinned = {p.name: p.rule for p in report.fp32_nodes}
    assert sorted(pinned.values()) == ["position-angle"] * 6, pinned
