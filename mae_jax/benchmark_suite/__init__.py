"""The GPU measurement in one go: `python -m mae_jax.benchmark_suite --report=FILE [--dry_run] [--budget_s=450]
[--items=KEY,...]` (`launch/gpu_benchmark.sh` installs what is missing first, then runs this).

GPU time comes in short windows, so every measurement of `ITEMS` runs as its own `python -m mae_jax.benchmark
--config=... --json=...` process, in priority order, each with what is left of the time budget as its timeout:
XLA_FLAGS are read once per process, and one failure or hang must not end the rest. An item that fails, times
out or does not fit what is left of the budget stays in the report with the reason (the end of its stderr);
`--items` runs the ones a window left over in the next. The report (markdown, rewritten after every item, so a
window that closes early still leaves one) holds the environment, one table per comparison with its ratios
computed from the items' JSON, the failed and skipped items, and every item's JSON.

Every item runs with `JAX_PLATFORMS=cuda`, after a check that JAX starts that backend (else one line and no
run: JAX would otherwise fall back to the CPU with a warning only); the report names the backend and device of
every figure. All items compute in bfloat16 on ViT-L/16 (configs/vit_large.py) or ViT-H/14
(configs/vit_huge.py), in the configs' default block layout except `layout_other`. Compilation dominates
(ViT-L/16 unrolled: 140-163 s on an H100), so the items share a fresh persistent compilation cache: a later item
whose step an earlier one compiled loads it in seconds (its compile time is then marked as a cache load), and
XLA:GPU's per-fusion autotuning cache, so a new step does not tune the GEMM shapes an earlier one tuned. The two
items whose compile times are compared (`layout_*`) each compile with an empty cache of their own instead, so
neither reuses the other's compilation or autotuning; what they compiled joins the shared cache afterwards.
Items with PyTorch time transformers' ViTMAE twice, interleaved: eager with torch's default AdamW (not fused),
and `torch.compile`d with the fused AdamW. Expected time per item on one H100 or H200, with the unrolled default
(`COMPILE_S` has the guesses for scanned blocks; `Item.estimate_s` computes them): 20 s to start a process, plus the
compile, plus 15 s for eager PyTorch and 90 s for compiling it:

| key | what | expected |
|---|---|---|
| layout_default | d. ViT-L/16 batch 128, the default block layout, compiled with an empty cache | 170 s |
| layout_other | d. the same with `model.scan_blocks` flipped, in its own process and empty cache | 60 s |
| L16_b128_torch | a. ViT-L/16 batch 128 with `--torch` (step from the cache) | 130 s |
| L16_b256_torch | a. ViT-L/16 batch 256 with `--torch` | 275 s |
| L16_b128 | the baseline of c, e and f: ViT-L/16 batch 128 alone (step from the cache) | 25 s |
| cudnn | c. `--config.model.attention=cudnn` | 170 s |
| autodiff | e. `--config.model.kernels=autodiff`: jax's backward passes instead of the custom VJPs | 170 s |
| cmdbuf_off | f. `--xla_gpu_enable_command_buffer=` (no CUDA graphs) | 170 s |
| cmdbuf_loops | f. `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL` (loops in CUDA graphs too) | 170 s |
| lhs | f. `--xla_gpu_enable_latency_hiding_scheduler=true` | 170 s |
| H14_b128, H14_b256 | b. ViT-H/14 batch 128 and 256 | 220 s each |
| H14_b128_torch, H14_b256_torch | b. the same with `--torch` (steps from the cache) | 130 s each |

About 2200 s in all: the default budget of 450 s (a window of 8 minutes, the install included) covers the
first three; the report lists the rest with the `--items` command for the next window. With scanned blocks the
default, about 1250 s.

`--dry_run` runs the same table on the CPU (`JAX_PLATFORMS=cpu`, named so in the report) with a tiny model (mu/4
at 32 px, batch / 32, one round, MFU against a nominal 1 TFLOP/s, XLA:CPU's cheaper optimization level, PyTorch
compiled with torch.compile's `aot_eager` backend: no code generation) so that every item's plumbing runs: about
2 minutes on a busy 2-core machine. cuDNN attention needs a GPU and is only listed; XLA:CPU parses the GPU flags
and ignores them, so those items run there too. Every module here imports only the standard library at
the top: `--missing_requirements` and `--jax_pins` serve the install step before anything else is.

The parts: `items.py` (the items and their commands, expected times), `runner.py` (the processes, the budget,
the caches), `backend.py` (the GPU check), `outcome.py` (what became of an item), `tables.py` and `cells.py`
(the comparison tables), `report.py` (the markdown report), `install.py` (the install step's questions) and
`__main__.py` (the command line). Here: the names that other code and the tests import.
"""

from mae_jax.benchmark_suite.backend import gpu_backend
from mae_jax.benchmark_suite.install import jax_for_gpu, jax_pins, missing_requirements
from mae_jax.benchmark_suite.items import ITEMS, Item
from mae_jax.benchmark_suite.outcome import Outcome
from mae_jax.benchmark_suite.report import write_report
from mae_jax.benchmark_suite.runner import item_env, run_item, run_suite
from mae_jax.benchmark_suite.tables import TABLES, Table

__all__ = [
    "ITEMS",
    "TABLES",
    "Item",
    "Outcome",
    "Table",
    "gpu_backend",
    "item_env",
    "jax_for_gpu",
    "jax_pins",
    "missing_requirements",
    "run_item",
    "run_suite",
    "write_report",
]
