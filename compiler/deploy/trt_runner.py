"""Running a plan with TensorRT's runtime API (needs TensorRT 11, a GPU and cuda-python or PyTorch).

The calls, from TensorRT 11's Python API (`tensorrt.Runtime`, `ICudaEngine`, `IExecutionContext`;
the named-tensor API of the 10.x/11.x migration guides):

    runtime = trt.Runtime(logger); runtime.engine_host_code_allowed = allow_host_code
    engine = runtime.deserialize_cuda_engine(plan_bytes)        # None on failure
    context = engine.create_execution_context()
    context.set_optimization_profile_async(profile_index, stream)
    context.set_input_shape(name, shape); context.set_tensor_address(name, device_pointer)
    context.get_tensor_shape(output_name)                         # resolved once inputs are set
    context.execute_async_v3(stream)

Device memory comes from cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`) when
importable, else from PyTorch's CUDA tensors; neither is imported before a plan is run. This
module is imported only by `compiler.deploy.runtime` when the TensorRT backend is chosen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import CompilerError, TensorRTUnavailableError

# TensorRT DataType names -> NumPy dtypes (TensorRT's own `trt.nptype` mapping).
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


def _cudart() -> Any | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    return cudart


class TensorRTRunner:
    """One deserialized plan and its execution context.

    Args:
        plan: the plan file (its checks already passed: hashes, version, compute capability, host code).
        allow_host_code: `IRuntime.engine_host_code_allowed` (a version-compatible plan with the
            lean runtime embedded needs it).

    Raises:
        TensorRTUnavailableError: TensorRT, or both cuda-python and PyTorch, are missing.
        CompilerError: TensorRT cannot deserialize the plan.
    """

    def __init__(self, plan: Path, allow_host_code: bool = False) -> None:
        import tensorrt as trt

        self.trt = trt
        self.cudart = _cudart()
        if self.cudart is None and importlib.util.find_spec("torch") is None:
            raise TensorRTUnavailableError("running a plan needs device memory from cuda-python or PyTorch: "
                                           "`pip install cuda-python`")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.runtime.engine_host_code_allowed = bool(allow_host_code)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise CompilerError(f"TensorRT could not deserialize {plan} (see TensorRT's messages above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def run(self, feeds: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        """Run one request (shapes already checked against optimization profile `profile`).

        Args:
            feeds: {input name: array} in the engine's input dtypes, (batch, sequence).
            profile: the optimization profile admitting every shape (`check_request_shape`).

        Returns:
            {output name: host array}.
        """
        if self.cudart is not None:
            return self._run_cudart(feeds, profile)
        return self._run_torch(feeds, profile)

    def _dtype(self, name: str) -> Any:
        return NUMPY_DTYPES[self.engine.get_tensor_dtype(name).name]

    def _run_torch(self, feeds: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        import torch

        stream = torch.cuda.current_stream()
        self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        keep = {}
        for name in self.inputs:
            keep[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], self._dtype(name))).cuda()
            self.context.set_input_shape(name, tuple(keep[name].shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            keep[name] = torch.from_numpy(np.empty(shape, self._dtype(name))).cuda()
            self.context.set_tensor_address(name, keep[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CompilerError("TensorRT's execute_async_v3 failed (see TensorRT's messages above)")
        stream.synchronize()
        return {name: keep[name].cpu().numpy() for name in self.outputs}

    def _run_cudart(self, feeds: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        rt = self.cudart

        def ok(result: Any) -> Any:
            err, *rest = result if isinstance(result, tuple) else (result,)
            if int(err) != 0:
                raise CompilerError(f"CUDA runtime error {err}")
            return rest[0] if rest else None

        stream = ok(rt.cudaStreamCreate())
        host, device = {}, {}
        try:
            self.context.set_optimization_profile_async(profile, int(stream))
            for name in self.inputs:
                host[name] = np.ascontiguousarray(feeds[name], self._dtype(name))
                self.context.set_input_shape(name, host[name].shape)
            for name in self.outputs:
                host[name] = np.empty(tuple(self.context.get_tensor_shape(name)), self._dtype(name))
            for name, array in host.items():
                device[name] = ok(rt.cudaMalloc(max(array.nbytes, 1)))
                self.context.set_tensor_address(name, int(device[name]))
            for name in self.inputs:
                ok(rt.cudaMemcpy(device[name], host[name].ctypes.data, host[name].nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
            if not self.context.execute_async_v3(int(stream)):
                raise CompilerError("TensorRT's execute_async_v3 failed (see TensorRT's messages above)")
            ok(rt.cudaStreamSynchronize(stream))
            for name in self.outputs:
                ok(rt.cudaMemcpy(host[name].ctypes.data, device[name], host[name].nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        finally:
            for pointer in device.values():
                rt.cudaFree(pointer)
            rt.cudaStreamDestroy(stream)
        return {name: host[name] for name in self.outputs}
