"""The GPU an engine is built for, found through the CUDA driver API (no PyTorch, no CUDA toolkit).

TensorRT tunes an engine for one GPU model: the manifest records that GPU, and the timing cache
is kept per GPU name and compute capability. A deployment host has the NVIDIA driver and
TensorRT but may have no PyTorch, so the GPU is found through the driver's own library,
`libcuda.so.1` (`nvcuda.dll` on Windows), loaded with `ctypes`. The calls used, all from the
CUDA Driver API reference, section "Device Management" / "Initialization" / "Version
Management" (https://docs.nvidia.com/cuda/cuda-driver-api/):

    CUresult cuInit(unsigned int flags)
    CUresult cuDriverGetVersion(int *driverVersion)           # 1000 * major + 10 * minor
    CUresult cuDeviceGetCount(int *count)
    CUresult cuDeviceGet(CUdevice *device, int ordinal)       # CUdevice is an int
    CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
    CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
    CUresult cuGetErrorName(CUresult error, const char **pStr)

`find_gpu()` returns a `GpuInfo`, or a sentence saying why no GPU can be used and how to fix
it. The string helpers below are pure and unit-tested without a driver.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import asdict, dataclass

# CUdevice_attribute values (cuda.h).
COMPUTE_CAPABILITY_MAJOR = 75
COMPUTE_CAPABILITY_MINOR = 76

# CUresult values that have a fix worth naming (cuda.h).
CUDA_SUCCESS = 0
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803

DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
DRIVER_HINT = ("install the NVIDIA driver (CUDA 13 needs driver 580 or later) and check that "
               "`nvidia-smi` lists the GPU")
_NAME_BYTES = 256


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the driver reports it.

    Attributes:
        name: the device name, e.g. "NVIDIA H100 80GB HBM3".
        compute_capability: "major.minor", e.g. "9.0" (Hopper), "8.6" (Ampere GA10x).
        driver_version: the newest CUDA version the installed driver supports, e.g. "13.0"
            (cuDriverGetVersion), not the driver's own release number.
    """

    name: str
    compute_capability: str
    driver_version: str

    def to_dict(self) -> dict[str, str]:
        """The fields as a JSON-ready dict (the manifest's `gpu` entry)."""
        return asdict(self)


def driver_version_string(encoded: int) -> str:
    """The CUDA version that `cuDriverGetVersion` encodes as 1000 * major + 10 * minor.

    Args:
        encoded: e.g. 12040.

    Returns:
        e.g. "12.4"; 13000 gives "13.0".
    """
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def compute_capability_string(major: int, minor: int) -> str:
    """"major.minor" from the two `cuDeviceGetAttribute` values (attributes 75 and 76)."""
    return f"{major}.{minor}"


def device_name(buffer: bytes) -> str:
    """The device name in a `cuDeviceGetName` buffer: the bytes before the first NUL, as UTF-8."""
    return buffer.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def result_reason(call: str, code: int, error_name: str | None = None) -> str:
    """Why a driver call failed, and what to do about it.

    Args:
        call: the driver function that failed, e.g. "cuInit".
        code: its CUresult.
        error_name: the name `cuGetErrorName` gives the code (e.g. "CUDA_ERROR_NO_DEVICE"), if
            the driver could name it.

    Returns:
        One sentence naming the call, the error and the fix.
    """
    what = f"{call} failed with {error_name or 'CUresult'} ({code})"
    if code == CUDA_ERROR_NO_DEVICE:
        return (f"{what}: the NVIDIA driver sees no CUDA GPU; check `nvidia-smi` and that "
                "CUDA_VISIBLE_DEVICES, if set, names a GPU")
    if code in (CUDA_ERROR_INSUFFICIENT_DRIVER, CUDA_ERROR_SYSTEM_DRIVER_MISMATCH):
        return f"{what}: the NVIDIA driver is too old or does not match its kernel module; {DRIVER_HINT}"
    return f"{what}; {DRIVER_HINT}"


class _Driver:
    """The few driver calls `find_gpu` makes; each raises `_DriverError` with the reason."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.lib = library

    def call(self, name: str, *args: object) -> None:
        code = getattr(self.lib, name)(*args)
        if code != CUDA_SUCCESS:
            raise _DriverError(result_reason(name, code, self.error_name(code)))

    def error_name(self, code: int) -> str | None:
        text = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(text)) != CUDA_SUCCESS or not text.value:
            return None
        return text.value.decode()

    def integer(self, name: str, *args: object) -> int:
        """The int that driver function `name` writes through its first (pointer) argument."""
        out = ctypes.c_int()
        self.call(name, ctypes.byref(out), *args)
        return out.value


class _DriverError(Exception):
    pass


def find_gpu(ordinal: int = 0) -> GpuInfo | str:
    """The CUDA device `ordinal`, as the NVIDIA driver reports it.

    Device 0 is the one TensorRT builds on unless the process selects another; the ordinal
    counts the devices left visible by CUDA_VISIBLE_DEVICES.

    Args:
        ordinal: the device index, 0 <= ordinal < the number of visible devices.

    Returns:
        A `GpuInfo`, or, when no GPU can be used, a reason string: the driver library is not
        installed (names `libcuda.so.1` and how to install the driver), the driver sees no GPU
        (names CUDA_VISIBLE_DEVICES), the driver is too old, or fewer devices than `ordinal`+1.
    """
    try:
        library = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError as exc:
        return (f"no NVIDIA driver: {DRIVER_LIBRARY} cannot be loaded ({exc}); {DRIVER_HINT}")
    driver = _Driver(library)
    try:
        driver.call("cuInit", ctypes.c_uint(0))
        version = driver_version_string(driver.integer("cuDriverGetVersion"))
        count = driver.integer("cuDeviceGetCount")
        if ordinal >= count:
            return (f"CUDA device {ordinal} does not exist: the NVIDIA driver (CUDA {version}) "
                    f"sees {count} GPU(s); check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
        device = driver.integer("cuDeviceGet", ctypes.c_int(ordinal))
        name = ctypes.create_string_buffer(_NAME_BYTES)
        driver.call("cuDeviceGetName", name, ctypes.c_int(_NAME_BYTES), ctypes.c_int(device))
        major = driver.integer("cuDeviceGetAttribute", ctypes.c_int(COMPUTE_CAPABILITY_MAJOR),
                               ctypes.c_int(device))
        minor = driver.integer("cuDeviceGetAttribute", ctypes.c_int(COMPUTE_CAPABILITY_MINOR),
                               ctypes.c_int(device))
    except _DriverError as exc:
        return str(exc)
    return GpuInfo(device_name(name.raw), compute_capability_string(major, minor), version)
