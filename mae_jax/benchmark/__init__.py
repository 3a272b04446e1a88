"""Train-step speed: mae_jax's step timed beside the mask-tokens baseline and transformers' PyTorch ViTMAE.

`python -m mae_jax.benchmark` is the command line (`__main__.py`: its flags, and its docstring the usage). The
package holds one part each: `measured.py` (a step to time), `jax_steps.py` (mae_jax's compiled step, the matmul
peak), `torch_steps.py` (the PyTorch side), `measure.py` (the interleaved timing and its figures), `profile.py`
(`--profile`: the device operations of a trace), `process.py` (malloc settings, the backend check) and
`json_output.py` (`--json`). Here: the names other code and the tests use.
"""

from mae_jax.benchmark.jax_steps import assemble, jax_device, jax_step, matmul_peak
from mae_jax.benchmark.json_output import write_json
from mae_jax.benchmark.measure import benchmark, no_peak_note, peak_memory, peak_memory_bytes
from mae_jax.benchmark.measured import Measured
from mae_jax.benchmark.process import require_backend, retain_freed_memory
from mae_jax.benchmark.profile import DeviceOp, device_ops, print_device_ops, trace_steps
from mae_jax.benchmark.torch_steps import TorchStep, parse_torch_steps, torch_steps

__all__ = [
    "DeviceOp",
    "Measured",
    "TorchStep",
    "assemble",
    "benchmark",
    "device_ops",
    "jax_device",
    "jax_step",
    "matmul_peak",
    "no_peak_note",
    "parse_torch_steps",
    "peak_memory",
    "peak_memory_bytes",
    "print_device_ops",
    "require_backend",
    "retain_freed_memory",
    "torch_steps",
    "trace_steps",
    "write_json",
]
