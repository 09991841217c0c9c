"""The header of a serialized TensorRT engine (a plan), read without TensorRT.

Layout, as TensorRT's own `trtexec --getPlanVersionOnly` reads it (`printPlanVersion` in
`samples/common/sampleEngines.cpp` of NVIDIA/TensorRT, commit a892d22 of 2026-07-07; the
layout holds for plans from TensorRT 8.6 on):

| offset | size | content |
|---|---|---|
| 0 | uint32, little-endian | the plan tag 0x74727466 (the bytes "ftrt") |
| 4 | uint32, little-endian | the serialization layout; trtexec reads a version only when it is 0 |
| 24 | 4 x uint8 | the TensorRT version that built the plan: major, minor, patch, build |

trtexec needs at least 28 bytes ("Plan file is incorrect" otherwise), refuses another tag
("Failed to verify a plan tag.") and another layout ("Serialization version is not
supported."); `read_plan_header` refuses the same files, with a message that names the file.

The reader lives in `compiler.build` so that the builder can record the header of the plan it
has just built (`compiler.build` may not import `compiler.deploy`); `compiler.deploy.plan`
re-exports it for deployment.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import CompilerError, DeploymentRefusedError

PLAN_MAGIC = 0x74727466  # "ftrt" as a little-endian uint32 at offset 0
HEADER_BYTES = 28  # what trtexec reads: the version is in bytes 24..27
VERSION_OFFSET = 24
SERIALIZATION_LAYOUT = 0  # the uint32 at offset 4 for which trtexec reads bytes 24..27
FIRST_VERSION = (8, 6)  # plans before TensorRT 8.6 have another layout
EXPECTED = ("a TensorRT 8.6+ plan: the uint32 0x74727466 ('ftrt') at offset 0, serialization layout 0 "
            "at offset 4 and the TensorRT version in bytes 24..27 (trtexec --getPlanVersionOnly)")
REBUILD = ("build the plan with TensorRT 8.6 or later on the target GPU: `python -m compiler build "
           "--bundle DIR` (or `python -m compiler build --onnx MODEL.onnx`); an ONNX model or a bundle "
           "folder is read by `python -m compiler inspect PATH`")


@dataclass(frozen=True)
class PlanHeader:
    """What a plan's header says.

    Attributes:
        version: the TensorRT version that built the plan: (major, minor, patch, build), each
            one byte of the header (bytes 24..27).
    """

    version: tuple[int, int, int, int]

    @property
    def version_string(self) -> str:
        """e.g. "11.4.0.106", the spelling of `tensorrt.__version__`."""
        return ".".join(str(v) for v in self.version)

    def to_dict(self) -> dict[str, list[int]]:
        """{"version": [major, minor, patch, build]} (the manifest's `plan_header`)."""
        return {"version": list(self.version)}


def read_plan_header(source: Path | str | bytes, name: str | None = None) -> PlanHeader:
    """Read the TensorRT version from a plan's first 28 bytes (no TensorRT, no GPU needed).

    Args:
        source: the plan file (only its first 28 bytes are read) or the plan's bytes.
        name: how the error messages name `source` when it is bytes (default "the plan bytes").

    Returns:
        The plan's header.

    Raises:
        CompilerError: `source` is a path that does not exist or cannot be read (exit 1).
        DeploymentRefusedError: (check "plan format", exit 4) `source` is not a TensorRT 8.6+
            plan: shorter than 28 bytes, another tag at offset 0, another serialization layout
            at offset 4, or a version before 8.6 in bytes 24..27. The message names the file,
            what it found there and how to get a readable plan.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        head, label = bytes(source[:HEADER_BYTES]), name or "the plan bytes"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            with path.open("rb") as f:
                head = f.read(HEADER_BYTES)
        except FileNotFoundError:
            raise CompilerError(f"no such plan file: {path}") from None
        except OSError as e:
            raise CompilerError(f"cannot read plan file {path}: {e}") from None
    if len(head) < HEADER_BYTES:
        _refuse(label, f"{len(head)} bytes, shorter than a plan header ({HEADER_BYTES} bytes)")
    magic, layout = struct.unpack_from("<II", head, 0)
    if magic != PLAN_MAGIC:
        _refuse(label, f"the tag 0x{magic:08x} ({head[:4]!r}) at offset 0 instead of 0x{PLAN_MAGIC:08x} (b'ftrt')")
    if layout != SERIALIZATION_LAYOUT:
        _refuse(label, f"serialization layout {layout} at offset 4, which trtexec does not read either")
    version = tuple(head[VERSION_OFFSET:HEADER_BYTES])
    if version[:2] < FIRST_VERSION:
        _refuse(label, f"version bytes {'.'.join(map(str, version))} (before 8.6: another layout)")
    return PlanHeader(version)  # type: ignore[arg-type]


def _refuse(label: str, found: str) -> None:
    raise DeploymentRefusedError("plan format", f"{label} is not a TensorRT 8.6+ plan: {found}", EXPECTED, REBUILD)


def parse_version(text: str) -> tuple[int, ...]:
    """The leading integers of a TensorRT version string: "11.4.0.106" -> (11, 4, 0, 106).

    Raises:
        CompilerError: `text` does not start with a number.
    """
    parts = []
    for piece in str(text).strip().split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    if not parts:
        raise CompilerError(f"not a TensorRT version: {text!r} (expected e.g. 11.4.0.106)")
    return tuple(parts)
