"""Errors raised by engines/: every failure is an EngineError with one clear message."""
from __future__ import annotations


class EngineError(RuntimeError):
    """Base class: a package, engine, backend or input that cannot be used, and why."""


class BackendUnavailable(EngineError):
    """A backend (TensorRT, TensorRT-RTX, OpenVINO, an ORT execution provider) is not installed."""


class PackageInvalid(EngineError):
    """A model package that is missing, malformed, tampered with or of a newer format."""


class EngineMismatch(EngineError):
    """An engine that does not match its package, the installed TensorRT or this device.

    ``rebuild_command`` is the exact command that builds a matching engine (also in the message).
    """

    def __init__(self, message: str, rebuild_command: str | None = None):
        if rebuild_command:
            message = f"{message}\n  rebuild it with: {rebuild_command}"
        super().__init__(message)
        self.rebuild_command = rebuild_command


class BuildError(EngineError):
    """An engine build that failed: ONNX parse errors, an unsupported precision, out of memory."""


class InputError(EngineError, ValueError):
    """Inputs to ``Engine.run`` with a missing/unknown name, a wrong dtype, rank or size."""


class CudaError(EngineError):
    """A CUDA runtime call that failed (names the call and the CUDA error), or no CUDA at all."""
