"""A short fixed pretraining whose logged losses must match the values pinned in `tests/data/pinned_loss_curve.json`.

Any change to the numerics (data order or augmentation, masking noise, model, loss, optimizer, schedule) moves
the curve, and this test names the first step that moved with both values. After an intended change, re-pin
with `python tests/test_pinned_curve.py` and commit the JSON with the change that moved it (docs/operations.md).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import jax
import numpy as np
from tensorboard.backend.event_processing import event_accumulator

PINNED = pathlib.Path(__file__).parent / "data" / "pinned_loss_curve.json"
# Relative tolerance: XLA:CPU's float32 results may differ in the last bits between CPU generations; the
# smallest change tried, norm-pix eps 1e-6 -> 1e-5, moved the losses by 7e-5.
RTOL = 1e-5
RUN = {  # the demo's photographs and model, shrunk (tests/conftest.py: tiny_train_config) and run 30 steps
    "total_steps": 30,
    "warmup_steps": 5,
    "log_every_steps": 5,
    "checkpoint_every_steps": 1000,
    "evals.reconstruction.every_steps": 1000,
    "compilation_cache": False,
}


def logged_losses(workdir: pathlib.Path) -> dict[int, float]:
    """Step -> the loss the run logged (the mean over the steps since the previous summary)."""
    from mae_jax import train
    from tests.conftest import tiny_train_config

    train.train_and_evaluate(tiny_train_config(**RUN), str(workdir))
    losses = {}
    for events in sorted(workdir.glob("events.out.tfevents.*")):
        summaries = event_accumulator.EventAccumulator(str(events))
        summaries.Reload()
        losses |= {event.step: event.value for event in summaries.Scalars("loss")}
    return losses


def test_logged_losses_match_the_pinned_curve(tmp_path: pathlib.Path):
    pinned = {int(step): loss for step, loss in json.loads(PINNED.read_text())["loss"].items()}
    losses = logged_losses(tmp_path)
    assert sorted(losses) == sorted(pinned), f"logged steps {sorted(losses)}, pinned {sorted(pinned)}"
    for step in sorted(pinned):
        assert np.isclose(losses[step], pinned[step], rtol=RTOL, atol=0), (
            f"step {step}: loss {losses[step]:.7g} now, {pinned[step]:.7g} pinned (rtol {RTOL}); if the change "
            "was intended, re-pin with `python tests/test_pinned_curve.py`"
        )


if __name__ == "__main__":  # re-pin
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
    with tempfile.TemporaryDirectory() as workdir:
        losses = logged_losses(pathlib.Path(workdir))
    PINNED.parent.mkdir(exist_ok=True)
    record = {"jax": jax.__version__, "run": RUN, "loss": {str(step): loss for step, loss in sorted(losses.items())}}
    PINNED.write_text(json.dumps(record, indent=1) + "\n")
    print(f"pinned {len(losses)} losses to {PINNED}: {record['loss']}")
