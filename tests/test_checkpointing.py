"""Checkpoints survive SIGKILL (also mid-save) and SIGTERM, restore onto other device counts, and are guarded."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mae_jax import checkpointing, convert, input_pipeline, loop, train
from mae_jax.main import PREEMPTED_EXIT_CODE
from mae_jax.models.mae import MAE
from tests.conftest import REPO, TINY_MAIN_FLAGS, main_command, run_main, tiny_train_config

RUN = (*TINY_MAIN_FLAGS, "--config.total_steps=10", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1")


def saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def start(workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(main_command(workdir, *RUN), cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(0.002)


def logged_steps(log: pathlib.Path) -> int:
    """Summaries logged so far: lines "[step] key=value, ..." (mae_jax/summaries.py)."""
    return len(re.findall(r"\] \[\d+\] \w+=", log.read_text()))


def saving_now(workdir: pathlib.Path) -> bool:
    folder = workdir / "checkpoints"
    return folder.exists() and any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def test_sigkill_at_any_moment_then_resume_gives_bit_identical_parameters(tmp_path: pathlib.Path):
    reference = run_main(tmp_path / "reference", *RUN)
    assert reference.returncode == 0, reference.stderr[-2000:]

    workdir = tmp_path / "killed"
    moments = {  # when to kill, given the run's log
        "two steps after a completed save": lambda log: (
            (workdir / "checkpoints" / "2").is_dir() and logged_steps(log) >= 4
        ),
        "during a save": lambda log: "Restored step" in log.read_text() and saving_now(workdir),
        "right after resuming": lambda log: logged_steps(log) >= 1,
    }
    kills = []
    for moment, condition in moments.items():
        for _ in range(3):  # a save can finish between seeing it and the kill: try again
            log = tmp_path / f"run{len(kills)}.log"
            process = start(workdir, log)
            wait_for(lambda log=log, condition=condition: condition(log), process)
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills.append((moment, saving_now(workdir)))
            assert len(kills) == 1 or "Restored step" in log.read_text()
            if moment != "during a save" or kills[-1][1]:
                break
        assert moment != "during a save" or kills[-1][1], "no kill interrupted a save in progress"

    final = run_main(workdir, *RUN)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Restored step" in final.stderr
    for ours, theirs in zip(saved_params(workdir, 10), saved_params(tmp_path / "reference", 10), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    print(f"survived {len(kills)} SIGKILLs: {kills}")


def test_sigterm_saves_the_current_step_and_resumes(tmp_path: pathlib.Path):
    log = tmp_path / "run.log"
    process = start(tmp_path, log)
    wait_for(lambda: logged_steps(log) >= 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE
    text = log.read_text()
    preempted_at = int(text.split("preempted at step ")[1].split(":")[0])
    assert preempted_at == logged_steps(log)  # saved at the step it stopped: no step is redone
    assert (tmp_path / "checkpoints" / str(preempted_at)).is_dir()
    resumed = run_main(tmp_path, *RUN)
    assert resumed.returncode == 0 and f"Restored step {preempted_at}" in resumed.stderr


RESTORE_SCRIPT = """
import json, sys
import jax, numpy as np
from mae_jax import train
from tests.conftest import tiny_train_config
state = train.train_and_evaluate(tiny_train_config(total_steps=2, checkpoint_every_steps=2), sys.argv[1])
print(json.dumps({"devices": jax.device_count(), "step": int(state.step),
                  "params": [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(state.params)]}))
