"""SparseGPT 2:4 pruning: the OBS mask choice and update of the kept weights, layer by layer.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (arXiv:2301.00774), Algorithm 1; the reference implementation is
github.com/IST-DASLab/sparsegpt (`SparseGPT.fasterprune`, `prunen=2, prunem=4`).

For a linear layer y = x W^T (W (out, in)) and calibration inputs X (tokens, in), pruning asks
for the W' with 2 zeros in every 4 consecutive inputs that minimizes ||X W^T - X W'^T||_F^2,
whose Hessian in each row of W is H = X^T X. SparseGPT walks the input columns left to right:
at the first column of each group of 4 it prunes, in every row, the 2 weights with the smallest
OBS saliency w^2 / [H^-1]_jj^2 (the upper Cholesky factor of H^-1, which holds the inverse
Hessians of the not-yet-visited columns), sets them to 0 and spreads each pruned weight's error
over the later columns of its row (the optimal brain surgeon update), in lazy blocks of
`blocksize` columns. Wanda (`compiler.training.prune`) is the special case of a diagonal H
without the update.

`sparsegpt_2_4` runs it on a whole model sequentially: the Hessian of each layer is measured on
the model whose earlier layers (in execution order) are already pruned, so that a layer
compensates for the errors of those before it; layers fed by the same input tensor (query, key
and value) share one Hessian and one pass. Each pass stops the forward once the layer's input
has been seen.

torch is imported when a function is called.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from compiler.graph.sparsity import GROUP, KEEP

BLOCK_SIZE = 128  # columns per lazy update block (the reference's default)
PERCENT_DAMP = 0.01  # H + lambda I, lambda = 1 % of the mean diagonal of H (the reference's default)


class _InputSeen(Exception):
    """Raised by a forward pre-hook to end a forward pass once the wanted input was recorded."""


def inverse_hessian_factor(hessian: Any, percdamp: float = PERCENT_DAMP) -> Any:
    """Upper Cholesky factor U of (H + lambda I)^-1, U^T U = (H + lambda I)^-1.

    Args:
        hessian: (in, in) float tensor X^T X (any positive scale: lambda is relative); a zero
            diagonal entry (an input never non-zero on the calibration text) is set to 1.
        percdamp: lambda as a share of the mean diagonal (SparseGPT's 1 %); multiplied by 10
            up to 4 times if the Cholesky factorization still fails.

    Returns:
        float64 (in, in) upper-triangular tensor.

    Raises:
        ValueError: H is not square, or not positive definite even with lambda = 1000 x percdamp.
    """
    import torch

    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (in, in), got {tuple(hessian.shape)}")
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    mean_diag = h.diagonal().mean()
    for attempt in range(5):
        damped = h + (percdamp * 10 ** attempt) * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise ValueError(f"the layer's Hessian ({h.shape[0]} inputs) is not positive definite even with "
                     f"{percdamp * 1e4:g} x its mean diagonal added; is the calibration text empty?")


def obs_prune_2_4(weight: Any, hessian: Any, blocksize: int = BLOCK_SIZE,
                  percdamp: float = PERCENT_DAMP) -> tuple[Any, Any]:
    """SparseGPT 2:4 prune of one weight (out, in): mask by OBS saliency, update the kept weights.

    Args:
        weight: (out, in) float tensor, groups of 4 along dim 1 (`in` a multiple of 4). Not
            modified.
        hessian: (in, in) X^T X of the layer's calibration inputs X (tokens, in).
        blocksize: columns per lazy update block, a multiple of 4.
        percdamp: dampening, see `inverse_hessian_factor`.

    Returns:
        (new weight of `weight`'s shape and dtype with exact zeros where pruned, torch.bool
        mask of that shape with exactly 2 True (kept) in every group of 4 along dim 1).

    Raises:
        ValueError: shapes do not fit, `in` or `blocksize` is not a multiple of 4, or H is not
            positive definite (see `inverse_hessian_factor`).
    """
    import torch

    rows, cols = weight.shape
    if cols % GROUP or blocksize % GROUP or tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"obs_prune_2_4: weight {tuple(weight.shape)} needs in % {GROUP} == 0, a "
                         f"({cols}, {cols}) Hessian (got {tuple(hessian.shape)}) and blocksize % {GROUP} == 0")
    hinv = inverse_hessian_factor(hessian, percdamp)
    w = weight.detach().double().clone()
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = h1.diagonal()
        for i in range(i2 - i1):
            if i % GROUP == 0:  # saliency of the whole group, with the updates so far
                saliency = w1[:, i:i + GROUP] ** 2 / d[i:i + GROUP] ** 2
                drop = saliency.topk(GROUP - KEEP, dim=1, largest=False).indices
                pruned[:, i1 + i:i1 + i + GROUP].scatter_(1, drop, True)
            q = w1[:, i].masked_fill(pruned[:, i1 + i], 0.0)
            err1[:, i] = (w1[:, i] - q) / d[i]
            w1[:, i:] -= err1[:, i:i + 1] * h1[i:i + 1, i:]
            w1[:, i] = q  # exact zeros (the update leaves w - err * d = q up to rounding)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.masked_fill_(pruned, 0.0)
    return w.to(weight.dtype), ~pruned


def output_error(x: Any, reference: Any, weight: Any) -> float:
    """||x W_ref^T - x W^T||_F / ||x W_ref^T||_F: how far a pruned layer's output moved.

    Args:
        x: (tokens, in) inputs; reference, weight: (out, in) weights of the same shape.

    Returns:
        The relative Frobenius error (0: the same outputs on x).
    """
    ref = x.double() @ reference.detach().double().T
    return float((ref - x.double() @ weight.detach().double().T).norm() / ref.norm())


def _layer_inputs(args: tuple, mask: Any) -> Any:
    """(valid tokens, in) rows of a linear layer's input: padding positions left out when the
    input is (batch, sequence, in) with the batch's attention mask (batch, sequence)."""
    x = args[0].detach()
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def _model_call(module: Any) -> dict[str, Any]:
    """Extra keyword arguments for a calibration forward: `use_cache=False` where the model takes
    it (a decoder's key/value cache would grow each time a block runs again)."""
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}


