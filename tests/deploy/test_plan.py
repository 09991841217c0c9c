"""compiler.deploy.plan: a plan's header read without TensorRT, on headers written from the
documented layout (tests/deploy/plan_headers.py), and every kind of file that is not a plan."""

from __future__ import annotations

import pytest

from compiler.deploy.plan import HEADER_BYTES, PLAN_MAGIC, VERSION_OFFSET, PlanHeader, parse_version, read_plan_header
from compiler.errors import EXIT_BAD_INPUT, EXIT_REFUSED, CompilerError, DeploymentRefusedError
from tests.deploy.plan_headers import header_bytes, write_header


def test_the_tag_is_ftrt_and_the_version_sits_in_bytes_24_to_27():
    assert PLAN_MAGIC.to_bytes(4, "little") == b"ftrt"
    assert (HEADER_BYTES, VERSION_OFFSET) == (28, 24)
    raw = header_bytes((11, 4, 0, 106))
    assert raw[:4] == b"ftrt" and list(raw[24:28]) == [11, 4, 0, 106]


def test_reads_the_version_from_bytes_and_from_a_file(tmp_path):
    header = read_plan_header(header_bytes((11, 4, 0, 106)))
    assert header == PlanHeader((11, 4, 0, 106))
    assert header.version_string == "11.4.0.106"
    assert header.to_dict() == {"version": [11, 4, 0, 106]}
    path = write_header(tmp_path / "model.plan", (10, 16, 1, 11))
    assert read_plan_header(path).version == (10, 16, 1, 11)
    assert read_plan_header(str(path)).version_string == "10.16.1.11"
    assert read_plan_header(header_bytes((8, 6, 1, 6))).version == (8, 6, 1, 6)  # the first such layout


def test_only_the_first_28_bytes_count(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(header_bytes((11, 1, 0, 106)) + b"\xff" * 1000)
    assert read_plan_header(path).version == (11, 1, 0, 106)


@pytest.mark.parametrize("raw, found", [
    (header_bytes((11, 4, 0, 106))[:27], "27 bytes, shorter than a plan header (28 bytes)"),
    (b"", "0 bytes"),
    (b"\x08\x07\x12\x07pytorch" + bytes(40), "the tag 0x"),  # an ONNX protobuf
    (header_bytes((11, 4, 0, 106), tag=int.from_bytes(b"ftrt", "big")), "instead of 0x74727466"),  # byte order
    (header_bytes((11, 4, 0, 106), layout=1), "serialization layout 1 at offset 4"),
    (header_bytes((8, 5, 3, 1)), "version bytes 8.5.3.1 (before 8.6"),
    (header_bytes((7, 1, 0, 0)), "before 8.6"),
])
def test_anything_else_is_refused_naming_the_file(tmp_path, raw, found):
    path = tmp_path / "engine.trt"
    path.write_bytes(raw)
    with pytest.raises(DeploymentRefusedError) as err:
        read_plan_header(path)
    e = err.value
    assert e.check == "plan format" and e.exit_code == EXIT_REFUSED
    assert f"{path} is not a TensorRT 8.6+ plan" in str(e)
    assert found in e.found
    assert "python -m compiler build --bundle" in e.fix


def test_bytes_are_named_in_the_refusal():
    with pytest.raises(DeploymentRefusedError, match="the plan bytes is not a TensorRT 8.6"):
        read_plan_header(b"short")
    with pytest.raises(DeploymentRefusedError, match="upload.plan is not a TensorRT 8.6"):
        read_plan_header(b"\0" * 28, name="upload.plan")


def test_a_missing_file_is_bad_input(tmp_path):
    with pytest.raises(CompilerError, match="no such plan file") as err:
        read_plan_header(tmp_path / "absent.plan")
    assert err.value.exit_code == EXIT_BAD_INPUT and not isinstance(err.value, DeploymentRefusedError)


def test_parse_version():
    assert parse_version("11.4.0.106") == (11, 4, 0, 106)
    assert parse_version("10.16.1") == (10, 16, 1)
    assert parse_version("11.4.0.106.post1") == (11, 4, 0, 106)
    assert parse_version("11.4.0rc1") == (11, 4, 0)
    with pytest.raises(CompilerError):
        parse_version("unknown")
