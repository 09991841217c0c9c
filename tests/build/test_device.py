"""compiler/build/device.py: the GPU through the CUDA driver API, without PyTorch.

On a machine without the NVIDIA driver, `find_gpu` must say so and name the fix; the string
helpers are checked against values worked out by hand from the CUDA driver API reference. On a
machine with the driver (marker `gpu`), the result is checked against `nvidia-smi`.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys

import pytest

from compiler.build.device import (
    CUDA_ERROR_INSUFFICIENT_DRIVER,
    CUDA_ERROR_NO_DEVICE,
    DRIVER_LIBRARY,
    GpuInfo,
    compute_capability_string,
    device_name,
    driver_version_string,
    find_gpu,
    result_reason,
)


def _driver_loads() -> bool:
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return False
    return True


DRIVER = _driver_loads()


@pytest.mark.skipif(DRIVER, reason=f"{DRIVER_LIBRARY} loads here: the no-driver path cannot run")
def test_find_gpu_without_driver_names_the_library_and_the_fix():
    reason = find_gpu()
    assert isinstance(reason, str)
    assert reason.startswith(f"no NVIDIA driver: {DRIVER_LIBRARY} cannot be loaded")
    assert "install the NVIDIA driver" in reason and "nvidia-smi" in reason


def test_find_gpu_imports_no_pytorch():
    code = "import sys, compiler.build.device as d; d.find_gpu(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_driver_version_string_decodes_1000_major_plus_10_minor():
    assert driver_version_string(12040) == "12.4"
    assert driver_version_string(13000) == "13.0"
    assert driver_version_string(11080) == "11.8"
    assert driver_version_string(12090) == "12.9"


def test_compute_capability_and_name_buffer():
    assert compute_capability_string(9, 0) == "9.0"
    assert compute_capability_string(12, 1) == "12.1"
    assert device_name(b"NVIDIA H200\x00\x00stale bytes") == "NVIDIA H200"
    assert device_name(b"NVIDIA A100-SXM4-40GB") == "NVIDIA A100-SXM4-40GB"  # no NUL at all


def test_result_reason_names_call_error_and_fix():
    no_device = result_reason("cuInit", CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE")
    assert no_device.startswith("cuInit failed with CUDA_ERROR_NO_DEVICE (100)")
    assert "CUDA_VISIBLE_DEVICES" in no_device
    old = result_reason("cuInit", CUDA_ERROR_INSUFFICIENT_DRIVER)
    assert old.startswith("cuInit failed with CUresult (35)") and "too old" in old
    other = result_reason("cuDeviceGetName", 999, "CUDA_ERROR_UNKNOWN")
    assert "cuDeviceGetName failed with CUDA_ERROR_UNKNOWN (999)" in other
    assert "install the NVIDIA driver" in other


def test_gpu_info_dict_is_the_manifest_entry():
    info = GpuInfo("NVIDIA H200", "9.0", "13.0")
    assert info.to_dict() == {"name": "NVIDIA H200", "compute_capability": "9.0",
                              "driver_version": "13.0"}


@pytest.mark.gpu
@pytest.mark.skipif(not DRIVER, reason=f"no NVIDIA driver ({DRIVER_LIBRARY} does not load)")
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi is not installed")
def test_find_gpu_agrees_with_nvidia_smi():
    # nvidia-smi numbers GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES: device 0 of CUDA
    # must be one of the GPUs it lists.
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()
    gpus = {tuple(part.strip() for part in line.split(",")) for line in listed}
    gpu = find_gpu()
    assert isinstance(gpu, GpuInfo), gpu
    assert (gpu.name, gpu.compute_capability) in gpus
    assert float(gpu.driver_version) >= 12.0
    reason = find_gpu(ordinal=4096)
    assert isinstance(reason, str) and reason.startswith("CUDA device 4096 does not exist")
