"""Model registry and loading: name -> PyTorch module, tokenizer, and the ONNX I/O contract.

Registered names map to a published configuration and, for real weights, a Hugging Face hub id.
Anything else is tried as a local directory, then as a hub id. Weights load through
transformers' safetensors path (or `torch.load(weights_only=True)`); remote code runs only
when `ModelSettings.trust_remote_code` is set.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from calibration.text import CacheInput
from compiler.errors import UnknownModelError
from compiler.settings import ModelSettings, settings_hash
from compiler.training.tokenizers import minilm_dir as _minilm_dir
from compiler.training.tokenizers import model_tokenizer

log = logging.getLogger(__name__)


def _bert_config(**overrides: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(**overrides)  # BertConfig's defaults are bert-base-uncased's


def _gpt2_config() -> Any:
    from transformers import GPT2Config

    return GPT2Config()  # defaults are the 124M GPT-2


@dataclass(frozen=True)
class ArchitectureSpec:
    """A registered model.

    Attributes:
        hub_id: where real weights come from (a hub id, or a local directory for minilm).
        config: builds the published configuration, for `--weights random`.
        family: `encoder` (BERT-like) or `decoder` (GPT-2-like).
    """

    hub_id: str | Callable[[], Path]
    config: Callable[[], Any]
    family: str


REGISTRY: dict[str, ArchitectureSpec] = {
    "minilm": ArchitectureSpec(_minilm_dir, lambda: _auto_config(str(_minilm_dir())), "encoder"),
    "bert-base": ArchitectureSpec("bert-base-uncased", _bert_config, "encoder"),
    # BERT-large: Devlin et al. 2019, Table 1 (L=24, H=1024, A=16, FFN 4H).
    "bert-large": ArchitectureSpec(
        "bert-large-uncased",
        lambda: _bert_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096),
        "encoder",
    ),
    "gpt2": ArchitectureSpec("openai-community/gpt2", _gpt2_config, "decoder"),
}


# hub ids of the registered models: the same entry (MiniLM's weights ship offline; `--weights random`
# builds the published configuration without a hub)
HUB_ALIASES = {"sentence-transformers/all-minilm-l6-v2": "minilm", "all-minilm-l6-v2": "minilm",
               "bert-base-uncased": "bert-base", "google-bert/bert-base-uncased": "bert-base",
               "bert-large-uncased": "bert-large", "google-bert/bert-large-uncased": "bert-large",
               "openai-community/gpt2": "gpt2"}


def _auto_config(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)


@dataclass
class LoadedModel:
    """A model ready for export.

    Attributes:
        module: the PyTorch model in eval mode, FP32, on the CPU.
        tokenizer: a transformers tokenizer whose ids fall inside the model's vocabulary.
        tokenizer_note: set when a stand-in tokenizer is used (the report says so).
        input_names: ONNX graph inputs, each (batch, sequence) int64.
        vocab_size: the embedding table size (random token ids are drawn below it).
        family: `encoder` or `decoder`.
        source: where the weights came from, for reports.
        key: content key of config + weights, for reusing an unchanged export.
    """

    module: Any
    tokenizer: Any
    tokenizer_note: str | None
    input_names: list[str]
    vocab_size: int
    family: str
    source: str
    key: str
    task: str = "feature-extraction"
    pooling: Any = None  # compiler.training.tasks.Pooling for sentence-embedding
    cache: Any = None  # compiler.training.tasks.CacheSpec for text-generation-with-past
    labels: tuple[str, ...] | None = None  # class names in id order (text- and token-classification)


def _unknown(name: str, why: str) -> UnknownModelError:
    known = ", ".join(REGISTRY)
    return UnknownModelError(
        f"cannot load model {name!r}: {why}\n"
        f"Known names: {known}; or a Hugging Face model id (needs a reachable hub or a local "
        f"cache), or a local directory with config.json and weights (MODEL=/path/to/checkpoint).\n"
        f"For structure and speed work without weights, add --weights random (Makefile: WEIGHTS=random)."
    )


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load the model and tokenizer named by `settings`.

    Raises:
        UnknownModelError: unknown name, or weights/config that cannot be found; the message
            lists the known names and how to point at local weights.
    """
    import torch
    import transformers

    from compiler.training import tasks
    from compiler.training.sentence_modules import Pooling, sentence_transformers_pooling

    spec, where, family = _locate(settings.name)
    kwargs = {"trust_remote_code": settings.trust_remote_code, "attn_implementation": "eager"}
    local_only = not Path(str(where)).is_dir() and not _hub_reachable()  # checked once
    task = settings.task or "feature-extraction"
    try:
        if settings.weights == "random":
            config = spec.config() if spec is not None else _auto_config(str(where), settings.trust_remote_code)
            config._attn_implementation = "eager"
            family = family or _family(config)
            auto = getattr(transformers, tasks.check_task(task, family, settings.name).auto_class or "AutoModel")
            torch.manual_seed(settings.seed)
            module = auto.from_config(config, trust_remote_code=settings.trust_remote_code)
            source = f"random weights (seed {settings.seed}) on the {settings.name} configuration"
            key = settings_hash(settings, config.to_dict())
        else:
            if not family or task != "feature-extraction":
                config = _auto_config(str(where), settings.trust_remote_code)
                family = family or _family(config)
                tasks.check_task(task, family, settings.name)
            module = _from_pretrained(settings.name, str(where), local_only, kwargs, task)
            source = f"pretrained weights from {where}"
            key = settings_hash(settings, module.config.to_dict(), _weights_digest(module))
    except UnknownModelError:
        raise  # already says what to do (a corrupt weights file)
    except (OSError, ValueError, KeyError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "trust_remote_code" in str(e):
            why += (" It loads with its own Python code (auto_map in its config.json): read that code, then "
                    "pass --trust-remote-code (Makefile: ARGS=--trust-remote-code) to run it.")
        raise _unknown(settings.name, why + _foreign_weights(where)) from e
    module = module.float().eval()
    config = module.config
    if getattr(config, "is_encoder_decoder", False):
        raise _unknown(settings.name, f"it is an encoder-decoder (seq2seq) model ({config.model_type}); this "
                       "toolchain compiles BERT-like encoders and GPT-2-like decoders. For its encoder alone, save "
                       "the encoder as a checkpoint of an encoder class and pass that directory")
    family = family or _family(config)

    try:
        vocab_size = int(module.get_input_embeddings().num_embeddings)
    except (NotImplementedError, AttributeError) as e:  # CANINE embeds characters by hashing: no table
        raise _unknown(settings.name, f"{type(module).__name__} has no token embedding table ({e}); this toolchain "
                       "compiles models over a token vocabulary") from e
    tokenizer, note = model_tokenizer(where, settings, local_only, vocab_size, lambda why: _unknown(settings.name, why))
    if note is None and len(tokenizer) > vocab_size:
        log.warning("tokenizer has %d tokens but the embedding table %d", len(tokenizer), vocab_size)
    if task == "text-classification" and family == "decoder" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id  # it pools the last non-pad token: the pad id the pipeline pads with
        log.warning("%s: no pad_token_id in its config; the classifier reads the last token before pad id %s (%r)",
                    settings.name, tokenizer.pad_token_id, tokenizer.pad_token)
    params = inspect.signature(module.forward).parameters
    names = ["input_ids", "attention_mask"]
    if family == "encoder" and "token_type_ids" in params and getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    pooling = cache = None
    if task == "sentence-embedding":
        pooling = (sentence_transformers_pooling(where) if Path(str(where)).is_dir() else None) or Pooling()
        key = settings_hash(key, pooling)  # the pooling chain is in the graph: its files are in the key
    if task == "text-generation-with-past":
        cache = tasks.cache_spec(config, module)
        names += [CacheInput(n, cache.heads, cache.head_dim) for n in cache.input_names()]
    return LoadedModel(module, tokenizer, note, names, vocab_size, family, source, key, task, pooling, cache,
                       tasks.class_labels(config, task))


def _locate(name: str) -> tuple[ArchitectureSpec | None, str, str]:
    """(registry entry or None, where the checkpoint is, family or "" when the config decides)."""
    local = Path(name).expanduser()
    spec = REGISTRY.get(name) or (REGISTRY[HUB_ALIASES[name.lower()]]
                                  if name.lower() in HUB_ALIASES and not local.is_dir() else None)
    if spec is not None:
        return spec, str(spec.hub_id() if callable(spec.hub_id) else spec.hub_id), spec.family
    if local.is_dir():
        if not (local / "config.json").is_file():
            from compiler.training.sentence_modules import transformer_folder

            inner = transformer_folder(local)  # an older sentence-transformers layout: 0_Transformer/
            if inner is None and (local / "adapter_config.json").is_file():
                raise _unknown(name, f"{local} holds a PEFT adapter (adapter_config.json), not a model: merge it "
                               "into its base model (peft: PeftModel.from_pretrained(base, dir).merge_and_unload()"
                               ".save_pretrained(out), with the tokenizer) and pass that folder")
            if inner is None:
                raise _unknown(name, f"directory {local} has no config.json")
            return None, str(inner), ""
        return None, str(local), ""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise _unknown(name, f"{local} is not a directory")
    return None, name, ""


def _family(config: Any) -> str:
    """"decoder" for a GPT-2-like causal LM, else "encoder": a config with `is_decoder` set, or a
    `model_type` that transformers maps to a causal-LM class and to no masked-LM class (gpt2,
    llama, falcon, gemma, codegen, ...; BERT and RoBERTa have both and stay encoders)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    causal_only = (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                   and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return "decoder" if getattr(config, "is_decoder", False) or causal_only else "encoder"


def checkpoint_config(settings: ModelSettings) -> tuple[str, Any]:
    """(where the checkpoint is, its config) without loading weights, for choosing its natural
    task; the config is None where it cannot be read offline (a hub id out of reach), and for
    `--weights random` on a registered name (the published configuration names no head)."""
    spec, where, _ = _locate(settings.name)
    if settings.weights == "random" and spec is not None:
        return where, None
    try:
        return where, _auto_config(where, settings.trust_remote_code)
    except (OSError, ValueError):
        return where, None


def fit_to_positions(settings: Any, given: set[str]) -> Any:
    """`settings` with the defaults the user did not give cut to the checkpoint's position limit:
    the optimization profile (`ProfileSettings.fitted` at max sequence = the limit) and
    `--max-length`, where the defaults (32x512, 128) exceed a small model's positions. Values
    the user gave are kept (`compiler.stages.export.check_shapes` refuses them, naming the fix).
    The limit is read from the config and from the model built on the meta device (no weights,
    no memory), so a RoBERTa-style offset counts (`max_positions`).

    Args:
        settings: the CLI's settings. given: the option names given (`min_shape`, `max_length`, ...).
    """
    from dataclasses import replace

    from compiler.settings import ProfileSettings

    shapes_given = bool({"min_shape", "opt_shape", "max_shape", "profile"} & given)
    if shapes_given and "max_length" in given:
        return settings
    _, config = checkpoint_config(settings.model)
    table = max_positions(config) if config is not None else None
    pad = getattr(config, "pad_token_id", None)
    most_offset = pad + 1 if isinstance(pad, int) and pad >= 0 else 0  # fairseq-style ids start past padding
    if table is None or table - most_offset >= 512:
        return settings  # BERT, GPT-2, roberta-base (514 rows from padding index 1) and larger: the defaults fit
    limit = max_positions(config, _meta_model(config, settings.model.trust_remote_code))
    profile = settings.engine.profiles[0]
    if not shapes_given and len(settings.engine.profiles) == 1 and profile.max_shape[1] > limit:
        fitted = ProfileSettings.fitted(max_shape=(profile.max_shape[0], limit), min_past=profile.min_past,
                                        opt_past=profile.opt_past, max_past=profile.max_past)  # --max-past kept
        settings = replace(settings, engine=replace(settings.engine, profiles=(fitted,)))
    if "max_length" not in given and settings.data.max_length > limit:
        settings = replace(settings, data=replace(settings.data, max_length=limit))
    log.info("%s has %d positions: optimization profile %s, --max-length %d", settings.model.name, limit,
             "x".join(map(str, settings.engine.profiles[0].max_shape)), settings.data.max_length)
    return settings


def _meta_model(config: Any, trust_remote_code: bool) -> Any:
    """The base model of `config` on PyTorch's meta device (structure only), or None."""
    try:
        import torch
        import transformers

        with torch.device("meta"):
            return transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the offset is then unknown; check_shapes still refuses
        return None


def resolve_task(settings: Any) -> Any:
    """`settings` with `model.task` set to the checkpoint's natural task when it is None (and not
    `feature-extraction`, whose graph is the one a None task already gives), and with the two
    KV-cache optimization profiles (`kv_cache_profiles`) for `text-generation-with-past` when the
    user gave a single profile (its `max_past`, else its max sequence - 1, bounds the decode one).

    What the CLI calls before the pipeline; code that builds `BuildSettings` itself gets the
    base model's graph for `task=None`.
    """
    from dataclasses import replace

    from compiler.training.tasks import kv_cache_profiles, natural_task

    task = settings.model.task
    if task is None:
        where, config = checkpoint_config(settings.model)
        natural = natural_task(where, config) if config is not None else "feature-extraction"
        if natural != "feature-extraction":
            settings = replace(settings, model=replace(settings.model, task=natural))
            task = natural
    profiles = settings.engine.profiles
    if task == "text-generation-with-past" and len(profiles) == 1:
        # decode past up to (max sequence - 1): prompt and generated tokens together stay within
        # the profile's longest sequence, which check_shapes holds to the position limit
        max_past = profiles[0].max_past or max(1, profiles[0].max_shape[1] - 1)
        settings = replace(settings, engine=replace(settings.engine, profiles=kv_cache_profiles(profiles[0], max_past)))
    return settings


FOREIGN_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "rust_model.ot")


