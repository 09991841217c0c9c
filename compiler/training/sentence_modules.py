"""A sentence-transformers checkpoint's module chain, as the `sentence-embedding` graph runs it.

sentence-transformers saves a model as `modules.json`, a list of modules run in order
(Reimers & Gurevych 2019, and the library's `SentenceTransformer.save`):

| module (the class name ends `type`) | here |
|---|---|
| `Transformer` (path "" or a folder such as `0_Transformer`) | the Hugging Face model the graph starts from |
| `Pooling` (`1_Pooling/config.json`) | in the graph: `cls`, `mean`, `max`, `mean_sqrt_len_tokens`, `weightedmean`, `lasttoken` (decoder embedders), several concatenated in the library's order |
| `Dense` (`2_Dense/config.json` + `model.safetensors` or `pytorch_model.bin`) | in the graph: `activation(x W^T + b)`, W (out_features, in_features) |
| `Normalize` | in the graph: L2 normalisation |
| `Dropout` | nothing (identity at inference) |

Both spellings of the files are read: the library's older ones (`sentence_transformers.models.Pooling`,
`pooling_mode_mean_tokens: true`) and those of sentence-transformers 5/6
(`sentence_transformers.sentence_transformer.modules.pooling.Pooling`, `pooling_mode: "mean"`).
The older keys concatenate in the library's fixed order (cls, max, mean, mean_sqrt_len_tokens,
weightedmean, lasttoken); a `pooling_mode` list in its own order, as sentence-transformers 6 does.
`cls` is the first position, `weightedmean` and `lasttoken` follow the library's formulas (SGPT,
Muennighoff 2022: position weights counted from the first valid token; the last valid token) on
inputs padded on the right, as the bundle and every figure here send them.
Any other module (`LayerNorm`, `WordWeights`, `CNN`, `LSTM`, a custom one) is refused with its
name: a graph without it would give other embeddings than the checkpoint, silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# sentence-transformers' mode names -> the names used here (the older config keys' spelling)
_MODES = {"cls": "cls_token", "cls_token": "cls_token", "mean": "mean_tokens", "mean_tokens": "mean_tokens",
          "max": "max_tokens", "max_tokens": "max_tokens", "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
          "weightedmean": "weightedmean_tokens", "weightedmean_tokens": "weightedmean_tokens",
          "lasttoken": "lasttoken"}
# the older `pooling_mode_<key>: true` keys, in the order sentence-transformers concatenates them
# (its `_LEGACY_POOLING_MODE_KWARGS`; the older Pooling.forward ran them in this order too)
_LEGACY_KEYS = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


@dataclass(frozen=True)
class Dense:
    """A sentence-transformers `Dense` module: (batch, in_features) -> activation(x W^T + b),
    (batch, out_features), FP32.

    Attributes:
        weight_file: its `model.safetensors` or `pytorch_model.bin` (`linear.weight`, `linear.bias`);
            not hashed (a moved checkpoint keeps its key), `digest` is.
        digest: sha256 of that file.
        activation: a `torch.nn` class name of `_ACTIVATIONS`.
    """

    weight_file: str = field(metadata={"hash": False})
    digest: str
    in_features: int
    out_features: int
    bias: bool
    activation: str


@dataclass(frozen=True)
class Pooling:
    """Sentence-transformers pooling (`1_Pooling/config.json`), the Dense modules after it and
    whether a Normalize module ends the chain.

    Attributes:
        modes: one or more of `mean_tokens` (mean over valid tokens), `cls_token` (the first
            token), `max_tokens`, `mean_sqrt_len_tokens` (sum over valid tokens / sqrt(count)),
            `weightedmean_tokens` (weights 1, 2, ... from the first valid token), `lasttoken`
            (the last valid token); several are concatenated in this order, as
            sentence-transformers does.
        normalize: L2-normalize the final vector (a `Normalize` module).
        dense: the `Dense` modules between pooling and normalisation, in order.
    """

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = True
    dense: tuple[Dense, ...] = ()

    @property
    def mode(self) -> str:
        """The pooling modes joined by "+" (one name where there is one)."""
        return "+".join(self.modes)


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def read_modules(where: str | Path) -> list[dict] | None:
    """`modules.json` of a sentence-transformers directory, or None where there is none.

    Raises:
        CompilerError: the file is not a JSON list of modules.
    """
    from compiler.errors import CompilerError

    path = Path(where) / "modules.json"
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompilerError(f"{path}: not readable JSON ({e}); re-save the checkpoint with sentence-transformers, "
                            "or remove modules.json to compile the bare model (feature-extraction)") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CompilerError(f"{path}: expected a list of modules ({{\"type\": ..., \"path\": ...}}), "
                            f"got {type(modules).__name__}; re-save the checkpoint with sentence-transformers")
    return modules


def transformer_folder(where: str | Path) -> Path | None:
    """The folder of the `Transformer` module where it is not the checkpoint's root (older
    layouts: `0_Transformer/config.json`), else None."""
    from compiler.errors import CompilerError

    try:
        modules = read_modules(where)
    except CompilerError:  # an unreadable modules.json: reported when the pooling is read
        return None
    for m in modules or []:
        if _kind(m) == "Transformer" and m.get("path"):
            folder = Path(where) / str(m["path"])
            return folder if (folder / "config.json").is_file() else None
    return None


def _root(where: str | Path) -> Path:
    """The sentence-transformers directory of `where`: itself, or its parent where `where` is
    that parent's `Transformer` folder (older layouts: `0_Transformer/`)."""
    where = Path(where)
    if not (where / "modules.json").is_file() and transformer_folder(where.parent) == where:
        return where.parent
    return where


