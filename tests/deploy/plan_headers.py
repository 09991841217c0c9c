"""Plan *headers* written from the documented layout, for tests (never a plan: no engine follows).

Layout (NVIDIA/TensorRT `samples/common/sampleEngines.cpp`, `printPlanVersion`, as
`trtexec --getPlanVersionOnly` reads it): uint32 little-endian tag 0x74727466 ("ftrt") at
offset 0, uint32 serialization layout 0 at offset 4, bytes 24..27 = major, minor, patch, build.
"""

from __future__ import annotations

import struct
from pathlib import Path

TAG = 0x74727466


def header_bytes(version: tuple[int, int, int, int], tag: int = TAG, layout: int = 0) -> bytes:
    """The 28 header bytes of a plan built by TensorRT `version` (bytes 8..23 left zero)."""
    return struct.pack("<II16x4B", tag, layout, *version)


def write_header(path: Path, version: tuple[int, int, int, int], **kw: int) -> Path:
    """`header_bytes` written to `path` (a test fixture; it holds the header only)."""
    path.write_bytes(header_bytes(version, **kw))
    return path