def _foreign_weights(where: Any) -> str:
    """" It holds tf_model.h5 only: ..." for a checkpoint directory with TensorFlow, Flax or Rust
    weights and no PyTorch ones, naming the conversion; "" otherwise."""
    local = Path(str(where))
    other = sorted(p.name for p in local.glob("*") if p.name in FOREIGN_WEIGHTS) if local.is_dir() else []
    if not other or weight_files(local):
        return ""
    return (f" It holds {', '.join(other)} only: this transformers reads PyTorch weights (safetensors or "
            "pytorch_model.bin). Convert them with a transformers that still reads that format "
            "(from_pretrained(..., from_tf=True or from_flax=True), then save_pretrained(DIR)).")


def _from_pretrained(name: str, where: str, local_only: bool, kwargs: dict[str, Any],
                     task: str = "feature-extraction") -> Any:
    """`from_pretrained` of the task's Auto class, with a corrupt or truncated weights file named in
    the error.

    Raises:
        UnknownModelError: the weights cannot be read, or the checkpoint has no weights for the
            task's head (a head is built at random only with `--weights random`).
    """
    import pickle

    import transformers
    from safetensors import SafetensorError

    from compiler.training.tasks import SPECS, natural_task

    auto = getattr(transformers, SPECS[task].auto_class or "AutoModel")
    try:
        module, info = auto.from_pretrained(where, local_files_only=local_only, output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k
                   and not (task == "sentence-embedding" and k.startswith("pooler."))]  # pooling replaces it
        if missing and task != "feature-extraction":
            config = module.config
            raise UnknownModelError(
                f"cannot load model {name!r} for --task {task}: the checkpoint has no weights for its head "
                f"({', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''} missing). It holds "
                f"{', '.join(config.architectures or ['a base model'])}, natural task "
                f"{natural_task(where, config)}. Use that --task, a checkpoint fine-tuned for {task}, or "
                "--weights random to build the head at random (structure and speed work only).")
        return module
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, IndexError) as e:
        # safetensors: "header too small", "incomplete metadata"; torch.load of a cut .bin:
        # RuntimeError (zip), EOFError (empty), UnpicklingError/IndexError (garbage)
        files = ", ".join(str(f) for f in weight_files(where)) or f"the weights of {where}"
        detail = str(e).splitlines()[0].split(". ")[0][:200] if str(e).strip() else "empty"
        raise UnknownModelError(
            f"cannot load model {name!r}: {files} cannot be read ({type(e).__name__}: {detail}); the "
            "file is corrupt, truncated or not this configuration's weights. Re-download or re-save "
            "the checkpoint (model.save_pretrained(DIR))."
        ) from e


