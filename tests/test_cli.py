"""The command line: the whole pipeline on MiniLM, the build step's stop, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "compiler", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def has_tensorrt_and_gpu() -> bool:
    """TensorRT imports and the NVIDIA driver reports a GPU (found as the builder finds it, no PyTorch)."""
    from compiler.build.device import GpuInfo, find_gpu
    from compiler.build.engine import tensorrt_problem

    return tensorrt_problem() is None and isinstance(find_gpu(), GpuInfo)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    # feature-extraction: MiniLM's last_hidden_state graph (its natural task is sentence-embedding)
    result = run_cli("compile", "--model", "minilm", "--task", "feature-extraction", "--precision", "hybrid",
                     "--samples", "16", "--profile-max-rows", "12", "--output-dir", str(out))
    return out, result


def test_compile_stops_at_build_with_status_2(compiled):
    out, result = compiled
    if has_tensorrt_and_gpu():
        pytest.skip("TensorRT and a GPU are present: the build runs (see tests/build/test_gpu.py)")
    variant = out / "minilm" / "pretrained" / "hybrid"
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(variant / "model.onnx") in result.stderr
    assert (variant / "model.onnx").is_file() and (variant / "report.json").is_file()
    assert not (variant / "model.plan").exists()
    assert "cosine_min" in result.stdout and "real" in result.stdout and "random" in result.stdout


def test_report_records_build_status_graph_hash_and_profile_edge(compiled):
    """A script behind `make` (every failure exits 2 there) reads the build's status in report.json;
    the report names the exact graph it describes; verify ran at the profile's max shape."""
    from compiler.graph.onnx_io import onnx_sha256

    out, result = compiled
    variant = out / "minilm" / "pretrained" / "hybrid"
    report = json.loads((variant / "report.json").read_text())
    if not has_tensorrt_and_gpu():
        assert report["build"]["status"] == "no-tensorrt" and report["build"]["exit_code"] == 2
    assert report["onnx_sha256"] == onnx_sha256(variant / "model.onnx")
    edge = report["fidelity"]["profile_max"]
    # 12 windows at the max sequence (--profile-max-rows; default 8) of the 32 x 512 profile
    assert report["fidelity"]["shapes_verified"]["profile_max"] == [12, 512] and edge["samples"] == 12
    assert report["fidelity"]["shapes_verified"]["profile_max_shape"] == [32, 512]
    assert edge["nonfinite_count"] == 0 and edge["cosine_min"] > 0.999
    assert report["settings"]["engine"]["profiles"][0]["max_shape"] == [32, 512]


def test_report_fields(compiled):
    out, _ = compiled
    report = json.loads((out / "minilm" / "pretrained" / "hybrid" / "report.json").read_text())
    for key in ("real", "random"):
        f = report["fidelity"][key]
        assert set(f) >= {"cosine_min", "cosine_mean", "max_abs_err", "nonfinite_count", "samples"}
        assert f["samples"] == 16
    assert "emulation" in report["fidelity"]["reference"]
    assert report["precision"]["nodes"]["fp32"] == 19  # 13 LayerNormalization + 6 Softmax
    assert report["precision"]["matmul_fp16_fraction"] >= 0.95
    assert report["fidelity"]["real"]["cosine_min"] >= 0.9998
    assert len(report["export"]["parity"]) == 12


