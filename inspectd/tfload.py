"""Import TensorFlow without its start-up noise.

TensorFlow 2.21 prints a few C++ lines (oneDNN notes, CUDA probing) before absl logging is set
up, so TF_CPP_MIN_LOG_LEVEL cannot silence them. They are sent to /dev/null while TensorFlow
loads and initialises its devices; INSPECTD_DEBUG=1 keeps them.
"""

from __future__ import annotations

__all__ = ["import_tensorflow"]

import contextlib
import os
import sys


@contextlib.contextmanager
def _stderr_fd_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """Import tensorflow and keras and initialise the devices, quietly; returns the tf module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ.get("INSPECTD_DEBUG"):
        import tensorflow as tf

        return tf
    with _stderr_fd_to_devnull():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.constant(0)
    return tf
