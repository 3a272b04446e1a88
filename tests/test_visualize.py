"""`python -m mae_jax.visualize`: every kind of checkpoint loads, rows are (image, mask ratio), errors are one line."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage import data

from mae_jax import checkpointing, convert, input_pipeline, loop, visualize
from mae_jax.models.mae import MAE
from tests.conftest import REPO, TINY

SIZE, PATCH, PAD = 32, 8, 2  # TINY's image and patch size; reconstruction.grid's padding
MEAN_COLOR = np.round(input_pipeline.IMAGENET_MEAN * 255).astype(np.uint8)  # what a removed patch shows


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: MAE) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("params")
    checkpointing.save_params(directory, TINY, nnx.state(tiny_model))
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A non-square RGB PNG and a grayscale JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).resize((60, 40)).save(folder / "astronaut.png")
    Image.fromarray(data.camera()).resize((40, 50)).save(folder / "camera.jpg")
    return [str(folder / "astronaut.png"), str(folder / "camera.jpg")]


def panel(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    top, left = PAD + row * (SIZE + PAD), PAD + column * (SIZE + PAD)
    return grid[top : top + SIZE, left : left + SIZE].astype(int)


def patches(image: np.ndarray) -> np.ndarray:
    grid = SIZE // PATCH
    return image.reshape(grid, PATCH, grid, PATCH, 3).swapaxes(1, 2).reshape(grid * grid, PATCH, PATCH, 3)


def removed(masked_panel: np.ndarray) -> np.ndarray:
    return (patches(masked_panel) == MEAN_COLOR).all(axis=(1, 2, 3))


def params_of(model: MAE) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_rows_are_images_by_mask_ratio(params_dir: pathlib.Path, photos: list[str], tmp_path: pathlib.Path):
    out = tmp_path / "grid.png"
    visualize.main([f"--params={params_dir}", f"--images={','.join(photos)}", "--mask_ratio=0.5,0.75", f"--out={out}"])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (4 * (SIZE + PAD) + PAD, 4 * (SIZE + PAD) + PAD, 3)

    for image_index, path in enumerate(photos):
        expected = visualize.load_image(path, SIZE).astype(int)
        masks = []
        for ratio_index, num_removed in enumerate((8, 12)):  # 50 % and 75 % of 16 patches
            row = 2 * image_index + ratio_index
            original, masked, recon, pasted = (panel(grid, row, column) for column in range(4))
            assert np.abs(original - expected).max() <= 1
            mask = removed(masked)
            assert mask.sum() == num_removed
            assert np.abs(patches(pasted)[~mask] - patches(original)[~mask]).max() <= 1
            assert np.abs(patches(pasted)[mask] - patches(recon)[mask]).max() <= 1
            masks.append(mask)
        assert (masks[0] <= masks[1]).all()  # the same noise: 75 % removes what 50 % removed, and more


def test_masking_flag_draws_each_strategys_masks(params_dir: pathlib.Path, photos: list[str], tmp_path: pathlib.Path):
    """TINY is 4 x 4 patches: grid keeps patches 0, 2, 8 and 10; block and random each remove 12, differently."""
    removed_by = {}
    for masking in ("random", "block", "grid"):
        out = tmp_path / f"{masking}.png"
        visualize.main([f"--params={params_dir}", f"--images={photos[0]}", f"--masking={masking}", f"--out={out}"])
        removed_by[masking] = removed(panel(np.asarray(Image.open(out)), 0, 1))
        assert removed_by[masking].sum() == 12
    np.testing.assert_array_equal(np.flatnonzero(~removed_by["grid"]), [0, 2, 8, 10])
    assert (removed_by["block"] != removed_by["random"]).any()
    with pytest.raises(SystemExit, match=r"grid masking keeps one patch of every 2 x 2: it needs mask ratio 0\.75"):
        visualize.main([f"--params={params_dir}", "--masking=grid", "--mask_ratio=0.5", f"--out={tmp_path / 'x.png'}"])


def test_demo_photos_by_default(params_dir: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "demo.png"
    visualize.main([f"--params={params_dir}", f"--out={out}"])
    rows = len(input_pipeline.DEMO_PHOTOS)
    assert Image.open(out).size == (4 * (SIZE + PAD) + PAD, rows * (SIZE + PAD) + PAD)
    assert f"{rows} images (astronaut, camera," in capsys.readouterr().out


# Written in another process with 2 devices, as a pod would: the newest checkpoint must restore onto one device.
# The state is a loop.TrainState's tree (importing train in that process would cost seconds of TensorFlow).
WRITE_WORKDIR = """
import sys
import jax, numpy as np, optax
from etils import epath
from flax import nnx
from mae_jax import checkpointing, configuration
from mae_jax.models.mae import MAE
from tests.conftest import tiny_train_config