def library_notes(where: str | Path, max_sequence: int) -> list[str]:
    """What `SentenceTransformer.encode` does to a text before the model and the graph does not
    (warnings for the CLI): it truncates at `sentence_bert_config.json`'s `max_seq_length` when
    that is below the profile's longest sequence, and it prepends the default prompt
    (`config_sentence_transformers.json`: `default_prompt_name` in `prompts`). [] when neither."""
    root = _root(where)
    if not (root / "modules.json").is_file():
        return []

    def read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    notes = []
    limit = read((transformer_folder(root) or root) / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(limit, int) and 0 < limit < max_sequence:
        notes.append(f"sentence-transformers truncates texts at max_seq_length={limit} tokens; the engine's profile "
                     f"takes {max_sequence}: longer texts give vectors encode() never gives. Pass --max-shape "
                     f"BATCHx{limit} to match it (or truncate in the client)")
    st = read(root / "config_sentence_transformers.json")
    name, prompts = st.get("default_prompt_name"), st.get("prompts") or {}
    if isinstance(prompts, dict) and name in prompts and prompts[name]:
        notes.append(f"encode() prepends the default prompt {name!r} ({prompts[name]!r}) to every text; the engine "
                     "takes the text as given: prepend it in the client")
    return notes


def sentence_transformers_pooling(where: str | Path) -> Pooling | None:
    """The pooling chain of a sentence-transformers checkpoint directory (or of the directory
    whose `Transformer` folder `where` is), or None when `where` is not one (no `modules.json`,
    or no Pooling module in it).

    Raises:
        CompilerError: a module or a pooling mode the graph does not implement, named with the
            fix; an unreadable `modules.json` or module config.
    """
    from compiler.errors import CompilerError

    where = _root(where)
    modules = read_modules(where)
    if not modules or not any(_kind(m) == "Pooling" for m in modules):
        return None
    modes: tuple[str, ...] = ()
    dense: list[Dense] = []
    normalize = False
    for m in modules:
        kind, folder = _kind(m), Path(where) / str(m.get("path", ""))
        if kind in ("Transformer", "Dropout"):
            continue
        if kind == "Pooling":
            modes = _pooling_modes(folder, where)
        elif kind == "Dense":
            dense.append(_dense(folder))
        elif kind == "Normalize":
            normalize = True
        else:
            raise CompilerError(
                f"{where}: modules.json has a {m.get('type')!r} module, which the sentence-embedding graph does "
                "not implement (it runs Transformer, Pooling, Dense, Normalize, Dropout); compile the model's "
                "token states with --task feature-extraction and apply that module after the engine")
    return Pooling(modes, normalize, tuple(dense))


def _read_config(folder: Path) -> dict:
    from compiler.errors import CompilerError

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompilerError(f"{folder / 'config.json'}: cannot read it ({e}); re-save the checkpoint with "
                            "sentence-transformers") from e


def _pooling_modes(folder: Path, where: str | Path) -> tuple[str, ...]:
    from compiler.errors import CompilerError

    cfg = _read_config(folder)
    given = cfg.get("pooling_mode")
    if given is None:
        given = [k for k in _LEGACY_KEYS if cfg.get(f"pooling_mode_{k}")]
    names = [given] if isinstance(given, str) else list(given)
    unknown = [n for n in names if n not in _MODES]
    if not names or unknown:
        raise CompilerError(f"{where}: pooling {names or 'none'} is not supported in the graph; supported: "
                            f"cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken (one or several). "
                            "Compile the token states "
                            "with --task feature-extraction and pool them after the engine")
    if cfg.get("include_prompt") is False:
        import logging

        logging.getLogger(__name__).warning(
            "%s: the Pooling module excludes prompt tokens (include_prompt false); the graph pools every "
            "valid token, as sentence-transformers does for a text given without a prompt", where)
    return tuple(_MODES[n] for n in names)


def _dense(folder: Path) -> Dense:
    from compiler.errors import CompilerError

    cfg = _read_config(folder)
    activation = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise CompilerError(f"{folder}: Dense activation {cfg.get('activation_function')!r} is not supported in "
                            f"the graph; supported: {', '.join(_ACTIVATIONS)}")
    weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise CompilerError(f"{folder}: a Dense module without model.safetensors or pytorch_model.bin; "
                            "re-save the checkpoint with sentence-transformers")
    try:
        return Dense(str(weights), hashlib.sha256(weights.read_bytes()).hexdigest(), int(cfg["in_features"]),
                     int(cfg["out_features"]), bool(cfg.get("bias", True)), activation)
    except (KeyError, TypeError, ValueError) as e:
        raise CompilerError(f"{folder / 'config.json'}: needs in_features and out_features ({e})") from e


def dense_module(spec: Dense) -> Any:
    """The torch module of a `Dense` spec, weights loaded (safetensors, or `torch.load` with
    `weights_only=True`).

    Raises:
        CompilerError: the weight file lacks `linear.weight` or has another shape than its config's.
    """
    import torch

    from compiler.errors import CompilerError

    if spec.weight_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(spec.weight_file)
    else:
        state = torch.load(spec.weight_file, map_location="cpu", weights_only=True)
    linear = torch.nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise CompilerError(f"{spec.weight_file}: does not hold the Dense weights its config names "
                            f"({spec.out_features} x {spec.in_features}, bias {spec.bias}): {str(e).splitlines()[0]}") from e
    return torch.nn.Sequential(linear, getattr(torch.nn, spec.activation)()).eval()


def pool(states: Any, mask: Any, pooling: Pooling, dense: Any = None) -> Any:
    """Sentence-transformers pooling of (batch, sequence, hidden) FP32 states over the valid tokens
    of a (batch, sequence) int64 mask -> (batch, hidden x len(modes)), then `dense` (a module
    list, from `dense_module`), then L2-normalised when `pooling.normalize`."""
    import torch

    m = mask.unsqueeze(-1).to(states.dtype)
    parts = []
    for mode in pooling.modes:
        if mode == "cls_token":
            parts.append(states[:, 0])
        elif mode == "max_tokens":
            parts.append((states + (m - 1.0) * 1e9).max(dim=1).values)
        elif mode == "weightedmean_tokens":  # weights 1..S, shifted so the first valid token has 1
            mask32 = mask.to(torch.int32)  # ArgMax of int64 is not in ONNX Runtime's CPU kernels
            positions = torch.cumsum(torch.ones_like(mask32), dim=1).to(states.dtype)  # 1..S, traced dynamic
            weights = (positions - mask32.argmax(dim=1, keepdim=True).to(states.dtype)).unsqueeze(-1) * m
            parts.append((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":  # the last position whose mask is 1 (an empty mask gives zeros)
            mask32 = mask.to(torch.int32)
            values, from_end = mask32.flip(1).max(dim=1)
            last = mask32.shape[1] - 1 - torch.where(values == 0, torch.zeros_like(from_end), from_end)
            index = last.view(-1, 1, 1).expand(-1, 1, states.shape[-1])
            parts.append(torch.gather(states * m, 1, index)[:, 0])  # not squeeze(1): it exports as an If
        else:
            count = m.sum(dim=1).clamp(min=1e-9)
            parts.append((states * m).sum(dim=1) / (count if mode == "mean_tokens" else count.sqrt()))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    for layer in dense or ():
        out = layer(out)
    return torch.nn.functional.normalize(out, p=2.0, dim=1) if pooling.normalize else out
