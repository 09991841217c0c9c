"""compiler/deploy/bundle.py on a tiny BERT: `python -m compiler bundle` here (no TensorRT) writes a
prepared Triton model repository: every file hashed and readable by others (0644), both configs
valid for Triton's schema and true to the bundled ONNX, the manifest's sections, atomic replacement."""

from __future__ import annotations

import json
import stat

import pytest

from compiler.artifacts import sha256_file
from compiler.deploy import triton
from compiler.deploy.bundle import FORMAT, bundle_engine_settings, onnx_io, read_manifest
from compiler.errors import CompilerError
from tests.deploy.conftest import PROFILE_MAX


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle[0]


@pytest.fixture(scope="module")
def manifest(bundle):
    return read_manifest(bundle)


def test_prepared_here_and_says_how_to_build_there(tiny_bundle, manifest):
    path, printed = tiny_bundle
    assert manifest["format"] == FORMAT and manifest["status"] == "prepared" and manifest["engines"] == []
    assert "status: prepared (everything but the TensorRT plan" in printed
    assert f"python -m compiler build --bundle {path}" in printed
    name = manifest["name"]
    assert name.endswith("_hybrid") and (path / name / "1").is_dir() and not list((path / name / "1").iterdir())


def test_every_file_is_hashed_and_readable_by_others(bundle, manifest):
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert sha256_file(bundle / rel) == entry["sha256"] and (bundle / rel).stat().st_size == entry["bytes"]
    for p in [bundle, *bundle.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & (0o755 if p.is_dir() else 0o644) == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    name = manifest["name"]
    # tokenizer and reference inside the TensorRT model folder: Triton skips non-numeric subfolders, and
    # no folder at the repository's top is anything but a model
    assert {f"{name}/tokenizer/tokenizer.json", f"{name}/reference/model.fp32.onnx", "README.md",
            f"{name}_onnxruntime/1/model.onnx"} <= set(manifest["files"])
    assert {p.name for p in bundle.iterdir() if p.is_dir()} == {name, f"{name}_onnxruntime"}
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]  # no temporary left


def test_configs_follow_the_onnx_and_the_profile(bundle, manifest):
    name = manifest["name"]
    trt = triton.read_config(bundle / name / "config.pbtxt")
    ort = triton.read_config(bundle / f"{name}_onnxruntime" / "config.pbtxt")
    assert (trt.platform, ort.platform) == ("tensorrt_plan", "onnxruntime_onnx")
    assert trt.max_batch_size == ort.max_batch_size == PROFILE_MAX[0]
    source = onnx_io(bundle / manifest["build_source"]["file"])  # the TensorRT-ready ONNX in the bundle
    assert triton.io_mismatches(trt, source) == [] and triton.io_mismatches(ort, onnx_io(
        bundle / manifest["onnxruntime"]["file"])) == []
    assert [t.name for t in trt.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["profiles"] == [{n: {"min": [1, 1], "opt": [2, 8], "max": list(PROFILE_MAX)}
                                     for n in ("input_ids", "attention_mask", "token_type_ids")}]
    assert manifest["tokenizer"]["max_length"] == PROFILE_MAX[1]


def test_manifest_records_recipe_fidelity_and_source(bundle, manifest):
    report = json.loads((bundle.parent / "report.json").read_text())
    assert manifest["fidelity"] == report["fidelity"]
    prec = manifest["precision"]
    assert prec["mode"] == "hybrid" and prec["int8_mac_fraction"] == 0.0
    assert len(prec["fp32_nodes"]) == report["precision"]["nodes"]["fp32"] > 0
    assert {"node", "op", "rule", "value"} <= set(prec["fp32_nodes"][0])
    assert prec["sparsity_2_4"]["eligible"] == 0 and prec["sparsity_2_4"]["ineligible"] > 0
    assert manifest["model"]["source_sha256"] == sha256_file(bundle / manifest["reference"]["file"])
    assert manifest["build_source"]["onnx_sha256"] == report["onnx_sha256"]
    assert manifest["command"].startswith("python -m compiler -q bundle --model ")
    assert manifest["build_options"]["hardware_compat"] == "none"
    assert manifest["io"]["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}
    readme = (bundle / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "tritonclient.http" in readme
    assert all(f'"{n}"' in readme for n in ("input_ids", "attention_mask", "token_type_ids", manifest["name"]))


def test_build_settings_come_from_the_bundle(manifest):
    from compiler.settings import EngineSettings

    eng = bundle_engine_settings(manifest)
    assert eng.profiles[0].max_shape == PROFILE_MAX and eng.hardware_compat == "none"
    eng = bundle_engine_settings(manifest, EngineSettings(hardware_compat="ampere+"))
    assert eng.hardware_compat == "ampere+" and eng.profiles[0].max_shape == PROFILE_MAX  # profiles kept


def test_build_here_exits_2_and_leaves_the_bundle_as_it_was(bundle_copy, capsys):
    from compiler.cli import main

    before = {p: p.stat().st_mtime_ns for p in bundle_copy.rglob("*")}
    assert main(["build", "--bundle", str(bundle_copy)]) == 2
    assert "cannot build a TensorRT engine" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in bundle_copy.rglob("*")} == before


def test_a_new_bundle_replaces_the_old_atomically(bundle_copy):
    import shutil

    from compiler.deploy.bundle import finish_bundle

    stale = bundle_copy / "stale.txt"
    stale.write_text("from an older bundle")
    manifest = read_manifest(bundle_copy)
    manifest["status"] = "prepared"
    # re-running the swap on a copy of the folder: the old content is gone, nothing half-written stays
    tmp = bundle_copy.parent / ".bundle.new"
    shutil.copytree(bundle_copy, tmp)
    (tmp / "stale.txt").unlink()
    finish_bundle(tmp, manifest, bundle_copy)
    assert not stale.exists() and not tmp.exists() and (bundle_copy / "manifest.json").is_file()
    assert [p.name for p in bundle_copy.parent.iterdir()] == ["bundle"]


def test_read_manifest_refuses_what_is_not_a_bundle(tmp_path):
    with pytest.raises(CompilerError, match="not a bundle"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CompilerError, match="format"):
        read_manifest(tmp_path)
