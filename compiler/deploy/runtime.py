"""Running a bundle: `Bundle.load(path)` with `.tokenize`, `.infer`, `.embed`, `.generate`; refusals first.

Before anything is loaded, `Bundle.load` runs `compiler.deploy.checks`: every file's sha256
against the manifest (never overridable); for TensorRT, the plan this GPU can run
(`select_engine`: compute capability and hardware-compatibility level), its header's TensorRT
version against the installed one (`check_tensorrt_version`, TensorRT 11 docs rules) and host
code (`check_host_code`, `--allow-host-code`). Every request's batch and sequence are checked
against the optimization profiles (`check_request_shape`) before a backend sees them, for ONNX
Runtime too: the bundle's profile max is the contract of both Triton models.

Backends: TensorRT (`compiler.deploy.trt_runner`, imported only when chosen) or ONNX Runtime on
the bundle's `<name>_onnxruntime/1/model.onnx` (CPUExecutionProvider, or CUDAExecutionProvider
from onnxruntime-gpu with device="cuda"). "auto" takes TensorRT when the bundle has a plan, TensorRT
imports and a GPU is found, and falls back to ONNX Runtime (with the refusal logged) otherwise.
No PyTorch here: a deployment host may have none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from shlex import quote
from typing import Any

import numpy as np

from compiler.build.device import GpuInfo, find_gpu
from compiler.deploy.bundle import MANIFEST_KEYS, RUN_KEYS, read_manifest
from compiler.deploy.checks import (check_file_hashes, check_host_code, check_request_shape, check_tensorrt_version,
                                    select_engine)
from compiler.deploy.plan import read_plan_header
from compiler.errors import CompilerError, DeploymentRefusedError, TensorRTUnavailableError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
DEVICES = ("cpu", "cuda")


def tensorrt_checks(root: Path, manifest: dict[str, Any], device_cc: str, installed: str,
                    allow_host_code: bool = False, device_gpu: str | None = None) -> dict[str, Any]:
    """The plan of `manifest` this GPU and TensorRT may load, after every TensorRT refusal.

    Args:
        root: the bundle folder. manifest: its manifest (hashes already checked).
        device_cc: this GPU's compute capability, e.g. "9.0". installed: `tensorrt.__version__`.
        allow_host_code: the user's opt-in for plans that embed the lean runtime.
        device_gpu: this GPU's name (a different model than the build GPU is logged).

    Returns:
        The manifest's engine entry to load.

    Raises:
        DeploymentRefusedError: no plan yet (a prepared bundle); no plan for this compute
            capability; the plan's header is not a TensorRT 8.6+ plan or its TensorRT version
            cannot be loaded here; host code not allowed.
    """
    if not manifest.get("engines"):
        raise DeploymentRefusedError(
            "plan present", f"a prepared bundle without a TensorRT plan ({root})", "a plan built on the target GPU",
            f"`python -m compiler build --bundle {quote(str(root))}` on a host with TensorRT 11 and the GPU; or "
            "`--backend onnxruntime`")
    entry = select_engine(manifest["engines"], device_cc, device_gpu=device_gpu, bundle=root)
    header = read_plan_header(root / entry["file"])
    check_tensorrt_version(header.version, installed, bool(entry.get("version_compatible")), bundle=root)
    check_host_code(bool(entry.get("version_compatible")), bool(entry.get("exclude_lean_runtime")),
                    allow_host_code, bundle=root)
    return entry


def _tensorrt_version() -> str:
    """`tensorrt.__version__`, or TensorRTUnavailableError (exit 2) naming why it does not import."""
    from compiler.build.engine import tensorrt_problem

    problem = tensorrt_problem()
    if problem:
        raise TensorRTUnavailableError(f"the TensorRT backend is not available here: {problem}; or run the "
                                       "bundle's ONNX Runtime model (`--backend onnxruntime`)")
    import tensorrt

    return tensorrt.__version__


class OnnxRuntimeRunner:
    """The bundle's ONNX Runtime model on the CPU (or onnxruntime-gpu's CUDA provider)."""

    def __init__(self, onnx_path: Path, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise TensorRTUnavailableError(
                    f"device cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider; install "
                    "onnxruntime-gpu, or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {i.name: _ORT_TYPES.get(i.type, np.int64) for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        del profile  # ONNX Runtime has no optimization profiles; the shape check already ran
        feeds = {k: np.ascontiguousarray(v, self.dtypes.get(k, v.dtype)) for k, v in feeds.items()}
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))


_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16}


class Bundle:
    """A loaded bundle: its manifest, tokenizer (loaded on first use) and one backend.

    Attributes:
        root: the bundle folder. manifest: manifest.json. backend: "tensorrt" or "onnxruntime".
        engine: the manifest's engine entry that runs (TensorRT), else None.
        input_names / output_names: the model's I/O, in graph order.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], backend: str, runner: Any,
                 engine: dict[str, Any] | None = None) -> None:
        self.root, self.manifest, self.backend, self.runner, self.engine = root, manifest, backend, runner, engine
        self.input_names = [t["name"] for t in manifest["io"]["inputs"]]
        self.output_names = [t["name"] for t in manifest["io"]["outputs"]]
        self._tokenizer: Any = None

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "cpu",
             allow_host_code: bool = False) -> Bundle:
        """Check a bundle and load one backend.

        Args:
            path: the bundle folder (manifest.json inside).
            backend: "tensorrt", "onnxruntime", or "auto" (TensorRT where it can run, else ONNX Runtime).
            device: "cpu" or "cuda" (ONNX Runtime's provider; TensorRT always runs on the GPU).
            allow_host_code: let TensorRT load a plan with embedded host code (its lean runtime).

        Raises:
            DeploymentRefusedError: (exit 4) a file's hash; for TensorRT: no plan, compute
                capability, TensorRT version, host code (see `tensorrt_checks`).
            TensorRTUnavailableError: (exit 2) backend "tensorrt" without TensorRT or a GPU, or
                device "cuda" without onnxruntime-gpu.
            CompilerError: not a bundle, or an unknown backend/device.
        """
        if backend not in BACKENDS or device not in DEVICES:
            raise CompilerError(f"backend {backend!r} / device {device!r}: expected one of {BACKENDS} / {DEVICES}")
        root = Path(path)
        manifest = read_manifest(root, MANIFEST_KEYS + RUN_KEYS)
        check_file_hashes(root, manifest["files"])
        if backend != "onnxruntime":
            try:
                return cls._load_tensorrt(root, manifest, allow_host_code)
            except (DeploymentRefusedError, TensorRTUnavailableError) as e:
                if backend == "tensorrt":
                    raise
                log.warning("TensorRT backend not used (%s); running ONNX Runtime", str(e).splitlines()[0])
        runner = OnnxRuntimeRunner(root / manifest["onnxruntime"]["file"], device)
        ort_manifest = dict(manifest, io=manifest["onnxruntime"].get("io", manifest["io"]))
        return cls(root, ort_manifest, "onnxruntime", runner)

    @classmethod
    def _load_tensorrt(cls, root: Path, manifest: dict[str, Any], allow_host_code: bool) -> Bundle:
        gpu = find_gpu()
        if not isinstance(gpu, GpuInfo):
            if not manifest.get("engines"):
                tensorrt_checks(root, manifest, "0.0", "0", allow_host_code)  # refuses: no plan yet
            raise TensorRTUnavailableError(f"the TensorRT backend needs an NVIDIA GPU: {gpu}")
        entry = tensorrt_checks(root, manifest, gpu.compute_capability, _tensorrt_version(), allow_host_code,
                                device_gpu=gpu.name)
        from compiler.deploy.trt_runner import TensorRTRunner

        return cls(root, manifest, "tensorrt", TensorRTRunner(root / entry["file"], allow_host_code), entry)

    @property
    def tokenizer(self) -> Any:
        """The bundle's tokenizer (transformers `AutoTokenizer` on `tokenizer/`)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.root / self.manifest["tokenizer"]["dir"]))
        return self._tokenizer

    def tokenize(self, texts: list[str], truncate: bool = False,
                 pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """{input name: int64 (batch, sequence)} of `texts`, padded on the right to the longest
        (whatever side the tokenizer was saved with: each sample's valid tokens come first, as
        `--check` and the compile's figures count them); a KV-cache input (`past_key_values.*`)
        gets an empty past, float32 (batch, heads, 0, head_dim).

        Args:
            texts: the request. truncate: cut each text at the tokenizer's `max_length` (the
                profile's longest sequence); without it a longer text is refused by `infer`.
            pairs: second segments, one per text (question-answering: texts are the questions,
                pairs the contexts; truncation then cuts the context only).
        """
        limit = self.manifest["tokenizer"]["max_length"]
        if pairs is not None and len(pairs) != len(texts):
            raise CompilerError(f"{len(texts)} text(s) but {len(pairs)} context(s): give one --context per --text")
        cut = ("only_second" if pairs is not None else True) if truncate else False
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=True, truncation=cut,
                             max_length=limit if truncate else None, padding_side="right", return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        from compiler.deploy.generation import cache_inputs

        empty = {c: c.empty(len(ids)) for c in cache_inputs(self.manifest)}  # a KV-cache graph: the context pass
        return {name: enc[name].astype(np.int64) if name in enc else empty[name] if name in empty
                else np.zeros_like(ids) for name in self.input_names}

    def check_request(self, feeds: dict[str, np.ndarray]) -> int:
        """The optimization profile admitting every input's shape (`check_request_shape`); refuses otherwise."""
        return check_request_shape(self.manifest["profiles"], {k: tuple(v.shape) for k, v in feeds.items()},
                                   bundle=self.root)

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              token_type_ids: np.ndarray | None = None, **extra: np.ndarray) -> dict[str, np.ndarray]:
        """Run one request.

        Args:
            input_ids: int64 (batch, sequence). attention_mask / token_type_ids: the same shape
                (ones / zeros when omitted and the model takes them). extra: other graph inputs,
                e.g. `past_key_values.{i}.key/value` (batch, heads, past, head_dim) of a KV-cache
                graph, passed in their own dtype (the backend casts to the model's).

        Returns:
            {output name: array}, e.g. "last_hidden_state" float32 (batch, sequence, hidden).

        Raises:
            DeploymentRefusedError: (exit 4) a shape outside every optimization profile, checked
                before the backend sees the request.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, **extra}
        fill = {"attention_mask": np.ones_like(input_ids), "token_type_ids": np.zeros_like(input_ids)}
        feeds = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None and name not in fill:
                raise CompilerError(f"input {name!r} is required (the model's inputs: {self.input_names})")
            value = fill[name] if value is None else value  # text inputs int64; a KV cache keeps its dtype
            feeds[name] = np.asarray(value, dtype=np.int64) if name in fill or name == "input_ids" else np.asarray(value)
        profile = self.check_request(feeds)
        return self.runner.run(feeds, profile)

    def max_batch(self, sequence: int) -> int:
        """The largest batch one request of `sequence` tokens may have: the largest max batch of
        the optimization profiles whose `input_ids` sequence range admits it (of all profiles
        when none does: the request is then refused by `check_request`)."""
        return self._batch_range(sequence)[1]

    def request_profile(self, feeds: dict[str, np.ndarray]) -> int:
        """The optimization profile `infer_batches` runs `feeds` (batch, sequence) with."""
        least, step = self._batch_range(int(feeds["input_ids"].shape[1]))
        rows = max(least, min(step, len(feeds["input_ids"])))
        return self.check_request({k: np.repeat(v[:1], rows, axis=0) for k, v in feeds.items()})

    def _batch_range(self, sequence: int) -> tuple[int, int]:
        """(min, max) batch of the profile with the largest max batch admitting `sequence`."""
        ranges = [p["input_ids"] for p in self.manifest["profiles"] if "input_ids" in p]
        admits = [r for r in ranges if int(r["min"][1]) <= sequence <= int(r["max"][1])] or ranges
        best = max(admits, key=lambda r: int(r["max"][0]), default=None)
        return (int(best["min"][0]), int(best["max"][0])) if best is not None else (1, 1)

    def infer_batches(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`infer` on a request of any batch size: split along the batch axis into requests of at
        most `max_batch` rows (every input is (batch, ...), e.g. int64 (batch, sequence)), the
        outputs concatenated back in order (each (batch, ...)). A request below the profile's min
        batch (a profile built for batches of 4 and up) repeats its last row to reach it; those
        rows' outputs are dropped.

        Raises:
            DeploymentRefusedError: (exit 4) a sequence no optimization profile admits.
        """
        total, sequence = feeds["input_ids"].shape[:2]
        least, step = self._batch_range(int(sequence))

        def run(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            n = len(rows["input_ids"])
            if n >= least:
                return self.infer(**rows)
            padded = {k: np.concatenate([v, np.repeat(v[-1:], least - n, axis=0)]) for k, v in rows.items()}
            return {name: out[:n] for name, out in self.infer(**padded).items()}

        if total <= step:
            return run(feeds)
        parts = [run({k: v[start:start + step] for k, v in feeds.items()}) for start in range(0, total, step)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def embed(self, texts: list[str], truncate: bool = False) -> np.ndarray:
        """Sentence embeddings of `texts`, float32 (N, hidden) (`sentence_embeddings`)."""
        feeds = self.tokenize(texts, truncate)
        return sentence_embeddings(self.infer_batches(feeds), feeds, self.output_names[0])

    def generate(self, prompts: list[str] | np.ndarray, max_new_tokens: int, use_cache: bool = True) -> Any:
        """Greedy decoding of `max_new_tokens` tokens after each prompt on this bundle's backend
        (`compiler.deploy.generation.generate`: KV cache reused between steps, context profile
        then decode profile; refused before running when the run would leave the profiles).

        Args:
            prompts: texts, or int64 token ids (batch, prompt_length).
            max_new_tokens: tokens generated per prompt (exactly that many: no stop at EOS).
            use_cache: False (or a bundle without a cache) recomputes the prefix every step.

        Returns:
            `compiler.deploy.generation.BundleGeneration`: `.tokens` (the new ids per prompt),
            `.texts`, `.tokens_per_second`.

        Raises:
            CompilerError: the bundle's task is not a generation task.
            DeploymentRefusedError: (exit 4) prompt + new tokens beyond the optimization profiles.
        """
        from compiler.deploy.generation import generate

        return generate(self, prompts, max_new_tokens, use_cache)


def sentence_embeddings(outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray], first: str) -> np.ndarray:
    """float32 (N, hidden): a `sentence_embedding` output if the graph has one, else the mean of
    output `first` over each text's unmasked tokens (attention_mask); a (batch, hidden) output is
    returned as it is."""
    if "sentence_embedding" in outputs:
        return np.asarray(outputs["sentence_embedding"], dtype=np.float32)
    hidden = np.asarray(outputs[first], dtype=np.float32)
    if hidden.ndim == 2:
        return hidden
    mask = feeds.get("attention_mask", np.ones(hidden.shape[:2], np.int64)).astype(np.float32)[..., None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
