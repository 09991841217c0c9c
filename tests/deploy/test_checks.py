"""compiler.deploy.checks: each refusal, with what it found, what it expected and the fix.

Plan versions come from headers written from the documented layout (tests/deploy/plan_headers.py)
and read back with `read_plan_header`, as the runtime does."""

from __future__ import annotations

import hashlib

import pytest

from compiler.deploy import checks
from compiler.deploy.plan import read_plan_header
from compiler.errors import EXIT_REFUSED, DeploymentRefusedError
from tests.deploy.plan_headers import header_bytes

INSTALLED = "11.4.0.106"


def _version(v: tuple[int, int, int, int]) -> tuple[int, ...]:
    return read_plan_header(header_bytes(v)).version


def _refusal(call, *args, **kw) -> DeploymentRefusedError:
    with pytest.raises(DeploymentRefusedError) as err:
        call(*args, **kw)
    assert err.value.exit_code == EXIT_REFUSED
    return err.value


# --- file hashes ---------------------------------------------------------------------------------


def _bundle(tmp_path) -> dict[str, dict]:
    files = {}
    for rel, data in (("tokenizer/vocab.txt", b"[PAD]\n[UNK]\n"), ("m/1/model.onnx", b"onnx bytes")):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return files


def test_hashes_pass_for_untouched_files(tmp_path):
    checks.check_file_hashes(tmp_path, _bundle(tmp_path))


def test_a_tampered_file_is_refused_and_not_overridable(tmp_path):
    files = _bundle(tmp_path)
    (tmp_path / "m/1/model.onnx").write_bytes(b"ONNX bytes")  # same size, other content
    e = _refusal(checks.check_file_hashes, tmp_path, files)
    assert e.check == "file hash"
    assert "1 of 2 files" in e.found and "m/1/model.onnx: sha256" in e.found and "vocab" not in e.found
    assert "cannot be overridden" in e.fix and "python -m compiler bundle" in e.fix


def test_missing_resized_and_escaping_files_are_listed(tmp_path):
    files = _bundle(tmp_path)
    (tmp_path / "tokenizer/vocab.txt").write_bytes(b"[PAD]\n")
    (tmp_path / "m/1/model.onnx").unlink()
    files["../outside.txt"] = {"sha256": "0" * 64, "bytes": 1}
    e = _refusal(checks.check_file_hashes, tmp_path, files)
    assert "3 of 3 files" in e.found
    assert "m/1/model.onnx: missing" in e.found
    assert "tokenizer/vocab.txt: 6 bytes, the manifest records 12" in e.found
    assert "../outside.txt: a path outside the bundle" in e.found


# --- TensorRT version ----------------------------------------------------------------------------


def test_same_version_loads():
    checks.check_tensorrt_version(_version((11, 4, 0, 106)), INSTALLED, version_compatible=False)


def test_a_tensorrt_10_plan_is_refused_on_11():
    e = _refusal(checks.check_tensorrt_version, _version((10, 16, 1, 11)), INSTALLED, False, bundle="dist/b")
    assert e.check == "TensorRT version"
    assert "built by TensorRT 10.16.1.11 (not version-compatible)" in e.found and "11.4.0.106 is installed" in e.found
    assert "TensorRT 10.16.1.11 exactly" in e.expected
    assert "`python -m compiler build --bundle dist/b` on this host" in e.fix and "--version-compatible" in e.fix
    spaced = _refusal(checks.check_tensorrt_version, _version((10, 16, 1, 11)), INSTALLED, False, bundle="my dir/b")
    assert "`python -m compiler build --bundle 'my dir/b'` on this host" in spaced.fix  # one shell argument


def test_without_version_compatibility_any_other_build_is_refused():
    for plan in ((11, 4, 0, 105), (11, 1, 0, 106), (11, 5, 0, 1)):
        _refusal(checks.check_tensorrt_version, _version(plan), INSTALLED, False)


def test_version_compatible_loads_on_a_later_minor_never_an_earlier_one():
    checks.check_tensorrt_version(_version((11, 1, 0, 106)), INSTALLED, version_compatible=True)
    checks.check_tensorrt_version(_version((11, 4, 0, 106)), INSTALLED, version_compatible=True)
    e = _refusal(checks.check_tensorrt_version, _version((11, 5, 0, 3)), INSTALLED, True)
    assert "an older TensorRT never loads a newer plan" in e.found
    assert "install TensorRT 11.5 or later" in e.fix


def test_version_compatible_across_majors_only_where_documented():
    checks.check_tensorrt_version(_version((10, 16, 1, 11)), INSTALLED, True)  # 10 -> 11: Support Matrix
    e = _refusal(checks.check_tensorrt_version, _version((8, 6, 1, 6)), INSTALLED, True)
    assert "a TensorRT 8 plan runs only on TensorRT 8, 10" in e.found
    checks.check_tensorrt_version(_version((8, 6, 1, 6)), "10.16.1.11", True)  # 8 -> 10
    _refusal(checks.check_tensorrt_version, _version((11, 0, 0, 1)), "10.16.1.11", True)  # never back


# --- compute capability --------------------------------------------------------------------------


