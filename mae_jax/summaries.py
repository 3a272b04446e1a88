"""Run summaries: every process logs them; the process given an events directory also writes TensorBoard events.

A summary's log line is "[step] key=value, ..." (keys sorted, floats to 6 significant digits), the format of
clu's LoggingWriter that people and tests/test_multihost.py read. Events are written with tensorboardX, a
pure-Python event writer, so that no run imports TensorFlow (1.3 GB installed, about 4 s to import) to write
them; TensorBoard reads them as before. tensorboardX's writer module imports torch where it is installed, only
to accept torch tensors: it is imported here with torch hidden (`_tensorboardx`), so that a JAX process loads no
torch (1.3 s, and CUDA libraries on GPU hosts) to write numpy summaries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
from absl import logging
from etils import epath


def _tensorboardx() -> ModuleType:
    """tensorboardX, imported without torch unless torch is loaded already: a `None` in `sys.modules` makes
    its `import torch` raise the ImportError it catches (it then takes numpy arrays only, all it gets here).
    torch is importable again afterwards, for whatever needs it."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


class Writer:
    """Logs scalars and images; with `events_dir` (process 0's workdir) also writes them there as events."""

    def __init__(self, events_dir: epath.PathLike | None):
        self._events_dir = None if events_dir is None else os.fspath(events_dir)
        self._event_files = 0  # opened so far: each file gets its own name suffix
        self._events: Any = None  # tensorboardX's writer of the current event file
        if self._events_dir is not None:
            self._event_writer()  # a run that cannot write its events fails at set-up, before compiling

    def _event_writer(self) -> Any:
        """The open tensorboardX writer (a new event file after a `flush`); None on processes that only log."""
        if self._events is None and self._events_dir is not None:
            # tensorboardX names files by the second: a suffix keeps a file opened after a flush from
            # replacing the one closed in the same second.
            self._event_files += 1
            self._events = _tensorboardx().SummaryWriter(self._events_dir, filename_suffix=f".{self._event_files}")
        return self._events

    def write_scalars(self, step: int, scalars: Mapping[str, float | int]) -> None:
        values = (f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"
                  for key, value in sorted(scalars.items()))  # fmt: skip
        logging.info("[%d] %s", step, ", ".join(values))
        if events := self._event_writer():
            for key, value in scalars.items():
                events.add_scalar(key, value, step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> (N, H, W, C), uint8 or floats in [0, 1]; TensorBoard shows the N as one grid."""
        logging.info("[%d] Got images: %s.", step, {key: value.shape for key, value in images.items()})
        if events := self._event_writer():
            for key, value in images.items():
                events.add_images(key, value, step, dataformats="NHWC")

    def flush(self) -> None:
        """Writes out every summary so far. tensorboardX's own flush leaves queued events unwritten; closing
        its writer does not, and a later summary opens a new event file (TensorBoard reads them together)."""
        logging.flush()
        if self._events is not None:
            self._events.close()
            self._events = None
