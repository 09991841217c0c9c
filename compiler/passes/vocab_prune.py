"""Vocabulary pruning: keep only the word-embedding rows a deployment's text uses.

The ERNIE inference work we build on paired FP16 and fused kernels with embedding-layer pruning:
in a small encoder the word embeddings are a large share of the weights (MiniLM: 30,522 x 384 =
11.7 M of 22.7 M parameters; BERT-base: 23.4 M of 110 M), while one domain's text uses a
fraction of the vocabulary.

The remap contract: the pruned graph still takes the ORIGINAL tokenizer's ids, int64 (batch,
sequence), so a deployment keeps its tokenizer. An int32 initializer `<table>_remap` of shape
(V,) maps each original id to its row of the smaller table (ids not kept -> the row of `unk_id`),
and a `Gather(remap, ids)` node in front of the embedding Gather applies it. For ids that are all
kept the outputs are those of the unpruned graph, bit for bit; a dropped id behaves exactly as
`unk_id` did before. Ids outside [0, V) are the model's problem, as they were before pruning.

A table that also feeds an output head (GPT-2 style tied embeddings: MatMul of the hidden states
with the table transposed) is refused unless asked for: pruning then also removes the dropped
tokens from the logits, which then cover the kept tokens only, in kept (ascending id) order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.errors import CompilerError
from compiler.graph.analysis import array, attr, tensor_consumers

# ops allowed between the ids input and the embedding Gather: they keep the id values (GPT-2's
# `input_ids.view(-1, seq)` exports as a Reshape)
PASS_THROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")
FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass
class VocabReport:
    """What `prune_vocabulary` did.

    Attributes:
        vocab_size: V, rows of the original table (the remap's length).
        kept: K, rows of the pruned table.
        unk_id: original id that dropped ids map to.
        embedding: name of the table initializer. gather: name of the embedding Gather node.
        hidden: H, the table's row width.
        embedding_params_before: V * H. embedding_params_after: K * H + V (table and int32 remap).
        model_params_before, model_params_after: elements of every initializer of the graph.
        tied: the table also fed an output head, which now covers the kept tokens only.
        head_nodes: names of the head nodes shrunk with it (empty unless `tied`).
    """

    vocab_size: int
    kept: int
    unk_id: int
    embedding: str
    gather: str
    hidden: int
    embedding_params_before: int
    embedding_params_after: int
    model_params_before: int
    model_params_after: int
    tied: bool
    head_nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        return dataclasses.asdict(self)


def model_params(model: Any) -> int:
    """Elements of every initializer of `model` (from their dims; no data is read)."""
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer))


def find_word_embedding(model: Any, input_name: str = "input_ids") -> tuple[int, str]:
    """The word-embedding Gather of `model`: (node index, table initializer name).

    It is the Gather (axis 0) whose indices come from graph input `input_name`, directly or
    through nodes that keep the id values (`PASS_THROUGH`: Cast, Identity, Reshape, ...), and
    whose data is a float initializer of rank 2, [V, H].

    Raises:
        CompilerError: `input_name` is no graph input; the table is the output of a
            DequantizeLinear (Q/DQ'd: prune before INT8 quantization) or of another node; no
            such Gather, or more than one.
    """
    g = model.graph
    inputs = [v.name for v in g.input]
    if input_name not in inputs:
        raise CompilerError(f"vocabulary pruning: no graph input {input_name!r}; inputs: {inputs}")
    ids = {input_name}
    for n in g.node:  # nodes are topologically sorted: one pass follows the chain
        if n.op_type in PASS_THROUGH and n.input[0] in ids:
            ids.update(n.output)
    inits = {t.name: t for t in g.initializer}
    producer = {t: n for n in g.node for t in n.output}
    found, seen = [], []
    for i, n in enumerate(g.node):
        if n.op_type != "Gather" or n.input[1] not in ids:
            continue
        seen.append(n.name)
        table = inits.get(n.input[0])
        made_by = producer.get(n.input[0])
        if made_by is not None and made_by.op_type == "DequantizeLinear":
            raise CompilerError(
                f"vocabulary pruning: the embedding table of Gather {n.name!r} is Q/DQ'd "
                f"(DequantizeLinear {made_by.name!r}); prune the vocabulary before INT8 quantization")
        if table is not None and table.data_type in FLOAT_TYPES and len(table.dims) == 2 and attr(n, "axis") == 0:
            found.append((i, table.name))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[g.node[i].name for i, _ in found]})"
        raise CompilerError(
            f"vocabulary pruning: found {what} word-embedding Gather: looked for a Gather (axis 0) of a "
            f"float [V, H] initializer indexed by graph input {input_name!r} (directly or through "
            f"{'/'.join(PASS_THROUGH)}). Gathers reading those ids: {seen}; graph inputs: {inputs}. "
            "Name the ids input (input_name) or prune before other rewrites.")
    return found[0]


def _is_head(node: Any, tensor: str, layout: str) -> bool:
    """`node` multiplies hidden states by `tensor`, the table as [V, H] ("VH") or [H, V] ("HV")."""
    if len(node.input) < 2 or node.input[1] != tensor or node.input[0] == tensor:
        return False
    if node.op_type == "MatMul":
        return layout == "HV"
    return node.op_type == "Gemm" and not attr(node, "transA") and bool(attr(node, "transB")) == (layout == "VH")


def _table_uses(model: Any, table: str, gather: int) -> list[tuple[int, str, str]]:
    """Every node other than `gather` that reads the table: (node index, tensor read, layout).

    The table is read directly ("VH"), through a Transpose ("HV"; the Transpose itself is listed
    with layout "T"), or through an initializer that holds an exact copy of it or of its
    transpose (a constant-folded tied head).
    """
    g = model.graph
    nodes = list(g.node)
    consumers = tensor_consumers(nodes)
    values = array(next(t for t in g.initializer if t.name == table))
    holders = [(table, "VH")]
    for t in g.initializer:
        if t.name != table and t.data_type in FLOAT_TYPES and sorted(t.dims) == sorted(values.shape):
            copy = array(t)
            if copy.shape == values.shape and np.array_equal(copy, values):
                holders.append((t.name, "VH"))
            elif copy.shape == values.T.shape and np.array_equal(copy, values.T):
                holders.append((t.name, "HV"))
    uses = []
    for tensor, layout in holders:
        for i in consumers.get(tensor, []):
            n = nodes[i]
            if i == gather:
                continue
            perm = [a.ints for a in n.attribute if a.name == "perm"]
            if n.op_type == "Transpose" and (not perm or list(perm[0]) == [1, 0]):
                flipped = "HV" if layout == "VH" else "VH"
                uses.append((i, tensor, "T"))
                uses += [(j, n.output[0], flipped) for j in consumers.get(n.output[0], [])]
            else:
                uses.append((i, tensor, layout))
    return uses


def _shrink_head(g: Any, uses: list[tuple[int, str, str]], table: str, kept: np.ndarray) -> list[str]:
    """Slice the copies of the table and the head biases to the kept ids; return the head nodes.

    Raises:
        CompilerError: a use is neither a Transpose of the table nor a MatMul/Gemm head.
    """
    nodes = list(g.node)
    inits = {t.name: t for t in g.initializer}
    consumers = tensor_consumers(nodes)
    vocab = int(inits[table].dims[0])
    sliced: dict[str, int] = {}  # initializer -> axis of the vocabulary
    heads = []
    for i, tensor, layout in uses:
        n = nodes[i]
        if layout == "T":  # the Transpose of the table: its consumers are checked as uses
            continue
        if not _is_head(n, tensor, layout):
            raise CompilerError(
                f"vocabulary pruning: the embedding table {table!r} also feeds {n.op_type} {n.name!r}, which "
                "is no MatMul/Gemm output head; this graph's vocabulary cannot be pruned consistently")
        heads.append(n.name)
        if tensor in inits and tensor != table:
            sliced[tensor] = 0 if layout == "VH" else 1
        biases = [n.input[2]] if n.op_type == "Gemm" and len(n.input) > 2 else []
        biases += [m.input[1 - list(m.input).index(n.output[0])] for m in (nodes[j] for j in consumers.get(n.output[0], []))
                   if m.op_type == "Add"]
        sliced.update({b: -1 for b in biases if b in inits and inits[b].dims and inits[b].dims[-1] == vocab})
    from onnx import numpy_helper

    for name, axis in sliced.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.take(array(inits[name]), kept, axis=axis), name))
    return heads


def _fix_vocab_dims(g: Any, vocab: int, kept: int) -> None:
    """Graph outputs whose last dim is `vocab` now have `kept`; inferred value_info naming
    `vocab` is dropped (shape inference recomputes it)."""
    for v in g.output:
        dims = v.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value == vocab:
            dims[-1].dim_value = kept
    stale = [v for v in g.value_info if any(d.dim_value == vocab for d in v.type.tensor_type.shape.dim)]
    for v in stale:
        g.value_info.remove(v)


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out


def _checked_ids(kept_ids: np.ndarray, unk_id: int, vocab: int) -> np.ndarray:
    kept = np.unique(np.asarray(kept_ids).astype(np.int64).ravel())
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= vocab:
        raise ValueError(f"kept ids must be a non-empty set within [0, {vocab}) (the table's rows); "
                         f"got {kept.size} ids in [{kept.min(initial=0)}, {kept.max(initial=0)}]")
    if not np.isin(unk_id, kept):
        raise ValueError(f"unk_id {unk_id} is not among the kept ids: dropped ids would have no row to map "
                         "to; keep the special tokens (calibration.vocabulary.special_token_ids)")
    return kept


def prune_vocabulary(model: Any, kept_ids: np.ndarray, unk_id: int, input_name: str = "input_ids",
                     allow_tied: bool = False) -> tuple[Any, VocabReport]:
    """Shrink the word-embedding table to `kept_ids`, with an int32 id remap in front of it.

    Finds the word-embedding Gather (`find_word_embedding`), replaces its [V, H] table by the
    rows `kept_ids` in ascending id order, adds the int32 initializer `<table>_remap` (V,) that
    maps each original id to its new row (ids not kept -> the row of `unk_id`), and inserts
    `Gather(<table>_remap, ids)` in front of the embedding Gather. Graph inputs (int64 (batch,
    sequence) original ids) and outputs and every other node stay as they were. Ids outside
    [0, V) at run time are the model's problem, as before pruning.

    Args:
        model: an onnx.ModelProto with its weights loaded; not modified.
        kept_ids: ids to keep (any int array; sorted and de-duplicated here), within [0, V).
        unk_id: the id dropped ids become (the tokenizer's unknown token); must be kept.
        input_name: the graph input that carries the token ids. Defaults to "input_ids".
        allow_tied: accept a table that also feeds an output head (MatMul/Gemm with the table
            transposed, GPT-2 style; CLI `--vocab-tied`): the head is shrunk with it, so its logits
            cover the kept tokens only, in kept order. Defaults to False (refuse).

    Returns:
        (pruned model, VocabReport).

    Raises:
        ValueError: `unk_id` is not kept, or kept ids are empty or outside [0, V).
        CompilerError: no word-embedding Gather (see `find_word_embedding`); the table also feeds
            an output head and `allow_tied` is False; or it feeds a node that is no head.
    """
    import onnx
    from onnx import helper, numpy_helper

    before = model_params(model)
    gather_index, table = find_word_embedding(model, input_name)
    uses = _table_uses(model, table, gather_index)
    gather = model.graph.node[gather_index]
    if uses and not allow_tied:
        names = sorted({f"{model.graph.node[i].op_type} {model.graph.node[i].name!r}" for i, _, _ in uses})
        raise CompilerError(
            f"vocabulary pruning: the embedding table {table!r} of Gather {gather.name!r} also feeds {names} "
            "(tied input and output embeddings): pruning would also remove the dropped tokens from the "
            "logits. Pass allow_tied (CLI --vocab-tied) to accept that.")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    init = next(t for t in g.initializer if t.name == table)
    values = array(init)
    vocab, hidden = values.shape
    kept = _checked_ids(kept_ids, unk_id, vocab)
    remap = np.full(vocab, int(np.searchsorted(kept, unk_id)), dtype=np.int32)
    remap[kept] = np.arange(kept.size, dtype=np.int32)
    heads = _shrink_head(g, uses, table, kept) if uses else []
    init.CopyFrom(numpy_helper.from_array(values[kept], table))
    taken = {t for n in g.node for t in [*n.input, *n.output]} | {t.name for t in g.initializer} | {v.name for v in g.input}
    remap_name = _unique(f"{table}_remap", taken)
    remapped = _unique(f"{table}_remapped_ids", taken | {remap_name})
    g.initializer.append(numpy_helper.from_array(remap, remap_name))
    node = helper.make_node("Gather", [remap_name, gather.input[1]], [remapped], axis=0,
                            name=_unique(f"{gather.name or table}_vocab_remap", {n.name for n in g.node}))
    g.node[gather_index].input[1] = remapped
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes[:gather_index] + [node] + nodes[gather_index:])
    if heads:
        _fix_vocab_dims(g, vocab, kept.size)
    return out, VocabReport(
        vocab_size=int(vocab), kept=int(kept.size), unk_id=int(unk_id), embedding=table, gather=gather.name,
        hidden=int(hidden), embedding_params_before=int(vocab * hidden),
        embedding_params_after=int(kept.size * hidden + vocab), model_params_before=before,
        model_params_after=model_params(out), tied=bool(heads), head_nodes=heads)
