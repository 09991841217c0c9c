"""The build matrix on a local Ray with 2 CPUs and a tiny BERT: spec validation, expansion, the
shared export run once, failure isolation (a bad model name fails with its message, the others
finish), targets (one no worker offers: waiting, bundle still prepared; one the local node
advertises: its build task runs there and reports the worker's reason, no TensorRT here),
retries, rerun reuse and the combined Triton repository. Ray starts once for the module, its
node declaring one logical GPU and the resource `accelerator_type:H100` (what Ray advertises on
an H100 host; nothing is mocked: the build task runs and finds no TensorRT). The matrix runs
build on each other (the second run reuses the first's cells)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compiler.errors import CompilerError, TensorRTUnavailableError
from compiler.matrix.cells import expand
from compiler.matrix.spec import spec_from_dict
from compiler.matrix.targets import parse_target, resources_for
from compiler.matrix.tasks import attempt

ray = pytest.importorskip("ray")

BAD_MODEL = "no-such-model-for-the-matrix"
SMALL = {"samples": 8, "calib_samples": 16, "train_samples": 16, "max_length": 32, "data.batch_size": 8,
         "parity_batches": [1], "parity_sequences": [8, 33], "min_shape": "1x1", "opt_shape": "1x16",
         "max_shape": "4x32"}


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # another module's session: use it as it is
        yield
        return
    ray.init(num_cpus=2, num_gpus=1, resources={"accelerator_type:H100": 1}, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    from compiler.settings import ModelSettings
    from compiler.training.models import load_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(path)
    load_model(ModelSettings(name="minilm")).tokenizer.save_pretrained(path)
    return path


def spec_dict(tiny_bert, **extra):
    return {"name": "tiny", "models": [str(tiny_bert), BAD_MODEL], "precisions": ["fp16", "hybrid"],
            "settings": dict(SMALL), "retries": 1, **extra}


@pytest.fixture(scope="module")
def first(local_ray, tiny_bert, tmp_path_factory):
    from compiler.matrix.runner import run_matrix

    out = tmp_path_factory.mktemp("matrix-out")
    return out, run_matrix(spec_from_dict(spec_dict(tiny_bert)), out=str(out), progress=False)


# --- spec and expansion (no Ray) --------------------------------------------------------------

def test_expansion_shares_one_export_per_model_and_opset(tmp_path):
    spec = spec_from_dict({"models": ["minilm", {"name": "gpt2", "weights": ["random", "pretrained"]}],
                           "precisions": ["fp16", "hybrid", "int8"], "targets": ["H100", "8.9"],
                           "settings": {"samples": 8, "max_shape": "8x128", "quant.min_cosine": 0.9}})
    shared, variants, cells = expand(spec, str(tmp_path))
    assert len(variants) == 3 * 3 and len(cells) == 9 * 2
    assert len(shared) == 3 * 2  # per model and weights: opset 17 (fp16, hybrid) and 19 (int8)
    fp16, hybrid, int8 = variants[:3]
    assert fp16.shared is hybrid.shared and int8.shared is not fp16.shared
    assert cells[0].id == "minilm/pretrained/dense/fp16@H100" and cells[1].target.cc == "8.9"
    s = int8.settings
    assert s.data.samples == 8 and s.quant.min_cosine == 0.9 and s.precision.min_cosine == 0.9998
    assert s.engine.profiles[0].max_shape == (8, 128) and Path(s.output_dir) == tmp_path
    assert len({c.key for c in cells}) == len(cells)
    short = spec_from_dict({"models": ["minilm"], "precisions": ["fp16"], "settings": {"max_shape": "4x64"}})
    profile = expand(short, str(tmp_path))[1][0].settings.engine.profiles[0]
    assert (profile.opt_shape, profile.max_shape) == ((1, 64), (4, 64))  # the default opt fits the max given


@pytest.mark.parametrize("raw, message", [
    ({"models": ["m"], "precisions": ["fp8"]}, "precisions: ['fp8'] not known"),
    ({"models": ["m"], "precisions": ["fp16"], "colour": 1}, "unknown key(s) ['colour']"),
    ({"models": [{"name": "m", "weight": "random"}], "precisions": ["fp16"]}, "models[0]: unknown key(s) ['weight']"),
    ({"models": ["m"], "precisions": ["fp16"], "sparsity": ["1:2"]}, "sparsity: '1:2' not known"),
    ({"models": ["m"], "precisions": ["fp16"], "targets": ["Z80"]}, "'Z80' is neither a compute capability"),
    ({"models": ["m"], "precisions": ["fp16"], "settings": {"min_cosine": 0.9}}, "ambiguous"),
    ({"models": ["m"], "precisions": ["fp16"], "settings": {"sampels": 8}}, "settings.sampels: no such setting"),
    ({"models": ["m"], "precisions": ["fp16"], "settings": {"mode": "fp16"}}, "'precisions' key instead"),
    ({"models": ["m"], "precisions": ["fp16"], "settings": {"samples": 0}}, "invalid settings"),
    ({"precisions": ["fp16"]}, "'models' is required"),
])
def test_bad_specs_are_one_clear_error(raw, message):
    with pytest.raises(CompilerError, match=None) as e:
        spec_from_dict(raw)
    assert message in str(e.value)


def test_cli_exits_1_on_a_bad_spec(tmp_path, capsys):
    from compiler.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"models": ["minilm"], "precisions": ["hybrid", "fp4"]}))
    assert main(["matrix", str(path), "--no-progress"]) == 1
    assert "precisions: ['fp4'] not known" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not valid YAML text"),  # not text: was an internal error (exit 3)
    (b"models: [minilm\n", "not valid YAML text"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
])
def test_a_spec_file_that_is_not_a_yaml_mapping_exits_1(tmp_path, capsys, content, message):
    from compiler.cli import main

    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    assert main(["matrix", str(path), "--no-progress"]) == 1
    assert message in capsys.readouterr().err


def test_a_utf16_spec_with_its_bom_reads_like_utf8(tmp_path):
    from compiler.matrix.spec import load_spec

    text = "models: [minilm]\nprecisions: [hybrid]\n"
    (tmp_path / "a.yaml").write_bytes(text.encode("utf-16"))  # Windows editors' "Unicode"
    (tmp_path / "b.yaml").write_bytes(text.encode("utf-8-sig"))
    assert load_spec(tmp_path / "a.yaml").precisions == load_spec(tmp_path / "b.yaml").precisions == ("hybrid",)


def test_targets_ask_for_the_accelerator_or_the_compute_capability():
    h100, sm90 = parse_target("h100"), parse_target("9.0")
    assert (h100.label, h100.cc) == ("H100", "9.0") and sm90.label is None
    cluster = {"CPU": 8, "GPU": 2, "accelerator_type:H100": 1}
    assert resources_for(h100, cluster)[0] == {"num_gpus": 1, "resources": {"accelerator_type:H100": 0.001}}
    assert resources_for(sm90, cluster)[1] == "accelerator_type:H100"  # any GPU of that compute capability
    assert resources_for(parse_target("8.6"), {"CPU": 4, "GPU": 1, "cc_8.6": 1})[1] == "cc_8.6"
    none, why = resources_for(parse_target("L4"), cluster)
    assert none is None and "accelerator_type:L4 or cc_8.9" in why and "accelerators accelerator_type:H100" in why


def test_retries_skip_bad_input_and_retry_the_rest():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("transient")
        return {"value": 1}

    ok = attempt(flaky, retries=2, what="stage")
    assert ok["ok"] and ok["attempts"] == 2 and ok["value"] == 1
    bad = attempt(lambda: (_ for _ in ()).throw(CompilerError("bad model\nfix it")), retries=3, what="export")
    assert not bad["ok"] and bad["attempts"] == 1 and bad["error"] == "export: bad model" and not bad["retryable"]
    broken = attempt(lambda: 1 / 0, retries=1, what="verify")
    assert broken["attempts"] == 2 and broken["status"] == "failed" and "ZeroDivisionError" in broken["error"]
    no_trt = attempt(lambda: (_ for _ in ()).throw(TensorRTUnavailableError("no TensorRT")), retries=1, what="b")
    assert no_trt["status"] == "waiting" and no_trt["attempts"] == 1


# --- on Ray -----------------------------------------------------------------------------------

def test_bad_model_fails_with_its_message_and_the_others_finish(first):
    _, run = first
    cells = {c["id"]: c for c in run.report["cells"]}
    bad = [c for c in cells.values() if c["model"] == BAD_MODEL]
    good = [c for c in cells.values() if c["model"] != BAD_MODEL]
    assert len(bad) == 2 and all(c["status"] == "failed" for c in bad)
    assert all(f"cannot load model '{BAD_MODEL}'" in c["error"] for c in bad)
    assert all(c["attempts"]["shared"] == 1 for c in bad)  # bad input: not retried
    assert len(good) == 2 and all(c["status"] == "done" and c["prepared"] for c in good)
    for c in good:
        real = c["fidelity"]["real"]
        assert real["samples"] == 8 and 0.99 < real["cosine_min"] <= 1.0 and real["nonfinite_count"] == 0
        assert {"shared", "export", "precision", "verify", "bundle"} <= set(c["seconds"])
        manifest = json.loads((Path(c["bundle"]) / "manifest.json").read_text())
        assert manifest["status"] == "prepared" and manifest["variant"] == c["precision"]
    assert run.report["counts"] == {"done": 2, "running": 0, "waiting": 0, "failed": 2, "reused": 0}
    md = run.markdown_path.read_text()
    assert f"cannot load model '{BAD_MODEL}'" in md and md.count("| done |") == 2


def test_the_shared_export_runs_once(first):
    _, run = first
    tiny = [s for s in run.report["shared"] if BAD_MODEL not in s["label"]]
    assert len(tiny) == 1 and len(run.report["shared"]) == 2
    assert tiny[0]["ran"] and tiny[0]["ok"] and tiny[0]["reused"] is False  # exported here, once
    assert len(tiny[0]["variants"]) == 2
    good = [c for c in run.report["cells"] if c["status"] == "done"]
    assert all(c["export_reused"] is True for c in good)  # both variants found it done


def test_combined_repository_has_each_variant(first):
    from compiler.deploy.triton import read_config

    _, run = first
    repo = run.report["repository"]
    root = Path(repo["path"])
    names = sorted(p.name for p in root.iterdir())
    assert names == ["tiny-bert_fp16_onnxruntime", "tiny-bert_hybrid_onnxruntime"]  # no plan: no TensorRT model
    for name in names:
        assert read_config(root / name / "config.pbtxt").name == name
        assert (root / name / "1" / "model.onnx").is_file()


def test_rerun_reuses_every_finished_cell(first, tiny_bert):
    from compiler.matrix.runner import run_matrix

    out, run = first
    again = run_matrix(spec_from_dict(spec_dict(tiny_bert)), out=str(out), progress=False)
    cells = {c["id"]: c for c in again.report["cells"]}
    before = {c["id"]: c for c in run.report["cells"]}
    done = [i for i, c in before.items() if c["status"] == "done"]
    assert all(cells[i]["reused"] and cells[i]["status"] == "done" for i in done)
    assert all(cells[i]["seconds"] == before[i]["seconds"] for i in done)  # the first run's times, kept
    assert [s["ran"] for s in again.report["shared"] if BAD_MODEL not in s["label"]] == [False]
    assert again.report["counts"]["failed"] == 2  # failed cells run again, and fail again


def test_targets_wait_with_their_reason_and_bundles_stay_prepared(first, tiny_bert, capsys):
    from compiler.cli import main

    out, _ = first
    spec = spec_dict(tiny_bert, models=[str(tiny_bert)], targets=["H100", "9.0", "8.6"])
    path = out / "targets.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": "tiny"}))
    assert main(["matrix", str(path), "--out", str(out), "--no-progress"]) == 2  # waiting, nothing failed
    report = json.loads((out / "matrix" / "tiny" / "report.json").read_text())
    assert len(report["cells"]) == 6 and {c["status"] for c in report["cells"]} == {"waiting"}
    cells = {c["id"].split("/")[-1]: c for c in report["cells"]}
    a10 = cells["fp16@8.6"]  # no worker offers it: not run
    assert "no worker advertises accelerator_type:A10G or cc_8.6" in a10["error"] and "build" not in a10["attempts"]
    for h100 in (cells["fp16@H100"], cells["hybrid@9.0"]):  # built on the node with the H100 resource ...
        assert h100["target"]["resource"] == "accelerator_type:H100" and h100["attempts"]["build"] == 1
        assert "cannot build" in h100["error"]  # ... which has no TensorRT: the worker's reason, not retried
    assert all(c["prepared"] and Path(c["bundle"], "manifest.json").is_file() for c in cells.values())
    assert all(c["reused"] is False and "verify" in c["seconds"] for c in cells.values())  # the bundles reused
    assert "waiting" in capsys.readouterr().out
