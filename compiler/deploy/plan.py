"""A TensorRT plan's header, read without TensorRT: the entry point for deployment.

`read_plan_header(path_or_bytes)` returns a `PlanHeader` whose `version` is the TensorRT version
that built the plan (major, minor, patch, build), read the way `trtexec --getPlanVersionOnly`
reads it (`printPlanVersion` in NVIDIA/TensorRT's `samples/common/sampleEngines.cpp`): plans
from TensorRT 8.6 on start with the little-endian uint32 0x74727466 ("ftrt"), have serialization
layout 0 in the uint32 at offset 4, and carry the version in bytes 24..27. Anything else raises
`DeploymentRefusedError(check="plan format")`, "... is not a TensorRT 8.6+ plan", naming the file.

The implementation is `compiler.build.plan_header` (the builder records the header of each plan it
builds, and `compiler.build` may not import `compiler.deploy`); this module is what deployment code
imports. `compiler.deploy.checks` compares the version with the installed TensorRT.
"""

from __future__ import annotations

from compiler.build.plan_header import HEADER_BYTES, PLAN_MAGIC, VERSION_OFFSET, PlanHeader, parse_version, read_plan_header

__all__ = ["HEADER_BYTES", "PLAN_MAGIC", "VERSION_OFFSET", "PlanHeader", "parse_version", "read_plan_header"]
