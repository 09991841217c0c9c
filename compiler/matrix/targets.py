"""GPU targets of a build matrix: a compute capability ("9.0") or a Ray accelerator label ("H100").

A TensorRT plan runs on the compute capability it was built on, so every target's build runs on
a worker with that GPU. Ray advertises a node's GPU model as the resource
`accelerator_type:<label>` (labels: Ray's `ray.util.accelerators`, docs "Accelerator types");
a node started with `--resources='{"cc_9.0": 1}'` advertises a compute capability directly.
`resources_for` picks the resource a build task asks for from what the cluster has, or says why
none fits (the cell then waits for a target).

Compute capabilities: NVIDIA's CUDA GPUs list (https://developer.nvidia.com/cuda-gpus).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from compiler.errors import CompilerError

# Ray accelerator label (ray.util.accelerators) -> compute capability (NVIDIA's CUDA GPUs list).
ACCELERATOR_CC = {
    "K80": "3.7", "P4": "6.1", "P100": "6.0", "V100": "7.0", "T4": "7.5",
    "A100": "8.0", "A10G": "8.6", "L4": "8.9", "L40S": "8.9",
    "H100": "9.0", "H200": "9.0", "H20": "9.0",
    "B200": "10.0", "GB200": "10.0", "B300": "10.3", "GB300": "10.3", "RTX-PRO-6000": "12.0",
}
ACCELERATOR_PREFIX = "accelerator_type:"
CC_PREFIX = "cc_"
# A build task takes this share of the accelerator resource (it also asks for one whole GPU).
RESOURCE_SHARE = 0.001


@dataclass(frozen=True)
class Target:
    """One GPU type a plan is built for.

    Attributes:
        name: as the spec names it ("H100" or "9.0").
        cc: its compute capability, "major.minor".
        label: the Ray accelerator label, or None when named by compute capability.
    """

    name: str
    cc: str
    label: str | None = None

    @property
    def sm(self) -> str:
        """"sm90" for 9.0: the suffix of this target's plan file (model.sm90.plan)."""
        return "sm" + self.cc.replace(".", "")

    def candidates(self) -> list[str]:
        """The Ray resources that mark a worker able to build for this target, preferred first."""
        labels = [self.label] if self.label else sorted(k for k, v in ACCELERATOR_CC.items() if v == self.cc)
        return [f"{ACCELERATOR_PREFIX}{lab}" for lab in labels] + [f"{CC_PREFIX}{self.cc}"]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cc": self.cc, "label": self.label}


def parse_target(value: Any) -> Target:
    """A `Target` from a spec entry: "9.0" (or 9.0), or a label of `ACCELERATOR_CC` (any case).

    Raises:
        CompilerError: neither, naming the labels known and the compute-capability form.
    """
    text = str(value).strip()
    if re.fullmatch(r"\d{1,2}\.\d", text):
        return Target(text, text)
    label = {k.lower(): k for k in ACCELERATOR_CC}.get(text.lower().removeprefix(ACCELERATOR_PREFIX))
    if label is None:
        raise CompilerError(f"matrix spec: targets: {value!r} is neither a compute capability (e.g. \"9.0\") "
                            f"nor a Ray accelerator label ({', '.join(ACCELERATOR_CC)}); name another GPU by its "
                            "compute capability (https://developer.nvidia.com/cuda-gpus)")
    return Target(label, ACCELERATOR_CC[label], label)


def resources_for(target: Target, cluster: dict[str, float]) -> tuple[dict[str, Any] | None, str]:
    """What a build task for `target` asks Ray for, or None with the reason no worker fits.

    Args:
        target: the GPU type.
        cluster: `ray.cluster_resources()` (resource name -> total quantity).

    Returns:
        ({"num_gpus": 1, "resources": {name: share}}, name) when a worker advertises one of
        `target.candidates()` and the cluster has a GPU; else (None, reason).
    """
    have = [c for c in target.candidates() if cluster.get(c, 0) > 0]
    gpus = cluster.get("GPU", 0)
    if have and gpus >= 1:
        return {"num_gpus": 1, "resources": {have[0]: RESOURCE_SHARE}}, have[0]
    offered = sorted(k for k in cluster if k.startswith((ACCELERATOR_PREFIX, CC_PREFIX))) or ["none"]
    if have:
        why = f"a worker advertises {have[0]} but the cluster has no GPU resource"
    else:
        why = f"no worker advertises {' or '.join(target.candidates())}"
    return None, (f"waiting for a target: {target.name} (compute capability {target.cc}): {why} (cluster: "
                  f"{int(cluster.get('CPU', 0))} CPU, {int(gpus)} GPU, accelerators {', '.join(offered)}); start a "
                  f"worker on such a GPU host: ray start --address=HEAD:6379 (Ray adds accelerator_type:<label> "
                  f"itself) or --resources='{{\"{CC_PREFIX}{target.cc}\": 1}}', and rerun")
