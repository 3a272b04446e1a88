"""The PyTorch side of the comparison: transformers' ViTMAEForPreTraining train step (AdamW), eager or
`torch.compile`d, with torch's default or the fused AdamW, as `--torch_steps` asks. torch and transformers are
test extras: they are imported only when a PyTorch step is built."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax
import ml_collections

from mae_jax import configuration, convert, flops
from mae_jax.benchmark.measured import Measured

TORCH_STEP = re.compile(r"(eager|compiled)(\+fused)?")  # an entry of --torch_steps


@dataclasses.dataclass(frozen=True)
class TorchStep:
    """How a PyTorch train step runs: the model eager or `torch.compile`d, AdamW fused or torch's default."""

    compiled: bool
    fused: bool


def parse_torch_steps(entries: Sequence[str]) -> list[TorchStep]:
    """`--torch_steps` entries (`eager`, `compiled`, each with an optional `+fused`) as steps."""
    steps = []
    for entry in entries:
        match = TORCH_STEP.fullmatch(entry)
        if entries.count(entry) > 1:
            raise configuration.ConfigError(f"--torch_steps: {entry!r} is given twice")
        if match is None:
            raise configuration.ConfigError(
                f"--torch_steps: {entry!r} is not eager or compiled with an optional +fused (e.g. eager,compiled+fused)"
            )
        steps.append(TorchStep(compiled=match[1] == "compiled", fused=bool(match[2])))
    return steps


def torch_steps(config: ml_collections.ConfigDict, steps: Sequence[TorchStep], compile_backend: str) -> list[Measured]:
    """transformers' ViTMAEForPreTraining train step (AdamW), once per entry of `steps`: on the GPU when JAX runs on
    one (bf16 autocast with `model.dtype=bfloat16`, as the official code's mixed precision), else on CPU with this
    machine's cores. The steps share one model (parameters and gradients; `torch.compile` wraps the same module),
    each with its own optimizer, so a GPU holds one model however many ways it is timed. Fused AdamW runs on CPU
    too since torch 2.4; each step's name says what its optimizer is."""
    import contextlib

    import torch
    import transformers

    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():  # else PyTorch's figures would come from the CPU
        raise configuration.ConfigError(
            f"--torch: JAX runs on the GPU but torch {torch.__version__} finds no CUDA device: install a CUDA build "
            "of torch, or the comparison would time PyTorch on the CPU"
        )
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_config = configuration.model_config(config)
    hf_config = convert.hf.transformers_config(model_config, config.mask_ratio)
    model = transformers.ViTMAEForPreTraining(hf_config).to(device).train()
    pixels = torch.randn(config.batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    bf16 = config.model.dtype == "bfloat16"
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if on_gpu else "cpu"
    step_flops = flops.train_flops(model_config, config.mask_ratio, config.batch_size)
    measured = []
    for step in steps:
        forward = torch.compile(model, backend=compile_backend) if step.compiled else model
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=1e-4,
            betas=(config.b1, config.b2),
            weight_decay=config.weight_decay,
            fused=True if step.fused else None,  # None: torch's default, for-each on CUDA, a loop on CPU
        )

        def run(forward: torch.nn.Module = forward, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = forward(pixel_values=pixels).loss
            loss.backward()
            opt.step()
            if on_gpu:
                torch.cuda.synchronize()

        how = [device.type] + ["bf16 autocast"] * bf16
        how.append(f"torch.compile {compile_backend}" if step.compiled else "eager")
        how.append("fused AdamW" if opt.defaults["fused"] else "AdamW not fused")
        measured.append(Measured(f"PyTorch ViTMAE ({', '.join(how)})", run, step_flops, device_name))
    return measured
