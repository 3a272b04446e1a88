"""What runs leave behind: the pretrained encoder export kept current, and a downstream run's classifier
written without PyTorch."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
from etils import epath
from flax import nnx

from mae_jax import checkpointing, train
from mae_jax.models.mae import MAE
from mae_jax.models.vit import EncoderConfig
from tests.conftest import REPO, TINY, tiny_train_config
from tests.test_input_pipeline import write_fashion_mnist
from tests.test_optim import OfficialClassifier


def pure(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def assert_trees_equal(actual: dict, expected: dict) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------
# The pretrained encoder export
# ---------------------------------------------------------------------------------------------------
def test_a_run_ending_later_than_the_export_refreshes_it(tmp_path: pathlib.Path):
    """A workdir whose encoder export is of step 2 and whose newest checkpoint is of step 4 (a run extended
    after its first export) ends with the encoder of step 4."""
    early, run = tmp_path / "early", tmp_path / "run"
    train.train_and_evaluate(tiny_train_config(total_steps=2), str(early))
    train.train_and_evaluate(tiny_train_config(total_steps=4), str(run))
    shutil.rmtree(run / train.ENCODER_DIR)
    shutil.copytree(early / train.ENCODER_DIR, run / train.ENCODER_DIR)  # the export a run to step 2 left
    _, stale = checkpointing.load_params(run / train.ENCODER_DIR)

    state = train.train_and_evaluate(tiny_train_config(total_steps=4), str(run))  # restores step 4, ends there
    assert int(state.step) == 4
    _, exported = checkpointing.load_params(run / train.ENCODER_DIR)
    assert not np.array_equal(exported["encoder"]["cls_token"][...], stale["encoder"]["cls_token"][...])
    expected = {**pure(state.params)["encoder"], **pure(state.fixed)["encoder"]}
    assert_trees_equal(pure(exported)["encoder"], expected)
    assert checkpointing.exported_step(run / train.ENCODER_DIR) == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".encoder")) == []  # no leftovers


def test_a_crash_while_exporting_leaves_the_previous_export(tmp_path: pathlib.Path, monkeypatch):
    directory = tmp_path / "encoder"
    first, second = MAE(TINY, rngs=nnx.Rngs(1)), MAE(TINY, rngs=nnx.Rngs(2))
    _, params, fixed = nnx.split(first, nnx.Param, ...)
    checkpointing.export_encoder(directory, TINY, params, fixed, step=1)
    real_save_params = checkpointing._save_param_tree

    def crash_after_writing(*args, **kwargs):
        real_save_params(*args, **kwargs)
        raise KeyboardInterrupt("killed before the export was complete")

    _, new_params, new_fixed = nnx.split(second, nnx.Param, ...)
    monkeypatch.setattr(checkpointing, "_save_param_tree", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.export_encoder(directory, TINY, new_params, new_fixed, step=2)
    assert checkpointing.exported_step(directory) == 1
    _, kept = checkpointing.load_params(directory)
    assert_trees_equal(pure(kept)["encoder"], pure(nnx.state(first.encoder)))

    monkeypatch.setattr(checkpointing, "_save_param_tree", real_save_params)
    checkpointing.export_encoder(directory, TINY, new_params, new_fixed, step=2)  # over the crash's leftovers
    assert checkpointing.exported_step(directory) == 2
    _, replaced = checkpointing.load_params(directory)
    assert_trees_equal(pure(replaced)["encoder"], pure(nnx.state(second.encoder)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


class CopyThenDeleteFilesystem:
    """Moves and removals of the directories beside an export done as on `gs://`, one object at a time.

    gcsfs's `mv` (what etils' rename is there) copies every object and then deletes the originals, in no
    guaranteed order: here small objects finish copying first (concurrent copies) and large ones are deleted
    first, the orders that leave the small marker files longest beside an incomplete `params/`. `crash_at`
    stops the run before that object operation, as a preempted VM would.
    """

    def __init__(self, root: pathlib.Path, crash_at: int | None = None):
        self.root, self.crash_at, self.operations = root, crash_at, 0

    def install(self, monkeypatch) -> None:
        path_type = type(epath.Path(self.root))
        real_rename, real_rmtree = path_type.rename, path_type.rmtree

        def rename(path, target):
            if pathlib.Path(path).parent != self.root:  # Orbax's own moves inside the staging directory
                return real_rename(path, target)
            self.move(pathlib.Path(path), pathlib.Path(target))
            return epath.Path(target)

        def rmtree(path, missing_ok: bool = False):
            if pathlib.Path(path).parent != self.root:
                return real_rmtree(path, missing_ok=missing_ok)
            return self.remove_tree(pathlib.Path(path))

        monkeypatch.setattr(path_type, "rename", rename)
        monkeypatch.setattr(path_type, "rmtree", rmtree)

    def _object_operation(self) -> None:
        if self.operations == self.crash_at:
            raise KeyboardInterrupt(f"preempted before object operation {self.crash_at}")
        self.operations += 1

    @staticmethod
    def _objects(directory: pathlib.Path) -> list[pathlib.Path]:
        return sorted((path for path in directory.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)

    def move(self, source: pathlib.Path, target: pathlib.Path) -> None:
        for item in self._objects(source):
            self._object_operation()
            copy = target / item.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, copy)
        self.remove_tree(source)

    def remove_tree(self, directory: pathlib.Path) -> None:
        for item in reversed(self._objects(directory)):
            self._object_operation()
            item.unlink()
        shutil.rmtree(directory)  # a bucket has no folders: they go with their last object


def test_an_export_interrupted_while_moving_on_gcs_is_not_trusted(tmp_path: pathlib.Path, monkeypatch):
    """At every object operation of replacing an export on a copy-then-delete filesystem, a crash leaves an
    export that is either whole (what `exported_step` says is there, and `load_params` gives it) or not
    trusted (no step: the run redoes it); the rerun then completes it."""
    first, second = MAE(TINY, rngs=nnx.Rngs(1)), MAE(TINY, rngs=nnx.Rngs(2))
    exports = {step: nnx.split(model, nnx.Param, ...)[1:] for step, model in ((1, first), (2, second))}
    encoders = {step: pure(nnx.state(model.encoder)) for step, model in ((1, first), (2, second))}
    checkpointing.export_encoder(tmp_path / "previous" / "encoder", TINY, *exports[1], step=1)

    def replace_export(case: pathlib.Path, crash_at: int) -> None:
        shutil.copytree(tmp_path / "previous", case)
        with monkeypatch.context() as patch:
            CopyThenDeleteFilesystem(case, crash_at).install(patch)
            checkpointing.export_encoder(case / "encoder", TINY, *exports[2], step=2)

    # A crash before each object operation in turn, until the export gets through (the number of files
    # OCDBT writes varies from save to save).
    crash_at = 0
    while True:
        case = tmp_path / f"crash_{crash_at}"
        try:
            replace_export(case, crash_at)
        except KeyboardInterrupt:
            pass
        else:
            break
        step = checkpointing.exported_step(case / "encoder")
        if step is not None:
            _, trusted = checkpointing.load_params(case / "encoder")
            assert_trees_equal(pure(trusted)["encoder"], encoders[step])
        elif (case / "encoder" / checkpointing.MODEL_CONFIG_FILE).exists():  # the previous export, before it goes
            _, whole = checkpointing.load_params(case / "encoder")
            assert_trees_equal(pure(whole)["encoder"], encoders[1])
        else:
            with pytest.raises(FileNotFoundError, match=r"model\.json is missing"):
                checkpointing.load_params(case / "encoder")
        crash_at += 1
    assert crash_at > 10  # the move and the removal were many object operations, each a crash point
    assert checkpointing.exported_step(case / "encoder") == 2

    case = tmp_path / f"crash_{crash_at - 1}"  # before deleting the staging copy's last object
    assert checkpointing.exported_step(case / "encoder") is None  # the new export, complete but not yet marked
    checkpointing.export_encoder(case / "encoder", TINY, *exports[2], step=2)  # the rerun, over the leftovers
    assert checkpointing.exported_step(case / "encoder") == 2
    _, redone = checkpointing.load_params(case / "encoder")
    assert_trees_equal(pure(redone)["encoder"], encoders[2])
    assert sorted(path.name for path in case.iterdir()) == ["encoder"]


# ---------------------------------------------------------------------------------------------------
# Downstream runs without PyTorch
# ---------------------------------------------------------------------------------------------------
def test_finetuning_without_torch_writes_the_classifier_as_safetensors(tmp_path: pathlib.Path):
    """`pip install -e .` brings no PyTorch: a fine-tuning run through `main` must still finish and write
    its classifier, in the official layout that loads into the official model."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    data, workdir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    write_fashion_mnist(data, num_train=16, num_test=8)
    command = [
        sys.executable,
        "-m",
        "mae_jax.main",
        "--config=configs/fashion_mnist.py:finetune",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data}",
        "--config.total_steps=2",
        "--config.warmup_steps=1",
        "--config.batch_size=8",
        "--config.evals.classification.batch_size=8",
        "--config.input.num_threads=2",
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    result = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PyTorch is not installed: no classifier.pth" in result.stderr  # the shim did block torch
    assert not (workdir / "classifier.pth").exists()

    state_dict = safetensors.numpy.load_file(workdir / "classifier.safetensors")
    official = OfficialClassifier(EncoderConfig.from_variant("mu/4", 28, 1), num_classes=10)  # grayscale
    expected = {name: tuple(value.shape) for name, value in official.state_dict().items()}
    assert {name: value.shape for name, value in state_dict.items()} == expected
    official.load_state_dict(safetensors.torch.load_file(workdir / "classifier.safetensors"), strict=True)
    np.testing.assert_array_equal(official.pos_embed.detach().numpy(), state_dict["pos_embed"])
