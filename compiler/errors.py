"""Typed errors. Each says what happened, what was expected, and the next step.

The CLI prints `CompilerError`s without a traceback and exits with `exit_code`. The exit
statuses a script can rely on (`python -m compiler ...`; through `make` every failure is 2, so
`report.json`'s `build` section records the status and code of the last build attempt):

| code | meaning |
|---|---|
| 0 | success |
| 1 | bad input or a refused result: the message names the problem and the fix |
| 2 | the TensorRT-ready ONNX and report are written, but TensorRT or a GPU is missing here |
| 3 | internal error (a bug): the traceback is printed; please report it |
| 4 | refused by a deployment check (`compiler.deploy`): a file's hash, the plan's TensorRT version, the GPU's compute capability, a shape outside the optimization profile, host code not allowed, NaN/Inf from the backend under `run --check` where the FP32 reference gives none; the message names what was found, what was expected and the fix |
| 130 | interrupted (Ctrl-C); artifacts are written atomically, nothing half-written stays |
"""

from __future__ import annotations

EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_TENSORRT, EXIT_INTERNAL, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class CompilerError(Exception):
    """Base class for errors that the CLI reports as one clear message."""

    exit_code = EXIT_BAD_INPUT


class UnknownModelError(CompilerError, ValueError):
    """A model name that is neither registered, nor a local directory, nor loadable."""


class SettingsError(CompilerError, ValueError):
    """A setting that does not fit this model or its data (e.g. a layer pattern matching no layer)."""


class InvalidOnnxError(CompilerError, ValueError):
    """An ONNX file that cannot be read or does not pass `onnx.checker`."""


class ExportParityError(CompilerError):
    """ONNX Runtime and PyTorch disagree beyond tolerance on one or more outputs, or the exported
    graph does not run at one of the parity shapes.

    Attributes:
        failures: list of (output name, batch, sequence, max abs difference).
        run_error: ONNX Runtime's message where the graph failed to run (then `failures` holds
            the shape it failed at, difference inf), else None.
    """

    def __init__(self, failures: list[tuple[str, int, int, float]], atol: float,
                 run_error: str | None = None) -> None:
        self.failures = failures
        self.atol = atol
        self.run_error = run_error
        if run_error is not None:
            where = ", ".join(f"batch={b} sequence={s}" for _, b, s, _ in failures)
            message = (f"exported ONNX fails in ONNX Runtime at {where}: {run_error}\n"
                       "The tracing exporter fixed a size or an index that depends on the input's length "
                       "(data-dependent control flow in the model's Python, e.g. a sequence pooled or "
                       "bucketed by length), so the graph is wrong at other shapes. This architecture "
                       "cannot be compiled with dynamic shapes; export its encoder without that "
                       "step, or use another checkpoint.")
        else:
            lines = [f"  {name} at batch={b} sequence={s}: max abs diff {d:.3g} > atol {atol:g}"
                     for name, b, s, d in failures]
            message = ("exported ONNX disagrees with PyTorch (FP32):\n" + "\n".join(lines)
                       + "\nCheck for ops the exporter traces as constants (data-dependent control flow), "
                       "or raise --parity-atol if the difference is expected.")
        super().__init__(message)

    def __reduce__(self):  # picklable: the export stage may run in a child process
        return (type(self), (self.failures, self.atol, self.run_error))


class DataError(CompilerError, ValueError):
    """Calibration or evaluation text that cannot be read or yields too few samples."""


class PrecisionError(CompilerError):
    """The precision pass cannot convert a graph (unsupported construct)."""


class VerificationError(CompilerError):
    """Verify refused the variant (NaN/Inf on real text where the FP32 graph gives none): the
    report is written, nothing is built or bundled from it."""


class TensorRTUnavailableError(CompilerError):
    """TensorRT's builder or a CUDA GPU is missing; the TensorRT-ready ONNX is still written."""

    exit_code = EXIT_NO_TENSORRT


class EngineBuildError(CompilerError):
    """TensorRT's ONNX parser or builder failed."""


class DeploymentRefusedError(CompilerError):
    """A deployment check refused a bundle, plan or request before anything was loaded.

    Attributes:
        check: what was checked, e.g. "file hash", "TensorRT version", "compute capability".
        found / expected: what the check saw and what it needed.
        fix: the command or step that fixes it.
    """

    exit_code = EXIT_REFUSED

    def __init__(self, check: str, found: str, expected: str, fix: str) -> None:
        self.check, self.found, self.expected, self.fix = check, found, expected, fix
        super().__init__(f"refused ({check}): found {found}; expected {expected}.\nFix: {fix}")

    def __reduce__(self):  # picklable: raised inside Ray tasks and child processes
        return (type(self), (self.check, self.found, self.expected, self.fix))