"""


def run_on_devices(count: int, workdir: pathlib.Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
    result = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(workdir)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_checkpoint_from_8_devices_restores_onto_4_and_1(tmp_path: pathlib.Path):
    written = run_on_devices(8, tmp_path)
    assert written["devices"] == 8 and written["step"] == 2
    for count in (4, 1):
        restored = run_on_devices(count, tmp_path)
        assert restored["devices"] == count and restored["step"] == 2
        assert restored["params"] == written["params"]


class ZeroImageMakesNaN:
    """normalize() that turns a batch holding an all-black image into NaN: a deterministic injected fault."""

    def __init__(self, normalize):
        self.normalize = normalize

    def __call__(self, images, stats=input_pipeline.IMAGENET_STATS):
        poisoned = jnp.any(jnp.all(images == 0, axis=(1, 2, 3)))
        return jnp.where(poisoned, jnp.nan, self.normalize(images, stats))


BLACK = 5


def poisoned_source(size: int = 64) -> list[dict]:
    """Distinct gray images, one of them (not the first, which the reconstruction grid shows) black."""
    return [
        {"image": np.full((16, 16, 3), 0 if i == BLACK else i + 1, np.uint8), "label": i, "name": str(i)}
        for i in range(size)
    ]


def poisoned_steps(config) -> list[int]:
    """The steps whose batch holds the black image."""
    iterator = iter(input_pipeline.train_dataset(poisoned_source(), config, input_pipeline.SkippedImages()))
    return [step for step in range(1, config.total_steps + 1) if BLACK in next(iterator)["label"]]


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(input_pipeline, "make_source", lambda dataset: poisoned_source())
    monkeypatch.setattr(input_pipeline, "normalize", ZeroImageMakesNaN(input_pipeline.normalize))


def test_injected_nan_stops_the_run_at_its_step_and_is_never_saved(tmp_path: pathlib.Path, poisoned):
    config = tiny_train_config(total_steps=12, checkpoint_every_steps=1, log_every_steps=100)
    bad_step = poisoned_steps(config)[0]
    assert 1 < bad_step < 12
    with pytest.raises(loop.NonFiniteError, match=f"at step {bad_step} "):
        train.train_and_evaluate(config, str(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert max(saved) == bad_step - 1


def test_injected_nan_is_skipped_when_the_config_says_so(tmp_path: pathlib.Path, poisoned):
    config = tiny_train_config(total_steps=12, log_every_steps=100, skip_nonfinite_steps=1)
    bad_steps = poisoned_steps(config)
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 12 and bad_steps
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert int(state.opt_state.total_notfinite) == len(bad_steps)


def test_workdir_of_another_model_is_refused_and_left_alone(tmp_path: pathlib.Path):
    train.train_and_evaluate(tiny_train_config(), str(tmp_path))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    other = tiny_train_config(**{"model.decoder_depth": 2, "image_size": 64})
    with pytest.raises(checkpointing.CheckpointError, match="different model") as error:
        train.train_and_evaluate(other, str(tmp_path))
    assert "image_size: 32 in the checkpoint, 64 now" in str(error.value)
    assert "model.decoder_depth: 1 in the checkpoint, 2 now" in str(error.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_unwritable_workdir_fails_at_start(tmp_path: pathlib.Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(checkpointing.CheckpointError, match="is not writable"):
        train.train_and_evaluate(tiny_train_config(), str(blocker / "run"))


def test_exported_encoder_gives_the_same_features(tmp_path: pathlib.Path):
    state = train.train_and_evaluate(tiny_train_config(), str(tmp_path))
    encoder = checkpointing.load_encoder(tmp_path / train.ENCODER_DIR)
    config, exported = checkpointing.load_params(tmp_path / train.ENCODER_DIR)
    assert list(exported) == ["encoder"] and config.encoder.image_size == 32
    official = convert.to_official(exported)
    assert "blocks.0.attn.qkv.weight" in official and not any(key.startswith("decoder") for key in official)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
    trained = nnx.merge(graphdef, state.params, state.fixed)
    np.testing.assert_array_equal(np.asarray(encoder(images)), np.asarray(trained.encoder(images)))


def test_nan_recovery_the_error_message_suggests_resumes_to_the_end(tmp_path: pathlib.Path, poisoned):
    config = tiny_train_config(total_steps=12, checkpoint_every_steps=1, log_every_steps=100)
    bad_steps = poisoned_steps(config)
    with pytest.raises(loop.NonFiniteError, match=f"at step {bad_steps[0]} ") as error:
        train.train_and_evaluate(config, str(tmp_path))
    suggested = re.search(r"--config\.skip_nonfinite_steps=(\d+)", str(error.value))
    assert suggested, str(error.value)
    config = tiny_train_config(
        total_steps=12, checkpoint_every_steps=1, log_every_steps=100, skip_nonfinite_steps=int(suggested[1])
    )
    state = train.train_and_evaluate(config, str(tmp_path))  # resumes from step bad_steps[0] - 1
    assert int(state.step) == 12
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert int(state.opt_state.total_notfinite) == len(bad_steps)


def test_checkpoint_of_another_train_state_layout_is_a_one_line_error(tmp_path: pathlib.Path):
    """A workdir written by another mae_jax version (e.g. fine-tuning before its position table was trained,
    when it sat in `fixed`) must not resume with an Orbax traceback."""
    manager = checkpointing.make_manager(tmp_path, keep=1)
    old = {"params": {"head": jnp.ones(3)}, "fixed": {"pos_embed": jnp.zeros((1, 5, 4))}}
    checkpointing.save(manager, 1, old, {"batch_size": 8})
    manager.wait_until_finished()
    new = {"params": {"head": jnp.ones(3), "pos_embed": jnp.zeros((1, 5, 4))}, "fixed": {}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), new)
    with pytest.raises(checkpointing.CheckpointError, match="another layout") as raised:
        checkpointing.restore_latest(manager, abstract)
    assert "\n" not in str(raised.value)
