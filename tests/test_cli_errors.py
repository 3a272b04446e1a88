"""Every command line fails on bad input in one line (`error: ...` or argparse's usage error), never a traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mae_jax import input_pipeline
from tests.conftest import REPO, TINY_MAIN_FLAGS, run_main


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, returncode: int = 1) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == returncode, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# The --config file
# ---------------------------------------------------------------------------------------------------
MISSING_CONFIG = "error: cannot load the --config file: [Errno 2] No such file or directory: 'configs/vit_bas.py'"


@pytest.mark.parametrize("overrides", [(), ("--config.batch_size=8",)], ids=["alone", "with an override"])
def test_config_file_typo_is_one_line(tmp_path: pathlib.Path, overrides: tuple[str, ...]):
    result = run_module("mae_jax.main", "--config=configs/vit_bas.py", f"--workdir={tmp_path}", *overrides)
    assert_one_line_error(result, MISSING_CONFIG)
    assert not (tmp_path / "checkpoints").exists()


def test_config_file_without_get_config_is_one_line(tmp_path: pathlib.Path):
    config_file = tmp_path / "not_a_config.py"
    config_file.write_text("BATCH_SIZE = 8\n")
    result = run_module("mae_jax.main", f"--config={config_file}", f"--workdir={tmp_path}")
    assert_one_line_error(result, f"error: the --config file {config_file} defines no get_config()")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("configs/ablation.py:stripes=1", "ValueError: unknown ablation 'stripes' in 'stripes=1': use mask_ratio,"),
        ("configs/ablation.py:mask_ratio=high", "ValueError: ablation 'mask_ratio=high': bad value 'high'"),
        ("configs/fashion_mnist.py:probe", "ValueError: downstream task 'probe' must be one of"),
    ],
)
def test_config_file_whose_get_config_refuses_its_argument_is_one_line(tmp_path: pathlib.Path, config, message):
    result = run_module("mae_jax.main", f"--config={config}", f"--workdir={tmp_path}")
    assert_one_line_error(result, f"error: get_config() of the --config file failed: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--config=configs/vit_bas.py",), MISSING_CONFIG),
        (("--config=configs/demo.py", "--config.batch_sise=8"), "error: bad config override: unknown key batch_sise"),
        (("--config=configs/demo.py", "--config.mask_ratio=1.0"), "error: mask_ratio=1.0 must be in [0, 1)"),
    ],
    ids=["config file typo", "override typo", "bad value"],
)
def test_benchmark_reports_bad_config_in_one_line(args: tuple[str, ...], message: str):
    assert_one_line_error(run_module("mae_jax.benchmark", *args), message)


def test_benchmark_torch_mode_without_pytorch_is_one_line_before_compiling():
    """torch and transformers are test extras: a plain install asking for --torch gets one line before anything
    runs, not a traceback once the mae_jax step has compiled."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "--config=configs/demo.py", "--torch"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "error: --torch compares with transformers' ViTMAE and needs torch")
    assert "device:" not in result.stdout  # stopped before the benchmark's first line


# The benchmark as a plain install runs it: no torch to be found.
WITHOUT_TORCH = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name == "torch" else find_spec(name, *args)
sys.modules["torch"] = None
runpy.run_module("mae_jax.benchmark", run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------------------------------------------
# The other command lines
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arg", "message"),
    [("--images=0", "'0' is not a positive int"), ("--workers=1,0", "'0' is not a positive int")],
)
def test_input_benchmark_refuses_what_cannot_be_measured(arg: str, message: str):
    result = run_module("mae_jax.input_benchmark", arg)
    assert_one_line_error(
        result, f"input_benchmark.py: error: argument {arg.partition('=')[0]}: {message}", returncode=2
    )


def test_visualize_refuses_an_out_it_cannot_write_before_loading_anything(tmp_path: pathlib.Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_module("mae_jax.visualize", f"--params={tmp_path / 'missing'}", f"--out={blocker / 'grid.png'}")
    assert_one_line_error(result, f"error: cannot create the folder of --out {blocker / 'grid.png'}")


# ---------------------------------------------------------------------------------------------------
# Data that cannot be trained on
# ---------------------------------------------------------------------------------------------------
def image_folder(root: pathlib.Path, readable: int, corrupt: int) -> pathlib.Path:
    """root/train/a/ with `corrupt` files that are not images (first in name order), then `readable` gray PNGs."""
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(corrupt):
        (folder / f"c{i}.jpg").write_bytes(b"not a jpeg " * i)
    for i in range(readable):
        Image.fromarray(np.full((40, 48, 3), 30 * (i + 1), np.uint8)).save(folder / f"r{i}.png")
    return root


def folder_dataset(root: pathlib.Path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"source": "folder", "name": "folder", "split": "train", "data_dir": str(root)})


def test_folder_of_corrupt_images_is_one_line_error_through_main(tmp_path: pathlib.Path):
    root = image_folder(tmp_path / "data", readable=0, corrupt=3)
    folder = ("--config.dataset.source=folder", f"--config.dataset.data_dir={root}")
    result = run_main(tmp_path / "run", *TINY_MAIN_FLAGS, *folder)
    assert_one_line_error(
        result, f"error: none of the first 3 images of the dataset decodes (first: {root}/train/a/c0.jpg"
    )
    assert not (tmp_path / "run").exists()  # refused before the workdir is touched


def test_fixed_eval_images_takes_the_readable_ones_however_few(tmp_path: pathlib.Path):
    source = input_pipeline.make_source(folder_dataset(image_folder(tmp_path, readable=2, corrupt=3)))
    images = input_pipeline.fixed_eval_images(source, 8, 32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0, 0, 0], [30, 60])


def test_fewer_images_than_hosts_is_one_line_error_at_start(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    dataset = folder_dataset(image_folder(tmp_path, readable=2, corrupt=0))
    assert len(input_pipeline.make_source(dataset)) == 2
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="holds 2 examples, fewer than the 4 hosts"):
        input_pipeline.make_source(dataset)