def forward_all(module: Any, tokens: Any, input_names: list[str], batch_size: int, state: dict,
                 limit: int | None = None) -> None:
    """One no-grad forward over `tokens` per batch (the first `limit` batches when given),
    `state["mask"]` set to the batch's attention mask first; a `_InputSeen` from a hook ends
    that batch's forward."""
    import itertools

    import torch

    extra = _model_call(module)
    with torch.no_grad():
        for feeds, _lengths in itertools.islice(tokens.batches(batch_size, input_names), limit):
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            state["mask"] = inputs["attention_mask"].bool()
            try:
                module(**inputs, **extra)
            except _InputSeen:
                pass


def forward_block(block: Any, records: list[dict[str, Any]], state: dict) -> None:
    """Run `block` on each recorded input (`block_inputs`), `state["mask"]` set first; a
    `_InputSeen` from a hook ends that run."""
    import torch

    with torch.no_grad():
        for r in records:
            state["mask"] = r["mask"]
            try:
                block(*r["args"], **r["kwargs"])
            except _InputSeen:
                pass


def layer_stages(module: Any, layers: dict[str, Any], tokens: Any, input_names: list[str]) -> list[tuple[list[str], bool]]:
    """The order in which to prune `layers`: groups of layers fed by the same input tensor, in
    execution order, from one forward pass of the first calibration sample.

    Args:
        module: the model (eval mode, no gradients).
        layers: {name: linear layer}.
        tokens: `calibration.TokenizedSet`; input_names: the model's inputs.

    Returns:
        [(names sharing one input, whether the forward may stop at that input)]: a group's layers
        are pruned together; a layer called more than once per forward (shared weights) is
        alone in its group and its pass runs whole forwards.

    Raises:
        ValueError: a layer is never called by the model's forward (no input to measure).
    """
    state: dict[str, Any] = {}
    seen: list[tuple[str, Any]] = []  # (name, input tensor), kept alive so that `is` is exact
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.append((n, args[0])))
               for n, m in layers.items()]
    try:
        forward_all(module, tokens, input_names, 1, state, limit=1)
    finally:
        for h in handles:
            h.remove()
    calls = {n: sum(1 for s, _ in seen if s == n) for n in layers}
    if missing := [n for n, c in calls.items() if c == 0]:
        raise ValueError(f"sparsegpt: the model's forward never calls {missing[:4]}; choose other layers "
                         "(SparsitySettings.layers) or another sparsity method")
    stages: list[tuple[list[str], Any, bool]] = []
    for name, x in seen:
        if any(name in names for names, _, _ in stages):
            continue
        shared = next((s for s in stages if s[1] is x and s[2] and calls[name] == 1), None)
        if shared is not None:
            shared[0].append(name)
        else:
            stages.append(([name], x, calls[name] == 1))
    return [(names, stop) for names, _, stop in stages]


