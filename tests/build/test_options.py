"""The deployment build options without TensorRT: settings, CLI flags, manifest record, hashing."""

from __future__ import annotations

import pytest

from compiler.build.options import build_flags, build_options, cuda_version, profile_text
from compiler.cli import build_parser, settings_from_args
from compiler.errors import CompilerError
from compiler.settings import EngineSettings, ProfileSettings, settings_hash

LATENCY = ProfileSettings((1, 1), (1, 128), (1, 128))
THROUGHPUT = ProfileSettings((1, 1), (16, 128), (32, 512))


def _engine(*argv: str) -> EngineSettings:
    return settings_from_args(build_parser().parse_args(["build", "--onnx", "m.onnx", *argv])).engine


def test_the_cli_fills_the_options_and_several_profiles():
    eng = _engine("--profile", "1x1:1x128:1x128", "--profile", "1x1:16x128:32x512", "--hardware-compat", "ampere+",
                  "--version-compatible", "--exclude-lean-runtime")
    assert eng.profiles == (LATENCY, THROUGHPUT)
    assert (eng.hardware_compat, eng.version_compatible, eng.exclude_lean_runtime) == ("ampere+", True, True)
    assert _engine("--max-shape", "8x256").profiles == (ProfileSettings(max_shape=(8, 256)),)
    assert _engine() == EngineSettings()


def test_bad_combinations_are_refused():
    with pytest.raises(CompilerError, match="either --profile"):
        _engine("--profile", "1x1:1x128:1x128", "--max-shape", "8x256")
    with pytest.raises(CompilerError, match="exclude_lean_runtime needs version_compatible"):
        _engine("--exclude-lean-runtime")
    for bad in ("1x1:1x128", "1x1:4x8:2x8", "a:b:c"):
        with pytest.raises(SystemExit):
            _engine("--profile", bad)
    with pytest.raises(SystemExit):
        _engine("--hardware-compat", "hopper+")
    with pytest.raises(ValueError, match="hardware_compat"):
        EngineSettings(hardware_compat="AMPERE_PLUS")


def test_build_flags_repeat_the_build():
    assert build_flags(EngineSettings()) == ""
    assert build_flags(EngineSettings(profiles=(ProfileSettings(opt_shape=(4, 128)),))) == (
        " --min-shape 1x1 --opt-shape 4x128 --max-shape 32x512")
    eng = EngineSettings(profiles=(LATENCY, THROUGHPUT), hardware_compat="same-cc", version_compatible=True)
    flags = build_flags(eng)
    assert flags == " --profile 1x1:1x128:1x128 --profile 1x1:16x128:32x512 --hardware-compat same-cc --version-compatible"
    assert _engine(*flags.split()) == eng  # the flags give the same settings back
    assert profile_text(THROUGHPUT) == "1x1:16x128:32x512"


def test_manifest_record_and_cuda_version():
    assert build_options(EngineSettings(hardware_compat="ampere+")) == {
        "hardware_compat": "ampere+", "version_compatible": False, "exclude_lean_runtime": False,
        "workspace_mib": 4096, "optimization_level": 3}
    version = cuda_version()  # no libcudart and no tensorrt-cuXX wheel here: None; else "13.0" / "13"
    assert version is None or version.split(".")[0].isdigit()


def test_the_new_fields_leave_earlier_hashes_unchanged_until_set():
    before = {"profiles": list(EngineSettings().profiles), "workspace_mib": 4096,
              "optimization_level": 3, "sparse_weights": None, "timing_cache_dir": "engines/timing_cache"}
    assert settings_hash(EngineSettings()) == settings_hash(before)  # the fields of before this change
    for field, value in (("hardware_compat", "ampere+"), ("version_compatible", True)):
        assert settings_hash(EngineSettings(**{field: value})) != settings_hash(before)
