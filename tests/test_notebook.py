"""The Colab notebook runs headless on a small checkpoint and draws the reconstruction figures."""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from flax import nnx
from nbclient import NotebookClient
from PIL import Image

from mae_jax import checkpointing
from mae_jax.models.mae import MAE
from tests.conftest import REPO, TINY

NOTEBOOK = REPO / "notebooks" / "mae_visualize.ipynb"


def test_notebook_draws_reconstructions(tiny_model: MAE, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    checkpointing.save_params(tmp_path / "params", TINY, nnx.state(tiny_model))
    figure = tmp_path / "figure.png"
    monkeypatch.setenv("MAE_PARAMS", str(tmp_path / "params"))
    monkeypatch.setenv("MAE_FIGURE", str(figure))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"

    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "ViT mu/8 MAE at 32 px" in "".join(out.get("text", "") for out in code[2].outputs)
    figures = [cell for cell in code if any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert len(figures) == 4  # the input image, one mask ratio, several, the three masking strategies
    width, height = Image.open(figure).size
    assert width / height == pytest.approx(12 / (3 * 3.2), rel=0.02)  # 4 columns by 3 mask ratios