def stage_hessian(layer: Any, run: Callable[[dict], None], stop: bool) -> tuple[Any, int]:
    """X^T X of `layer`'s inputs X over the valid tokens that `run` feeds the model as it is now.

    Args:
        layer: a linear layer of the model.
        run: f(state) running the calibration forwards (`forward_all` or `forward_block`),
            setting `state["mask"]` to each batch's attention mask (batch, sequence).
        stop: end each forward at the layer's input (it is called once per forward).

    Returns:
        (float64 (in, in) tensor X^T X, number of tokens in X).
    """
    import torch

    state: dict[str, Any] = {"count": 0}

    def pre(_mod: Any, args: tuple) -> None:
        x = _layer_inputs(args, state["mask"]).float()
        xtx = (x.T @ x).double()
        state["h"] = xtx if "h" not in state else state["h"] + xtx
        state["count"] += x.shape[0]
        if stop:
            raise _InputSeen

    handle = layer.register_forward_pre_hook(pre)
    try:
        run(state)
    finally:
        handle.remove()
    return state.get("h", torch.zeros(0, 0, dtype=torch.float64)), state["count"]


def block_index(module: Any, names: list[str]) -> tuple[Any, dict[str, int]] | None:
    """(the nn.ModuleList of blocks holding every layer of `names`, {name: block index}), or None
    when the layers are not all inside the children of one ModuleList."""
    import torch

    for list_name, blocks in module.named_modules():
        if not isinstance(blocks, torch.nn.ModuleList):
            continue
        prefix = f"{list_name}." if list_name else ""
        index = {}
        for n in names:
            parts = n[len(prefix):].split(".", 1) if n.startswith(prefix) else []
            if len(parts) < 2 or not parts[0].isdigit():
                break
            index[n] = int(parts[0])
        else:
            return blocks, index
    return None


def block_inputs(module: Any, blocks: Any, tokens: Any, input_names: list[str], batch_size: int,
                 limit: int | None = None, block: int = 0) -> list[dict[str, Any]]:
    """The inputs of `blocks[block]` per calibration batch: [{"args", "kwargs", "mask"}], the
    forward ended there (embeddings and the blocks before only)."""
    records: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
        records.append({"args": tuple(args), "kwargs": dict(kwargs), "mask": state["mask"]})
        raise _InputSeen

    handle = blocks[block].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        forward_all(module, tokens, input_names, batch_size, state, limit)
    finally:
        handle.remove()
    return records


