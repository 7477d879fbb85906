"""Keep the converters' chatter (progress lines, C++ logs, version warnings) off the user's terminal.

The converters print from Python loggers, `warnings`, rich consoles and C++ (straight to file
descriptors 1 and 2), so silencing them means redirecting the descriptors while they run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# Loggers that warn on import about things that do not concern an export (coremltools: no
# macOS runtime here, untested torch/sklearn versions; torchao: optional CUDA kernels).
NOISY_LOGGERS = ("coremltools", "torchao", "absl", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence everything printed inside the block, from Python or C++; errors still propagate."""
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
