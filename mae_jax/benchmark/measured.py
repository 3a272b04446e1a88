"""`Measured`: a step to time, as the JAX steps, the PyTorch steps and the matmul peak all hand it to the
interleaved timing, so that each is run, timed and reported alike."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


@dataclasses.dataclass
class Measured:
    """A step to time: `run()` does one step and waits for it; `flops` per step."""

    name: str
    run: Callable[[], None]
    flops: float
    device: str  # what ran it: "gpu (NVIDIA H100 80GB HBM3)", "cuda (NVIDIA H100 80GB HBM3)", "cpu"
    compile_s: float | None = None  # lower + compile of a JAX step
    times: list[float] = dataclasses.field(default_factory=list)

    def time_once(self) -> float:
        start = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - start)
        return self.times[-1]