def test_equal_compute_capability_is_required_without_hardware_compat():
    checks.check_compute_capability("9.0", "9.0", "none")
    checks.check_compute_capability("8.6", "8.6", "same-cc")
    e = _refusal(checks.check_compute_capability, "8.6", "7.5", "none", bundle="b")
    assert e.check == "compute capability"
    assert e.found == "a GPU of compute capability 7.5 (Turing)"
    assert "compute capability 8.6 (Ampere)" in e.expected
    assert "`python -m compiler build --bundle b` here" in e.fix and "--hardware-compat ampere+" in e.fix
    _refusal(checks.check_compute_capability, "9.0", "8.9", "same-cc")


def test_ampere_plus_runs_on_8_6_and_9_0_not_on_7_5():
    checks.check_compute_capability("8.6", "8.6", "ampere+")
    checks.check_compute_capability("8.6", "9.0", "ampere+")
    checks.check_compute_capability("8.0", "12.0", "ampere+")
    e = _refusal(checks.check_compute_capability, "8.6", "7.5", "ampere+")
    assert "7.5 (Turing)" in e.found and "8.0 or later (Ampere+)" in e.expected


def test_another_gpu_model_of_the_same_compute_capability_is_a_warning(caplog):
    checks.check_compute_capability("8.6", "8.6", "none", built_gpu="NVIDIA A10", device_gpu="NVIDIA RTX 3090")
    assert "built on NVIDIA A10 and runs on NVIDIA RTX 3090" in caplog.text


def test_an_unknown_level_is_refused():
    assert _refusal(checks.check_compute_capability, "9.0", "9.0", "hopper+").check == "hardware compatibility"


ENGINES = [
    {"file": "m/1/model.sm90.plan", "compute_capability": "9.0", "hardware_compat": "none"},
    {"file": "m/1/model.sm86.plan", "compute_capability": "8.6", "hardware_compat": "ampere+"},
]


def test_select_engine_prefers_the_exact_compute_capability_then_a_compatible_one():
    assert checks.select_engine(ENGINES, "9.0")["file"] == "m/1/model.sm90.plan"
    assert checks.select_engine(ENGINES, "8.6")["file"] == "m/1/model.sm86.plan"
    assert checks.select_engine(ENGINES, "8.9")["file"] == "m/1/model.sm86.plan"  # ampere+
    e = _refusal(checks.select_engine, ENGINES, "7.5", bundle="dist/b")
    assert "m/1/model.sm90.plan (compute capability 9.0" in e.found and "model.sm86.plan" in e.found
    assert "`python -m compiler build --bundle dist/b` on this host adds a plan for compute capability 7.5" in e.fix
    e = _refusal(checks.select_engine, [], "9.0")
    assert "no plan yet" in e.found


# --- request shapes ------------------------------------------------------------------------------


def _profile(lo, opt, hi):
    return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name in ("input_ids", "attention_mask")}


PROFILES = [_profile((1, 1), (1, 128), (1, 128)), _profile((1, 1), (16, 128), (32, 512))]


def test_the_first_admitting_profile_is_chosen():
    assert checks.check_request_shape(PROFILES, {"input_ids": (1, 64), "attention_mask": (1, 64)}) == 0
    assert checks.check_request_shape(PROFILES, {"input_ids": (1, 300), "attention_mask": (1, 300)}) == 1
    assert checks.check_request_shape(PROFILES, {"input_ids": (32, 512)}) == 1


def test_a_sequence_past_every_profile_is_refused_before_tensorrt():
    e = _refusal(checks.check_request_shape, PROFILES, {"input_ids": (2, 600), "attention_mask": (2, 600)},
                 bundle="b")
    assert e.check == "request shape"
    assert e.found == "input 'input_ids' with shape 2x600"
    assert "profile 0: 1x1 .. 1x128; profile 1: 1x1 .. 32x512" in e.expected
    assert "send at most 32x512" in e.fix and "--max-shape 32x600" in e.fix


def test_a_batch_past_the_profile_and_other_ranks_are_refused():
    e = _refusal(checks.check_request_shape, PROFILES[:1], {"input_ids": (4, 16)})
    assert "4x16" in e.found and "--max-shape 4x128" in e.fix
    _refusal(checks.check_request_shape, PROFILES, {"input_ids": (1, 16, 1)})
    e = _refusal(checks.check_request_shape, PROFILES, {"pixel_values": (1, 3)})
    assert "pixel_values" in e.found and "input_ids, attention_mask" in e.expected


# --- host code -----------------------------------------------------------------------------------


def test_a_plan_with_the_lean_runtime_needs_allow_host_code():
    e = _refusal(checks.check_host_code, True, False, False, bundle="dist/b")
    assert e.check == "host code" and "lean runtime embedded" in e.found
    assert "engine_host_code_allowed" in e.expected
    assert "`python -m compiler run dist/b --allow-host-code" in e.fix
    checks.check_host_code(True, False, True)  # opted in
    checks.check_host_code(True, True, False)  # lean runtime excluded: no host code
    checks.check_host_code(False, False, False)  # not version-compatible