config = tiny_train_config()
_, params, fixed = nnx.split(nnx.eval_shape(lambda: MAE(configuration.model_config(config), rngs=nnx.Rngs(0))),
                             nnx.Param, ...)
rng = np.random.default_rng(0)  # random values without compiling every initializer
params, fixed = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), (params, fixed))
state = {"step": 0, "params": params, "fixed": fixed, "opt_state": jax.jit(optax.adam(1e-3).init)(params)}
mesh = jax.sharding.Mesh(jax.devices(), ("data",))
state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
manager = checkpointing.make_manager(epath.Path(sys.argv[1]), keep=3)
checkpointing.save(manager, 1, state, config.to_dict())
state["params"] = jax.tree.map(lambda x: x + 1, state["params"])
checkpointing.save(manager, 2, state, config.to_dict())
manager.wait_until_finished()
np.savez(sys.argv[2], *jax.tree.leaves(state["params"]))
"""


def test_workdir_newest_checkpoint_from_two_devices(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture):
    workdir, expected = tmp_path / "workdir", tmp_path / "expected.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    written = subprocess.run(
        [sys.executable, "-c", WRITE_WORKDIR, str(workdir), str(expected)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr[-2000:]
    assert {"step", "params", "fixed", "opt_state"} == {field.name for field in dataclasses.fields(loop.TrainState)}
    assert len(jax.devices()) == 1

    model = visualize.load_model(str(workdir))
    assert "Loaded step 2 of" in capsys.readouterr().out
    saved = np.load(expected)
    for loaded, want in zip(params_of(model), (saved[f"arr_{i}"] for i in range(len(saved.files))), strict=True):
        np.testing.assert_array_equal(loaded, want)
    assert visualize.reconstruct(model, np.zeros((1, SIZE, SIZE, 3), np.uint8), [0.75]).shape == (1, 4, SIZE, SIZE, 3)


def test_official_pth_with_decoder(tiny_model: MAE, tmp_path: pathlib.Path):
    official = convert.to_official(nnx.state(tiny_model))
    for name, flags, norm_pix in [
        ("mae_visualize_tiny.pth", {}, False),  # the released visualization files are trained on pixels
        ("mae_tiny_full.pth", {}, True),
        ("mae_visualize_tiny.pth", {"norm_pix_loss": True}, True),
    ]:
        path = tmp_path / name
        convert.save_pth(str(path), official)
        model = visualize.load_model(str(path), **flags)
        assert model.config.norm_pix_loss is norm_pix
        for loaded, want in zip(params_of(model), params_of(tiny_model), strict=True):
            np.testing.assert_array_equal(loaded, want)


def test_bad_inputs_are_one_line_errors(
    params_dir: pathlib.Path, photos: list[str], tiny_model: MAE, tmp_path: pathlib.Path
):
    encoder_dir = tmp_path / "encoder"
    checkpointing.save_params(encoder_dir, TINY, {"encoder": nnx.state(tiny_model)["encoder"]})
    encoder_pth = tmp_path / "mae_pretrain_tiny.pth"
    convert.save_pth(str(encoder_pth), convert.to_official(nnx.state(tiny_model), encoder_only=True))
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "notes.jpg").write_text("not an image")
    cases = {
        "image missing.jpg does not exist": [f"--params={params_dir}", "--images=missing.jpg"],
        "cannot decode image": [f"--params={params_dir}", f"--images={photos[0]},{tmp_path / 'notes.jpg'}"],
        "keep at least one of the 16 patches": [f"--params={params_dir}", "--mask_ratio=0.75,0.95"],
        "must be in [0, 1)": [f"--params={params_dir}", "--mask_ratio=1"],
        "holds an encoder only (what a run exports": [f"--params={encoder_dir}"],
        "holds an encoder only (like mae_pretrain": [f"--params={encoder_pth}"],
        "is not a parameter directory": [f"--params={tmp_path}"],
        "holds no complete checkpoint": [f"--params={tmp_path / 'empty_run'}"],
        "missing.pth does not exist": [f"--params={tmp_path / 'missing.pth'}"],
    }
    for expected, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            visualize.main([*args, f"--out={tmp_path / 'never.png'}"])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and expected in message and "\n" not in message, (args, message)
    assert not (tmp_path / "never.png").exists()
