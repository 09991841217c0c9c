"""compiler/deploy/runtime.py and `python -m compiler run` on the tiny prepared bundle: ONNX Runtime
outputs equal to the bundled ONNX, `--check` figures, and every refusal (exit 4) before anything
runs: a tampered file, a sequence past the profile (ONNX Runtime never called), and, on plan
*headers* written from the documented layout (never a real plan), a TensorRT 10 plan against the
installed TensorRT 11 and a compute-capability mismatch. The TensorRT path itself is gpu-marked."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compiler.artifacts import sha256_file, write_json
from compiler.cli import main
from compiler.deploy.checks import check_tensorrt_version
from compiler.deploy.plan import HEADER_BYTES, PLAN_MAGIC, VERSION_OFFSET
from compiler.deploy.runtime import Bundle, OnnxRuntimeRunner, tensorrt_checks
from compiler.errors import DeploymentRefusedError
from tests.deploy.conftest import PROFILE_MAX

TEXTS = ["The tower is 324 metres tall.", "It was the first structure to reach 300 metres."]
INSTALLED_TRT = "11.4.0.106"


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle[0]


@pytest.fixture(scope="module")
def loaded(bundle):
    return Bundle.load(bundle, backend="auto")  # no plan, no GPU here: ONNX Runtime


def plan_header(version: tuple[int, int, int, int]) -> bytes:
    """A plan's first 28 bytes as TensorRT 8.6+ writes them (test fixture only: not a plan)."""
    head = bytearray(HEADER_BYTES)
    struct.pack_into("<II", head, 0, PLAN_MAGIC, 0)
    head[VERSION_OFFSET:HEADER_BYTES] = bytes(version)
    return bytes(head)


def add_engine(root: Path, version=(10, 8, 0, 43), cc="8.6", **entry) -> dict:
    """Put a header-only `model.plan` and its engine entry into a bundle copy; hashes kept valid."""
    manifest = json.loads((root / "manifest.json").read_text())
    rel = f"{manifest['name']}/1/model.plan"
    (root / rel).write_bytes(plan_header(version))
    manifest["engines"] = [{"file": rel, "compute_capability": cc, "hardware_compat": "none",
                            "version_compatible": False, "exclude_lean_runtime": False,
                            "gpu": {"name": "NVIDIA A10", "compute_capability": cc}, **entry}]
    manifest["files"][rel] = {"sha256": sha256_file(root / rel), "bytes": HEADER_BYTES}
    manifest["status"] = "built"
    write_json(root / "manifest.json", manifest)
    return manifest


def test_requests_are_padded_on_the_right_whatever_the_tokenizer_says(loaded):
    loaded.tokenizer.padding_side = "left"  # as Llama's and some GPT-2 tokenizers are saved
    try:
        mask = loaded.tokenize(["one", "a much longer text than the first one"])["attention_mask"]
    finally:
        loaded.tokenizer.padding_side = "right"
    assert mask[0, 0] == 1 and mask[0, -1] == 0  # valid tokens first: `--check` counts them so


