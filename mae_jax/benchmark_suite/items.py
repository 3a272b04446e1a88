"""What the suite measures: each item (`Item`, `ITEMS`) with the benchmark command it runs, normally and in a
dry run, and the seconds it is expected to take, which the runner weighs against the budget."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = (sys.executable, "-m", "mae_jax.benchmark")
VIT_L, VIT_H = "configs/vit_large.py", "configs/vit_huge.py"
COMMON_ARGS = ("--config.model.dtype=bfloat16",)
TORCH_ARGS = ("--torch", "--torch_steps=eager,compiled+fused")  # the README's comparison, and PyTorch at its best
DRY_RUN_ARGS = (
    "--config.model.variant=mu/4", "--config.image_size=32", "--config.model.decoder_width=32",
    "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--rounds=1", "--peak_tflops=1",
)  # fmt: skip
# inductor's C++ code generation takes a minute for the tiny model on a 2-core CPU: the dry run traces only
DRY_RUN_TORCH_ARGS = ("--torch_compile_backend=aot_eager",)
DRY_RUN_BATCH_DIVISOR = 32
# XLA:CPU compiles the tiny steps in half the time: the dry run's speed is not the point
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Expected seconds on one H100/H200 (README: ViT-L/16 unrolled compiled in 140-163 s; the rest are guesses).
STARTUP_S = 20  # interpreter, JAX and the GPU up, parameters initialized, warm-up and timed rounds
TORCH_S = 15  # torch imported, ViTMAE built, its eager steps
TORCH_COMPILE_S = 90  # torch.compile (inductor) of ViTMAE's forward and backward
CACHE_LOAD_S = 5  # a compiled step loaded from the persistent cache
COMPILE_S = {"L/16": {False: 150, True: 40}, "H/14": {False: 200, True: 50}}  # by variant, then scanned
DRY_RUN_S = 20  # per item on a CPU, tiny model; PyTorch adds TORCH_S
VARIANTS = {VIT_L: "L/16", VIT_H: "H/14"}


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark process: `config` at `batch` in bf16, with further flags and XLA_FLAGS. `flip_layout`: the
    blocks in the layout the configs do not default to; `own_cache`: compiled with an empty cache of its own (a
    compile time to compare), not the one the items share."""

    key: str
    what: str
    config: str
    batch: int
    args: tuple[str, ...] = ()
    xla_flags: str = ""
    torch: bool = False
    flip_layout: bool = False
    own_cache: bool = False
    needs_gpu: bool = False

    @property
    def program(self) -> tuple:
        """What decides the compiled mae_jax step: equal programs share the persistent cache. PyTorch adds
        measurements, not a different step."""
        return self.config, self.batch, self.args, self.xla_flags, self.flip_layout

    def estimate_s(self, compiled: set[tuple], scanned: bool, dry_run: bool) -> float:
        """Expected seconds; `compiled`: the programs earlier items of this run compiled into the shared cache;
        `scanned`: the configs' default layout."""
        torch = TORCH_S + TORCH_COMPILE_S if self.torch else 0
        if dry_run:
            return DRY_RUN_S + (TORCH_S if self.torch else 0)
        compile_s = COMPILE_S[VARIANTS[self.config]]
        cached = self.program in compiled and not self.own_cache
        return STARTUP_S + (CACHE_LOAD_S if cached else compile_s[scanned != self.flip_layout]) + torch

    def command(self, benchmark: Sequence[str], json_path: pathlib.Path, dry_run: bool, scanned: bool) -> list[str]:
        """The benchmark's command line; `scanned`: the configs' default layout (which `flip_layout` flips)."""
        batch = max(1, self.batch // DRY_RUN_BATCH_DIVISOR) if dry_run else self.batch
        flags = [f"--config={self.config}", *COMMON_ARGS, f"--config.batch_size={batch}", *self.args]
        flags += [f"--config.model.scan_blocks={not scanned}"] * self.flip_layout
        if self.torch:
            flags += [*TORCH_ARGS, *(DRY_RUN_TORCH_ARGS if dry_run else ())]
        return [*benchmark, *flags, *(DRY_RUN_ARGS if dry_run else ()), f"--json={json_path}"]


ITEMS = (
    Item("layout_default", "ViT-L/16, batch 128, default block layout", VIT_L, 128, own_cache=True),
    Item("layout_other", "ViT-L/16, batch 128, other block layout", VIT_L, 128, flip_layout=True, own_cache=True),
    Item("L16_b128_torch", "ViT-L/16, batch 128, with PyTorch", VIT_L, 128, torch=True),
    Item("L16_b256_torch", "ViT-L/16, batch 256, with PyTorch", VIT_L, 256, torch=True),
    Item("L16_b128", "ViT-L/16, batch 128 (baseline)", VIT_L, 128),
    Item("cudnn", "cuDNN attention", VIT_L, 128, ("--config.model.attention=cudnn",), needs_gpu=True),
    Item("autodiff", "jax's autodiff backward passes", VIT_L, 128, ("--config.model.kernels=autodiff",)),
    Item("cmdbuf_off", "command buffers off", VIT_L, 128, xla_flags="--xla_gpu_enable_command_buffer="),
    Item(
        "cmdbuf_loops",
        "command buffers with loops",
        VIT_L,
        128,
        xla_flags="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    ),
    Item("lhs", "latency-hiding scheduler", VIT_L, 128, xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"),
    Item("H14_b128", "ViT-H/14, batch 128", VIT_H, 128),
    Item("H14_b256", "ViT-H/14, batch 256", VIT_H, 256),
    Item("H14_b128_torch", "ViT-H/14, batch 128, with PyTorch", VIT_H, 128, torch=True),
    Item("H14_b256_torch", "ViT-H/14, batch 256, with PyTorch", VIT_H, 256, torch=True),
)
