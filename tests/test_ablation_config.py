"""configs/ablation.py: each named ablation changes exactly its key of the baseline, and every one validates."""

from __future__ import annotations

import pytest

from configs import ablation
from mae_jax import configuration


def flat(config) -> dict:
    """Dotted key -> value of a ConfigDict."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out |= {f"{key}.{inner}": v for inner, v in flat(value).items()}
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("ablations", "changed"),
    [
        ("mask_ratio=0.5", {"mask_ratio": 0.5}),
        ("masking=block", {"model.masking": "block"}),
        ("masking=grid", {"model.masking": "grid"}),
        ("masking=block,mask_ratio=0.5", {"model.masking": "block", "mask_ratio": 0.5}),
        ("decoder_depth=1", {"model.decoder_depth": 1}),
        ("decoder_width=32", {"model.decoder_width": 32}),
        ("mask_token_in_encoder", {"model.mask_tokens_in_encoder": True}),
        ("target=pixel", {"model.norm_pix_loss": False}),
    ],
)
def test_an_ablation_changes_only_its_key(ablations: str, changed: dict):
    baseline, ablated = flat(ablation.get_config()), flat(ablation.get_config(ablations))
    assert {key: value for key, value in ablated.items() if baseline[key] != value} == changed
    configuration.validate(ablation.get_config(ablations))


def test_the_baseline_is_fashion_mnist_at_32_px_with_both_monitors_and_its_probe_matches():
    config, probe = ablation.get_config(), ablation.get_config("linprobe")
    configuration.validate(config)
    configuration.validate(probe)
    assert (config.dataset.source, config.image_size, config.num_channels) == ("fashion_mnist", 32, 1)
    assert config.evals.knn.every_steps > 0 and config.evals.probe.every_steps > 0
    assert (probe.task, probe.image_size, probe.num_channels, probe.model.variant) == (
        "linprobe",
        config.image_size,
        config.num_channels,
        config.model.variant,
    )
    assert (probe.dataset.mean, probe.dataset.std) == (config.dataset.mean, config.dataset.std)
