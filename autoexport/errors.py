"""Errors the CLI turns into a one-paragraph message and an exit code instead of a traceback."""

from __future__ import annotations

import signal

# Exit codes, stable for scripts and CI.
EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_EXPORT_FAILED = 3


def first_line(text: str) -> str:
    """The first line of a (possibly multi-line) message, surrounding blanks stripped: for one-line logs."""
    return text.strip().splitlines()[0] if text.strip() else ""


def signal_name(exit_code: int) -> str:
    """The signal a child died on, from its negative exit code (subprocess/multiprocessing): "SIGSEGV", or
    "signal N" for one Python has no name for."""
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


class AutoExportError(Exception):
    """Base class: `str(err)` is written for the user, `exit_code` is what the CLI returns."""

    exit_code = EXIT_EXPORT_FAILED


class UserInputError(AutoExportError):
    """Something the user supplied (config, checkpoint, sample, flag, output dir) is wrong."""

    exit_code = EXIT_BAD_INPUT


class ExportFailedError(AutoExportError):
    """torch.export or the ONNX translation could not handle the model."""

    exit_code = EXIT_EXPORT_FAILED


class ParityFailedError(AutoExportError):
    """An exported artifact does not reproduce eager PyTorch within tolerance."""

    exit_code = EXIT_PARITY_FAILED
