"""2:4 structured sparsity in an ONNX graph: which MatMul/Gemm weights have the pattern.

2:4 ("two of four") sparsity means at least 2 zeros in every group of 4 consecutive weights
along a GEMM's reduction dimension K. NVIDIA's sparse tensor cores (Ampere and later) skip the
zeros, up to twice the math throughput of the dense GEMM (Mishra et al. 2021, "Accelerating
Sparse Deep Neural Networks", arXiv:2104.08378). TensorRT uses sparse kernels only when
`BuilderFlag.SPARSE_WEIGHTS` is set and a constant weight already has the pattern.

`check_2_4` reads the graph (after export, FP16 conversion or INT8 Q/DQ) and says which GEMM
weights TensorRT can run sparse and what share of the MACs they carry; `require_2_4` turns a
lost pattern into a `CompilerError`. Only numpy and onnx: the builder uses it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from compiler.errors import CompilerError
from compiler.graph.analysis import GEMM_OPS, matmul_macs
from compiler.graph.modules import module_for_node

GROUP = 4  # consecutive weights along K per group
KEEP = 2  # nonzeros allowed per group (so at least GROUP - KEEP zeros)
PASS_THROUGH = ("Cast", "DequantizeLinear", "Identity")  # ops between a weight and its GEMM that keep zeros


@dataclass
class GemmSparsity:
    """One MatMul/Gemm with a constant weight.

    Attributes:
        node: node name. module: the PyTorch module it came from (exporter naming) or "".
        weight: the initializer holding the values checked (INT8 for Q/DQ graphs).
        shape: the initializer's shape. axis: its axis that the GEMM reduces over (K).
        eligible: K % 4 == 0 and every group of 4 along K has >= 2 exact zeros.
        macs: multiply-accumulates at the check's mac_shape.
        reason: why not eligible ("" when eligible).
    """

    node: str
    module: str
    weight: str
    shape: list[int]
    axis: int
    eligible: bool
    macs: int
    reason: str = ""


@dataclass
class SparsityCheck:
    """2:4 eligibility of a graph's GEMMs (what `BuilderFlag.SPARSE_WEIGHTS` can use).

    Attributes:
        gemms: one entry per MatMul/Gemm with a constant weight, graph order.
        eligible / ineligible: counts over `gemms`.
        activation_matmuls: MatMul/Gemm without a constant weight (attention's batched matmuls),
            never sparse.
        total_macs / eligible_macs: over every MatMul/Gemm at `mac_shape` (batch, sequence).
        sparse_mac_fraction: eligible_macs / total_macs.
        has_eligible: at least one eligible GEMM.
    """

    gemms: list[GemmSparsity] = field(default_factory=list)
    eligible: int = 0
    ineligible: int = 0
    activation_matmuls: int = 0
    total_macs: int = 0
    eligible_macs: int = 0
    sparse_mac_fraction: float = 0.0
    has_eligible: bool = False
    mac_shape: tuple[int, int] = (1, 128)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparse_mac_fraction"] = round(self.sparse_mac_fraction, 4)
        d["mac_shape"] = {"batch": self.mac_shape[0], "sequence": self.mac_shape[1]}
        return d

    def by_node(self) -> dict[str, GemmSparsity]:
        return {g.node: g for g in self.gemms}


def _constants(model: Any) -> dict[str, Any]:
    """{name: TensorProto} of the initializers and Constant nodes' values."""
    found = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            found[n.output[0]] = n.attribute[0].t
    return found


def _trace(tensor: str, consts: dict[str, Any], producer: dict[str, Any]) -> tuple[str, list[list[int] | None]] | None:
    """(constant name, Transpose perms from the GEMM back to it) when `tensor` is a weight."""
    perms: list[list[int] | None] = []
    while tensor not in consts:
        p = producer.get(tensor)
        if p is None or p.op_type not in (*PASS_THROUGH, "Transpose"):
            return None
        if p.op_type == "Transpose":
            perms.append(next((list(a.ints) for a in p.attribute if a.name == "perm"), None))
        tensor = p.input[0]
    return tensor, perms


def _reduction_axis(node: Any, k: int, rank: int) -> int:
    """Axis of input `k` (rank `rank`) of MatMul/Gemm `node` that is reduced over."""
    if node.op_type == "Gemm":
        trans = next((a.i for a in node.attribute if a.name == ("transB" if k else "transA")), 0)
        return (1 if trans else 0) if k else (0 if trans else 1)
    if k == 1:
        return rank - 2 if rank >= 2 else 0  # B (..., K, N)
    return rank - 1  # A (..., M, K)


def groups_check(w: np.ndarray, axis: int) -> str:
    """Whether array `w` has the 2:4 pattern along `axis`: "" when it has, else the reason.

    Args:
        w: a weight of any rank (any dtype; 0 is a zero weight).
        axis: the reduction axis K; groups are the 4 consecutive values w[..., 4g:4g+4, ...].

    Returns:
        "" when K % 4 == 0 and every group holds >= 2 exact zeros; else `K=<k> not a multiple
        of 4`, or how many groups have fewer than 2 zeros and the index of the first one's start.
    """
    k = w.shape[axis]
    if k % GROUP:
        return f"K={k} not a multiple of {GROUP}"
    moved = np.moveaxis(w, axis, -1)
    zeros = (moved.reshape(*moved.shape[:-1], k // GROUP, GROUP) == 0).sum(-1)  # (..., K/4)
    bad = zeros < GROUP - KEEP
    if not bad.any():
        return ""
    first = [int(i) for i in np.argwhere(bad)[0]]
    index = first[:-1]
    index.insert(axis, first[-1] * GROUP)
    return (f"{int(bad.sum())} of {bad.size} groups have fewer than {GROUP - KEEP} zeros; "
            f"first at index {tuple(index)} (the group of {GROUP} along axis {axis} starting there)")


def check_2_4(model: Any, mac_shape: tuple[int, int] = (1, 128)) -> SparsityCheck:
    """Which MatMul/Gemm weights of an ONNX graph have the 2:4 pattern TensorRT can use.

    A weight is a constant (initializer or Constant node), possibly through DequantizeLinear
    (INT8 Q/DQ graphs: the INT8 values are checked, 0 meaning a zero weight), Cast (FP16
    graphs), Identity and Transpose (the reduction axis is mapped back through `perm`). The
    reduction axis K: MatMul A.B with constant B (..., K, N) reduces axis -2 of B, with constant
    A axis -1 of A; Gemm reduces B over axis 0 (1 when transB=1) and A over axis 1 (0 when
    transA=1). Eligible: K % 4 == 0 and every 4 consecutive values along K hold >= 2 exact zeros.

    Args:
        model: onnx.ModelProto with its weights loaded, or a path to one.
        mac_shape: (batch, sequence) at which MACs are counted (`compiler.graph.analysis.matmul_macs`).

    Returns:
        SparsityCheck (per GEMM and aggregate; `to_dict()` for JSON).

    Raises:
        compiler.errors.PrecisionError: a MatMul/Gemm whose shapes cannot be resolved at
            `mac_shape`.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    nodes = list(model.graph.node)
    consts = _constants(model)
    producer = {o: n for n in nodes for o in n.output}
    macs = matmul_macs(model, nodes, tuple(mac_shape))
    check = SparsityCheck(mac_shape=macs.shape)  # shorter where the model has fewer positions
    arrays: dict[str, np.ndarray] = {}
    for i, n in enumerate(nodes):
        if n.op_type not in GEMM_OPS:
            continue
        check.total_macs += macs[i]
        traced = {k: _trace(n.input[k], consts, producer) for k in (1, 0)}
        k = 1 if traced[1] is not None else 0 if traced[0] is not None else None
        if k is None:
            check.activation_matmuls += 1
            continue
        name, perms = traced[k]
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(consts[name])
        w = arrays[name]
        axis = _reduction_axis(n, k, w.ndim)
        for perm in perms:  # from the GEMM back towards the constant: output axis a <- input perm[a]
            axis = perm[axis] if perm is not None else w.ndim - 1 - axis
        reason = groups_check(w, axis)
        check.gemms.append(GemmSparsity(n.name, module_for_node(n.name), name, list(w.shape), axis,
                                        not reason, macs[i], reason))
        if not reason:
            check.eligible_macs += macs[i]
    check.eligible = sum(g.eligible for g in check.gemms)
    check.ineligible = len(check.gemms) - check.eligible
    check.has_eligible = check.eligible > 0
    check.sparse_mac_fraction = check.eligible_macs / check.total_macs if check.total_macs else 0.0
    return check


def require_2_4(model: Any, names: Iterable[str] | None = None,
                mac_shape: tuple[int, int] = (1, 128)) -> SparsityCheck:
    """`check_2_4`, raising when a GEMM that should be sparse is not.

    Args:
        model: onnx.ModelProto (weights loaded) or a path.
        names: PyTorch module names (`compiler.training.prune.SparsityPruneReport.pruned`) or
            ONNX node names of the GEMMs that must be eligible. None: at least one GEMM must be.

    Returns:
        the SparsityCheck, when every named GEMM is eligible.

    Raises:
        compiler.errors.CompilerError: naming each GEMM (module, node, weight) that lacks the
            pattern with its first bad group, each name no GEMM of the graph matches, and the fix.
    """
    check = check_2_4(model, mac_shape)
    problems = []
    if names is None:
        if not check.has_eligible:
            problems = [f"  {g.node} (weight {g.weight} {g.shape}): {g.reason}" for g in check.gemms[:8]]
            problems.insert(0, f"  none of the {len(check.gemms)} GEMMs with a constant weight is 2:4 sparse")
    else:
        for want in dict.fromkeys(names):
            found = [g for g in check.gemms if want in (g.node, g.module)]
            if not found:
                problems.append(f"  {want}: no MatMul/Gemm with a constant weight in the graph comes from it")
            problems += [f"  {want} ({g.node}, weight {g.weight} {g.shape}, reduction axis {g.axis}): {g.reason}"
                         for g in found if not g.eligible]
    if problems:
        raise CompilerError(
            "2:4 sparsity lost: these GEMMs should have at least 2 zeros in every 4 weights along "
            "their reduction axis but do not:\n" + "\n".join(problems)
            + "\nPrune with compiler.training.prune.prune_2_4 (--sparsity 2:4) and change the weights after it "
            "only through a loop that holds the masks (compiler.training.prune.recover, or "
            "compiler.training.distill.distill with after_step=compiler.training.prune.hold_masks(masks, model)), "
            "then export again; or build dense (without --sparsity 2:4).")
    return check