def max_positions(config: Any, module: Any = None) -> int | None:
    """The longest sequence a Hugging Face model's position embeddings cover, or None when its
    config names no limit.

    The config's `max_position_embeddings` (BERT; GPT-2's `n_positions`, `n_ctx`), less the
    offset of fairseq-style position ids (RoBERTa, XLM-R, CamemBERT, MPNet, Longformer): those
    count from `padding_idx + 1`, so a table of `max_position_embeddings` rows (roberta-base:
    514, padding index 1) serves `max_position_embeddings - padding_idx - 1` tokens (512). The
    offset is read from `module` (a position-embedding `nn.Embedding` of exactly that many rows
    with a `padding_idx`); without a module the config's figure is returned as is. OPT's and
    BART's learned positions add their offset to the table instead, so they need none here.
    """
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            limit = getattr(config, name)
            return limit - position_offset(module, limit)
    return None


def position_offset(module: Any, rows: int) -> int:
    """`padding_idx + 1` of the module's position-embedding table when it has `rows` rows and a
    padding index (position ids counted from past the padding index, as fairseq's), else 0."""
    if module is None or not hasattr(module, "named_modules"):
        return 0
    import torch

    for name, sub in module.named_modules():
        if (isinstance(sub, torch.nn.Embedding) and "position" in name.rsplit(".", 1)[-1]
                and sub.num_embeddings == rows and sub.padding_idx is not None):
            return int(sub.padding_idx) + 1
    return 0