def advance(block: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The next block's inputs: each record's hidden states (the first argument, or keyword
    `hidden_states`) replaced by `block`'s output on it, the other arguments kept.

    Raises:
        ValueError: the block returns neither a tensor nor a tuple starting with one.
    """
    import torch

    out = []
    with torch.no_grad():
        for r in records:
            y = block(*r["args"], **r["kwargs"])
            h = y[0] if isinstance(y, (tuple, list)) else y
            if not torch.is_tensor(h):
                raise ValueError(f"sparsegpt: block {type(block).__name__} returned {type(y).__name__}, "
                                 "not a tensor or a tuple starting with the hidden states")
            if r["args"]:
                out.append({**r, "args": (h, *r["args"][1:])})
            else:
                out.append({**r, "kwargs": {**r["kwargs"], "hidden_states": h}})
    return out


def chained_blocks(module: Any, layers: dict[str, Any], tokens: Any, input_names: list[str]) -> tuple[Any, dict[str, int]] | None:
    """(blocks, {layer name: block index}) when the layers live in blocks that feed each other
    directly, so a block's calibration inputs are the previous block's outputs (`advance`),
    checked on the first calibration sample against every block's recorded input; None
    otherwise (the passes then run the whole model)."""
    import torch

    found = block_index(module, list(layers))
    if found is None:
        return None
    blocks, index = found
    try:
        records = block_inputs(module, blocks, tokens, input_names, 1, limit=1)
        for b in range(1, max(index.values()) + 1):
            records = advance(blocks[b - 1], records)
            want = block_inputs(module, blocks, tokens, input_names, 1, limit=1, block=b)
            got = records[0]["args"][0] if records[0]["args"] else records[0]["kwargs"].get("hidden_states")
            ref = want[0]["args"][0] if want[0]["args"] else want[0]["kwargs"].get("hidden_states")
            if got is None or ref is None or got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-5):
                return None
    except (ValueError, TypeError, IndexError, RuntimeError):
        return None
    return found


def _prune_stage(names: list[str], hessian: Any, count: int, layers: dict[str, Any], axes: dict[str, int],
                 blocksize: int, percdamp: float) -> dict[str, Any]:
    """`obs_prune_2_4` of each layer of one stage with the stage's Hessian, in place; the masks."""
    import torch

    if count == 0:
        raise ValueError(f"sparsegpt: no calibration token reached {names[0]}")
    masks = {}
    for name in names:
        m, axis = layers[name], axes[name]
        w = m.weight.detach() if axis == 1 else m.weight.detach().T  # (out, in)
        new, keep = obs_prune_2_4(w, hessian, blocksize, percdamp)
        with torch.no_grad():
            m.weight.copy_(new if axis == 1 else new.T)
        masks[name] = keep if axis == 1 else keep.T.contiguous()
    return masks


def sparsegpt_2_4(module: Any, layers: dict[str, Any], axes: dict[str, int], tokens: Any,
                  input_names: list[str], batch_size: int = 8, blocksize: int = BLOCK_SIZE,
                  percdamp: float = PERCENT_DAMP) -> dict[str, Any]:
    """SparseGPT 2:4 pruning of `layers` of `module`, in place, sequentially in execution order.

    Each group of layers sharing an input (`layer_stages`) gets its Hessian X^T X from the
    valid calibration tokens of the model with every earlier group already pruned
    (`stage_hessian`), then `obs_prune_2_4` per layer. Biases are untouched. When the layers
    live in transformer blocks that feed each other (`chained_blocks`), the passes run one block
    on its recorded inputs instead of the whole model (as the reference implementation does):
    the same result, a few times less compute.

    Args:
        module: PyTorch model (eval mode during the passes, restored after).
        layers: {name: nn.Linear or transformers Conv1D} to prune, inputs multiples of 4.
        axes: {name: the weight's input axis} (1 for nn.Linear (out, in), 0 for Conv1D
            (in, out); `compiler.training.prune.input_axis`).
        tokens: `calibration.TokenizedSet` of real calibration text; input_names: model inputs.
        batch_size: samples per forward; blocksize, percdamp: see `obs_prune_2_4`.

    Returns:
        {name: torch.bool mask of the weight's shape, True = kept, 2 of every 4 along its axis}.

    Raises:
        ValueError: a layer is never called, or gets no calibration token.
    """
    was_training = module.training
    module.eval()
    masks: dict[str, Any] = {}
    try:
        stages = layer_stages(module, layers, tokens, input_names)
        chained = chained_blocks(module, layers, tokens, input_names)
        if chained is None:
            for names, stop in stages:
                run = functools.partial(forward_all, module, tokens, input_names, batch_size)
                masks.update(_prune_stage(names, *stage_hessian(layers[names[0]], run, stop), layers, axes,
                                          blocksize, percdamp))
            return masks
        blocks, index = chained
        records = block_inputs(module, blocks, tokens, input_names, batch_size)
        for b in range(max(index.values()) + 1):
            for names, stop in [s for s in stages if index[s[0][0]] == b]:
                run = functools.partial(forward_block, blocks[b], records)
                masks.update(_prune_stage(names, *stage_hessian(layers[names[0]], run, stop), layers, axes,
                                          blocksize, percdamp))
            records = advance(blocks[b], records) if b < max(index.values()) else records
    finally:
        module.train(was_training)
    return masks