def test_no_build_exits_0_and_reuses(compiled):
    out, _ = compiled
    result = run_cli("-v", "compile", "--no-build", "--model", "minilm", "--task", "feature-extraction",
                     "--precision", "hybrid", "--samples", "16", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reused" in result.stderr  # export and precision pass unchanged by content hash
    assert "settings: BuildSettings(" in result.stderr  # -v: the settings at DEBUG


def test_unknown_model_error_without_traceback(tmp_path):
    result = run_cli("-q", "export", "--model", "no-such-model-xyz", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "stage export: start" not in result.stderr  # -q: no INFO lines
    assert "Known names: minilm, bert-base, bert-large, gpt2" in result.stderr
    assert "--weights random" in result.stderr


def test_corrupt_onnx_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    result = run_cli("precision", "--onnx", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not a readable ONNX model" in result.stderr and str(bad) in result.stderr
    assert not list(tmp_path.glob("bad.*.onnx"))  # nothing half-written


@pytest.mark.parametrize("content", [None, b"", b"\x08\x07 truncated"])
def test_build_on_a_missing_empty_or_truncated_onnx_is_bad_input(tmp_path, content):
    """Exit 1 naming the file, not exit 2 ("TensorRT missing, build it later"): the file comes first."""
    onnx_path = tmp_path / "model.onnx"
    if content is not None:
        onnx_path.write_bytes(content)
    result = run_cli("build", "--onnx", str(onnx_path))
    assert result.returncode == 1, result.stderr[-1000:]
    assert str(onnx_path) in result.stderr and "Traceback" not in result.stderr
    assert "Build it later" not in result.stderr


@pytest.mark.parametrize("mode", ["int8", "int8-qat", "auto"])
def test_precision_on_a_bare_onnx_refuses_modes_that_need_text(tmp_path, mode):
    result = run_cli("precision", "--onnx", str(tmp_path / "m.onnx"), "--precision", mode)
    assert result.returncode == 1 and f"compile --no-build --model NAME --precision {mode}" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_too_few_samples_names_flags_that_exist(tmp_path):
    from compiler.cli import build_parser

    short = tmp_path / "short.txt"
    short.write_text("one two three four five six seven eight nine\n")
    result = run_cli("export", "--model", "minilm", "--calib", str(short), "--output-dir", str(tmp_path))
    assert result.returncode == 1 and "--min-words" in result.stderr
    flags = {o for a in build_parser()._subparsers._group_actions[0].choices["compile"]._actions
             for o in a.option_strings}
    assert {"--samples", "--calib-samples", "--train-samples", "--min-words"} <= flags


def test_invalid_profile_is_a_clear_error(tmp_path):
    result = run_cli("build", "--onnx", str(tmp_path / "x.onnx"), "--min-shape", "4x1", "--opt-shape", "1x128")
    assert result.returncode == 1 and "min (4) <= opt (1)" in result.stderr


@pytest.mark.parametrize("argv, profile", [
    (["--max-shape", "4x64"], ((1, 1), (1, 64), (4, 64))),  # the default opt 1x128 would pass the max
    (["--min-shape", "2x200"], ((2, 200), (2, 200), (32, 512))),
    (["--max-shape", "4x64", "--opt-shape", "2x32"], ((1, 1), (2, 32), (4, 64))),  # given: kept
    ([], ((1, 1), (1, 128), (32, 512))),  # the defaults, so earlier cache keys stay
])
def test_shapes_left_out_fit_the_ones_given(argv, profile):
    from compiler.cli import build_parser, settings_from_args

    p = settings_from_args(build_parser().parse_args(["compile", *argv])).engine.profiles[0]
    assert (p.min_shape, p.opt_shape, p.max_shape) == profile


def test_a_zero_shape_names_the_shape_given():
    from compiler.cli import build_parser, settings_from_args
    from compiler.errors import CompilerError

    with pytest.raises(CompilerError, match=r"max shape 0x5: batch and sequence must be >= 1"):
        settings_from_args(build_parser().parse_args(["compile", "--max-shape", "0x5"]))


def test_sparsity_and_fine_tuning_flags_reach_the_settings():
    from compiler.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["compile", "--model", "minilm", "--sparsity", "2:4", "--sparsity-method", "wanda",
                                      "--recover-steps", "7", "--recover-lr", "3e-4", "--recover-schedule", "constant",
                                      "--train-text", "train.txt", "--train-text", "more.tsv", "--train-samples", "99",
                                      "--train-device", "auto", "--train-bf16", "--recover-from", "s.safetensors",
                                      "--no-split-batches", "--recover-layerwise-weight", "2.5",
                                      "--recover-batch-size", "12", "--train-batch-size", "4"])
    s = settings_from_args(args)
    assert s.train.device == "auto" and s.train.bf16 and s.sparsity.recover_from == "s.safetensors"
    assert not s.train.split_by_length
    assert (s.sparsity.pattern, s.sparsity.method, s.sparsity.recover_steps) == ("2:4", "wanda", 7)
    assert (s.sparsity.recover_lr, s.sparsity.recover_schedule) == (3e-4, "constant")
    from compiler.stages.sparsity import recovery_train  # the recovery's own knobs reach its TrainSettings
    assert (recovery_train(s).lr, recovery_train(s).layerwise_weight, s.train.layerwise_weight) == (3e-4, 2.5, 1.0)
    assert (recovery_train(s).batch_size, s.train.batch_size) == (12, 4)  # QAT keeps its own
    assert (s.data.train_path, s.data.train_samples) == (("train.txt", "more.tsv"), 99)
    defaults = settings_from_args(build_parser().parse_args(["compile"]))
    assert (defaults.sparsity.method, defaults.sparsity.recover_schedule) == ("sparsegpt", "linear")
    assert defaults.data.train_path == () and defaults.train.device == "auto" and not defaults.train.bf16
    assert defaults.train.split_by_length
    assert defaults.sparsity.recover_from is None


def test_default_recovery_steps_follow_the_recovery_precision():
    """`--recover-steps` unset: 3,000 steps in FP32, 6,000 under BF16 autocast (each sized to MiniLM's
    hour on 2 cores); given, even 0, it is kept."""
    from dataclasses import replace

    from compiler.cli import build_parser, settings_from_args
    from compiler.settings import RECOVER_STEPS_BF16, RECOVER_STEPS_FP32, SparsitySettings
    from compiler.stages.sparsity import resolve_recover_steps

    def steps(*argv: str) -> int:
        s = settings_from_args(build_parser().parse_args(["compile", "--sparsity", "2:4", *argv]))
        return resolve_recover_steps(s).sparsity.recover_steps

    assert settings_from_args(build_parser().parse_args(["compile"])).sparsity.recover_steps is None
    assert (RECOVER_STEPS_FP32, RECOVER_STEPS_BF16) == (3000, 6000)
    assert steps("--recover-bf16", "off") == RECOVER_STEPS_FP32
    assert steps("--recover-bf16", "on") == steps("--train-bf16") == RECOVER_STEPS_BF16
    assert steps("--recover-bf16", "on", "--recover-steps", "0") == 0
    assert steps("--recover-steps", "11") == 11
    resolved = resolve_recover_steps(settings_from_args(build_parser().parse_args(["compile", "--sparsity", "2:4"])))
    assert resolved.sparsity.recover_steps in (RECOVER_STEPS_FP32, RECOVER_STEPS_BF16)  # by this machine's CPU
    assert replace(resolved.sparsity, recover_steps=None) == SparsitySettings(pattern="2:4")


def test_every_option_reaches_its_settings_field():
    """Each CLI option of the table fills exactly the field it names; absent, the field keeps the
    dataclass default (the CLI restates no default)."""
    import dataclasses

    from compiler import cli
    from compiler.settings import BuildSettings

    assert cli.settings_from_args(cli.build_parser().parse_args(["compile"])) == BuildSettings()
    for flag, targets, kw in cli.MODEL_OPTIONS + cli.PRECISION_OPTIONS + cli.OPTION_OPTIONS + cli.ENGINE_OPTIONS:
        if kw.get("action") in ("store_true", "store_false"):
            argv = [flag]
        elif "choices" in kw:
            argv = [flag, [c for c in kw["choices"] if c != cli._default(targets.split()[0])][0]]
        elif kw.get("type") is cli._shape:
            argv = [flag, "2x64"]
        elif kw.get("type") is cli._profile:  # the whole profile: seen as its shapes below
            argv = [flag, "1x1:2x64:8x512"]
        elif flag == "--smoothquant-alpha":
            argv = [flag, "off"]
        elif flag == "--train-device":
            argv = [flag, "cpu"]
        elif flag == "--profile-max-rows":
            argv = [flag, "all"]
        elif flag == "--precision":
            continue
        else:
            default = cli._default(targets.split()[0])
            kind = kw.get("type")
            value = (default or 2) + 1 if kind is int else (0.25 if default == 0.5 else 0.5) if kind is float else "x"
            argv = [flag, str(value)]
        if flag in ("--min-shape", "--opt-shape"):
            argv += ["--max-shape", "8x512"] if flag == "--opt-shape" else ["--opt-shape", "2x128"]
        try:
            settings = cli.settings_from_args(cli.build_parser().parse_args(["compile", *argv]))
        except cli.CompilerError:
            continue  # a value the settings refuse for this field (checked elsewhere)
        changed = {f"{s}.{f.name}" for s in ("model", "export", "precision", "data", "quant", "train", "sparsity", "vocab")
                   for f in dataclasses.fields(getattr(settings, s))
                   if getattr(getattr(settings, s), f.name) != getattr(getattr(BuildSettings(), s), f.name)}
        if settings.output_dir != BuildSettings().output_dir:
            changed.add("build.output_dir")
        engine, default_engine = settings.engine, BuildSettings().engine
        changed |= {f"engine.{f.name}" for f in dataclasses.fields(engine)
                    if f.name != "profiles" and getattr(engine, f.name) != getattr(default_engine, f.name)}
        changed |= {f"profile.{k}" for k in ("min_shape", "opt_shape", "max_shape", "min_past", "opt_past", "max_past")
                    if getattr(engine.profiles[0], k) != getattr(default_engine.profiles[0], k)}
        want = set(targets.split()) | ({"profile.max_shape"} if flag == "--opt-shape" else set()) | (
            {"profile.opt_shape"} if flag in ("--min-shape", "--max-shape") else set())  # max 2x64: opt fits it
        if flag == "--output-dir":
            want.add("data.cache_dir")  # the caches follow the artifacts
        if flag == "--profile":
            want = {"profile.opt_shape", "profile.max_shape"}
        assert changed == want, (flag, changed)


def test_makefile_train_text_reaches_the_settings():
    """`make ... TRAIN_TEXT="a b"` passes one --train-text per file, in order."""
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    from compiler.cli import build_parser, settings_from_args

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-s", "-n", "onnx", "SPARSITY=2:4", "TRAIN_TEXT=deploy.tsv general.txt"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if " -m compiler " in x)  # after any install-stamp lines
    argv = shlex.split(line)
    settings = settings_from_args(build_parser().parse_args(argv[argv.index("compiler") + 1:]))
    assert settings.data.train_path == ("deploy.tsv", "general.txt")
    assert settings.sparsity.pattern == "2:4"


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # its own process group, signalled as a terminal's Ctrl-C signals the foreground group: the
    # pipeline and the export's worker process both get SIGINT (signalling the parent alone
    # once let the worker finish the export and the command exit 0 on a loaded machine)
    # SIGINT at its default on entry, as a command a terminal starts: a SIGINT disposition of
    # "ignore" is inherited through exec, and Python then installs no KeyboardInterrupt handler
    # (a fresh-clone run of the whole suite exited 0 here: the test process had SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "compiler", "export", "--model", "minilm", "--output-dir",
                             str(tmp_path)], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    inherited = signal.getsignal(signal.SIGINT)
    lines = []
    for line in proc.stderr:  # wait until the pipeline runs, then press Ctrl-C
        lines.append(line)
        if "stage export: start" in line:
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, f"SIGINT here: {inherited}\n" + "".join(lines) + rest
    assert "interrupted" in rest and "Traceback" not in rest


@pytest.mark.parametrize("flags, expected", [
    (["--max-shape", "64x100000"], "use --max-shape 64x512 or less"),
    (["--max-length", "600"], "use --max-length 512 or less"),
])
def test_shapes_past_the_position_limit_are_refused_before_any_work(tmp_path, flags, expected):
    result = run_cli("compile", "--model", "minilm", "--output-dir", str(tmp_path), *flags)
    assert result.returncode == 1 and "minilm has 512 positions" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.onnx"))  # refused before the export


def test_a_report_of_another_graph_is_left_out_of_the_manifest(tmp_path, caplog):
    from onnx import helper

    from compiler.cli import _report_of
    from compiler.graph.onnx_io import onnx_sha256, save_onnx
    from tests.models import f32, make_model

    onnx_path = save_onnx(make_model([helper.make_node("Relu", ["X"], ["Y"])], [f32("X", [2])], [f32("Y", [2])]),
                          tmp_path / "model.onnx")
    (tmp_path / "report.json").write_text(json.dumps({"onnx_sha256": "0" * 64, "fidelity": {}}))
    with caplog.at_level("WARNING"):
        assert _report_of(onnx_path) == {}
    assert "another graph" in caplog.text
    good = {"onnx_sha256": onnx_sha256(onnx_path), "fidelity": {"real": {"cosine_min": 1.0}}}
    (tmp_path / "report.json").write_text(json.dumps(good))
    assert _report_of(onnx_path) == good


def test_internal_error_exits_3_with_the_traceback(monkeypatch, capsys):
    from compiler import cli

    def bug(_args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_run", bug)
    assert cli.main(["export"]) == 3
    err = capsys.readouterr().err
    assert "ZeroDivisionError: a bug" in err and "internal error" in err


def test_profile_max_rows_takes_a_count_or_all():
    from compiler import cli

    parse = lambda *a: cli.settings_from_args(cli.build_parser().parse_args(["compile", *a]))  # noqa: E731
    assert parse().data.profile_max_rows == 8
    assert parse("--profile-max-rows", "all").data.profile_max_rows is None
    assert parse("--profile-max-rows", "3").data.profile_max_rows == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            parse("--profile-max-rows", bad)


def test_an_output_dir_that_cannot_hold_artifacts_stops_before_the_model_loads(tmp_path, monkeypatch):
    from compiler import cli
    from compiler.training import models

    blocker = tmp_path / "engines"
    blocker.write_text("a file where the output folder should be")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for out in (blocker, blocker / "sub", "/proc/trt-compiler-test"):  # were exit 3, after the export
        assert cli.main(["compile", "--model", "minilm", "--output-dir", str(out), "--no-build"]) == 1
    assert blocker.read_text().startswith("a file")