def weight_files(where: str | Path) -> list[Path]:
    """The weights files of a checkpoint: `*.safetensors`/`*.bin` in a local directory, else the
    hub cache's `model.safetensors`/`pytorch_model.bin` for hub id `where` (empty when neither)."""
    local = Path(where)
    if local.is_dir():
        return sorted(f for pattern in ("*.safetensors", "*.bin") for f in local.glob(pattern))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    found = (try_to_load_from_cache(str(where), f) for f in ("model.safetensors", "pytorch_model.bin"))
    return [Path(f) for f in found if isinstance(f, str)]


def _weights_digest(module: Any) -> str:
    """sha256 over parameter names, shapes and bytes (a changed weight gives a new key). The
    bytes are read as uint8, so every dtype hashes (NumPy has no bfloat16) and FP32/FP16 keys
    are those of `tensor.numpy().tobytes()`."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether huggingface.co resolves and accepts a connection (False when HF_HUB_OFFLINE is set).

    Without this, an unreachable hub costs ~30 s of retries per lookup before transformers
    falls back to its local cache.
    """
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_tokenizer(settings: ModelSettings) -> Any:
    """The tokenizer `load_model` would give `settings`, without loading weights (MiniLM's WordPiece
    stands in for a registered model's with `--weights random` when its own is not at hand).

    Raises:
        UnknownModelError: no tokenizer found.
    """
    _, where, _ = _locate(settings.name)
    local_only = not Path(str(where)).is_dir() and not _hub_reachable()
    config = checkpoint_config(settings)[1]
    return model_tokenizer(where, settings, local_only, getattr(config, "vocab_size", None),
                           lambda why: _unknown(settings.name, why))[0]