def test_onnxruntime_outputs_equal_the_bundled_onnx(loaded, bundle):
    assert loaded.backend == "onnxruntime" and loaded.engine is None
    feeds = loaded.tokenize(TEXTS)
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape[0] == 2
    out = loaded.infer(**feeds)
    direct = ort.InferenceSession(str(bundle / loaded.manifest["onnxruntime"]["file"]),
                                  providers=["CPUExecutionProvider"])
    for name, value in zip([o.name for o in direct.get_outputs()], direct.run(None, feeds)):
        np.testing.assert_array_equal(out[name], value)
    emb = loaded.embed(TEXTS)
    assert emb.dtype == np.float32 and emb.shape == (2, out["last_hidden_state"].shape[-1])
    mask = feeds["attention_mask"][0].astype(bool)
    np.testing.assert_allclose(emb[0], out["last_hidden_state"][0][mask].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_run_cli_writes_outputs_and_checks_against_the_reference(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(bundle), "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(out), "--check",
                 "--check-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime on" in printed and "check: onnxruntime" in printed and "last_hidden_state" in printed
    summary = json.loads((out / "run.json").read_text())
    hidden = np.load(out / "last_hidden_state.npy")
    assert list(hidden.shape) == summary["outputs"]["last_hidden_state"]["shape"]
    assert np.load(out / "embedding.npy").shape == (2, hidden.shape[-1])
    check = summary["check"]
    assert check["texts"] == 4 and check["reference"].endswith("/reference/model.fp32.onnx")
    assert 0.99 < check["cosine_min"] <= 1.0 + 1e-9 and check["nonfinite_count"] == 0
    assert set(check["outputs"]) == {"last_hidden_state", "pooler_output"}


def test_run_splits_more_texts_than_the_profile_batch_into_requests(bundle, loaded, tmp_path, capsys, monkeypatch):
    texts = [f"text number {i} of a file longer than one request" for i in range(2 * PROFILE_MAX[0] + 1)]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    batches = []
    real_run = OnnxRuntimeRunner.run
    monkeypatch.setattr(OnnxRuntimeRunner, "run", lambda self, feeds, profile:
                        batches.append(len(feeds["input_ids"])) or real_run(self, feeds, profile))
    assert main(["run", str(bundle), "--text-file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out")]) == 0
    assert batches == [PROFILE_MAX[0], PROFILE_MAX[0], 1]  # was: one 9-row request, refused (exit 4)
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["requests"] == 3 and summary["inputs"]["input_ids"][0] == len(texts)
    hidden = np.load(tmp_path / "out" / "last_hidden_state.npy")
    feeds = loaded.tokenize(texts)
    assert hidden.shape[:2] == feeds["input_ids"].shape  # one array, rows in the file's order
    np.testing.assert_allclose(hidden[-1:], loaded.infer(**{k: v[-1:] for k, v in feeds.items()})["last_hidden_state"],
                               rtol=1e-5, atol=1e-5)
    assert "in 3 request(s) of <= 4" in capsys.readouterr().out


def test_a_remainder_below_the_profiles_min_batch_is_padded_not_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    for corners in manifest["profiles"][0].values():
        corners["min"][0] = 2  # a profile built for batches of 2 and up
    write_json(bundle_copy / "manifest.json", manifest)
    loaded = Bundle.load(bundle_copy, backend="onnxruntime")
    feeds = loaded.tokenize([f"text {i}" for i in range(PROFILE_MAX[0] + 1)])  # 4 + 1 rows
    with pytest.raises(DeploymentRefusedError, match="request shape"):
        loaded.infer(**{k: v[:1] for k, v in feeds.items()})  # one row alone: below the min
    got = loaded.infer_batches(feeds)["last_hidden_state"]
    direct = ort.InferenceSession(str(bundle_copy / manifest["onnxruntime"]["file"]), providers=["CPUExecutionProvider"])
    ref = direct.run(["last_hidden_state"], feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert main(["run", str(bundle_copy), "--text", "one text", "--out", str(bundle_copy.parent / "r")]) == 0


def test_run_check_alone_runs_on_heldout_text(bundle, tmp_path):
    assert main(["run", str(bundle), "--check", "--check-samples", "5", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert len(summary["texts"]) == 5 and summary["check"]["texts"] == 5  # the held-out texts, not added twice
    assert summary["check"]["nonfinite_count"] == 0


def test_tampered_file_is_refused_before_loading(bundle_copy, capsys):
    onnx_file = bundle_copy / json.loads((bundle_copy / "manifest.json").read_text())["onnxruntime"]["file"]
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.write_bytes(bytes(data))
    assert main(["run", str(bundle_copy), "--text", "hello"]) == 4
    err = capsys.readouterr().err
    assert "refused (file hash)" in err and "_onnxruntime/1/model.onnx: sha256" in err and "cannot be overridden" in err


def test_sequence_past_the_profile_is_refused_before_onnxruntime(bundle, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(OnnxRuntimeRunner, "run", lambda self, feeds, profile: calls.append(feeds))
    long_text = " ".join(["word"] * (PROFILE_MAX[1] + 8))
    assert main(["run", str(bundle), "--text", long_text]) == 4
    err = capsys.readouterr().err
    assert "refused (request shape)" in err and f"{PROFILE_MAX[0]}x{PROFILE_MAX[1]}" in err and not calls
    # a batch past the profile is refused the same way; --truncate cuts a long text to fit
    loaded = Bundle.load(bundle, backend="onnxruntime")
    with pytest.raises(DeploymentRefusedError, match="request shape"):
        loaded.infer(np.ones((PROFILE_MAX[0] + 1, 4), np.int64))
    assert loaded.tokenize([long_text], truncate=True)["input_ids"].shape[1] == PROFILE_MAX[1]


def test_tensorrt_10_plan_is_refused_by_tensorrt_11(bundle_copy):
    manifest = add_engine(bundle_copy, version=(10, 8, 0, 43), cc="8.6")
    with pytest.raises(DeploymentRefusedError) as e:
        tensorrt_checks(bundle_copy, manifest, device_cc="8.6", installed=INSTALLED_TRT)
    assert e.value.check == "TensorRT version" and "10.8.0.43" in e.value.found and INSTALLED_TRT in e.value.found
    assert "build --bundle" in e.value.fix
    # deploy-a's check directly: a version-compatible TensorRT 10 plan is documented to load on 11
    check_tensorrt_version((10, 8, 0, 43), INSTALLED_TRT, version_compatible=True)
    with pytest.raises(DeploymentRefusedError):
        check_tensorrt_version((11, 5, 0, 1), INSTALLED_TRT, version_compatible=True)  # newer than installed


def test_compute_capability_mismatch_is_refused(bundle_copy):
    manifest = add_engine(bundle_copy, version=(11, 4, 0, 106), cc="8.6")
    with pytest.raises(DeploymentRefusedError) as e:
        tensorrt_checks(bundle_copy, manifest, device_cc="9.0", installed=INSTALLED_TRT)
    assert e.value.check == "compute capability" and "9.0" in e.value.found and "8.6" in e.value.found
    assert tensorrt_checks(bundle_copy, manifest, device_cc="8.6", installed=INSTALLED_TRT)["file"].endswith(
        "model.plan")  # same version, same compute capability: this plan
    manifest["engines"][0]["version_compatible"] = True
    with pytest.raises(DeploymentRefusedError, match="host code"):
        tensorrt_checks(bundle_copy, manifest, device_cc="8.6", installed=INSTALLED_TRT)
    tensorrt_checks(bundle_copy, manifest, device_cc="8.6", installed=INSTALLED_TRT, allow_host_code=True)


def test_prepared_bundle_asked_for_tensorrt_says_to_build_it(bundle, capsys):
    assert main(["run", str(bundle), "--backend", "tensorrt", "--text", "x"]) == 4
    assert "refused (plan present)" in capsys.readouterr().err


def test_runner_uses_only_names_of_tensorrt_11():
    """Every TensorRT attribute trt_runner.py uses is a string of TensorRT 11's tensorrt.so."""
    import ast

    from compiler.deploy import trt_runner
    from tests.build.test_engine import _exported

    tree = ast.parse(Path(trt_runner.__file__).read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    trt_names = {"Runtime", "Logger", "WARNING", "engine_host_code_allowed", "deserialize_cuda_engine",
                 "create_execution_context", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "TensorIOMode",
                 "INPUT", "get_tensor_dtype", "set_optimization_profile_async", "set_input_shape",
                 "set_tensor_address", "get_tensor_shape", "execute_async_v3"}
    assert trt_names <= used
    assert [n for n in sorted(trt_names) if not _exported(n)] == []


@pytest.mark.gpu
def test_built_bundle_runs_on_tensorrt_close_to_the_reference(bundle_copy):
    from compiler.deploy.bundle import build_here_problem, build_into_bundle
    from compiler.deploy.hostcheck import check_on_host

    problem = build_here_problem()
    if problem:
        pytest.skip(f"needs TensorRT 11 and a GPU: {problem}")
    manifest = build_into_bundle(bundle_copy)
    assert manifest["status"] == "built" and len(manifest["engines"]) == 1
    loaded = Bundle.load(bundle_copy, backend="tensorrt")
    assert loaded.backend == "tensorrt"
    check = check_on_host(loaded, TEXTS)
    assert check["cosine_min"] > 0.999 and check["nonfinite_count"] == 0


def test_run_check_refuses_nonfinite_values_the_reference_does_not_give():
    from compiler.deploy.hostcheck import refuse_nonfinite_here
    from compiler.errors import EXIT_REFUSED, DeploymentRefusedError

    check = {"backend": "tensorrt", "engine": "model.plan", "texts": 9, "nonfinite_count": 12,
             "reference_nonfinite_count": 0}
    with pytest.raises(DeploymentRefusedError) as e:
        refuse_nonfinite_here(check, "out/run.json")
    assert e.value.exit_code == EXIT_REFUSED and e.value.check == "fidelity on this host"
    assert "12 NaN/Inf values from tensorrt" in str(e.value) and "out/run.json" in str(e.value)
    assert "PRECISION=auto" in e.value.fix
    refuse_nonfinite_here({**check, "reference_nonfinite_count": 12}, "run.json")  # the model's own: not refused
    refuse_nonfinite_here({**check, "nonfinite_count": 0}, "run.json")
