"""Reconstruction grids from a trained MAE, as in the paper's figures.

    python -m mae_jax.visualize --params=PATH [--images=a.jpg,b.png] [--mask_ratio=0.75,0.9] --out=grid.png

PATH is a parameter directory (`model.json` + `params/`), a training workdir (its newest checkpoint), or an
official `.pth` that holds a decoder (`mae_visualize_vit_*.pth`, `*_full.pth`). Rows are images x mask
ratios; columns original / masked / reconstruction / reconstruction with the visible patches pasted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax import checkpointing, configuration, convert, input_pipeline, reconstruction
from mae_jax.models.mae import MAE, MAEConfig, num_kept
from mae_jax.models.vit import Compute

# Official files trained on raw pixels (no norm-pix loss), whose names say so.
PIXEL_LOSS_PREFIX = "mae_visualize_"


class VisualizeError(ValueError):
    """An input that cannot be visualized; the message is one line saying why."""


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def load_model(path: str, norm_pix_loss: bool | None = None) -> MAE:
    """The whole MAE (the decoder is needed) from a parameter directory, a training workdir or an official .pth.

    `norm_pix_loss` applies to `.pth` files only, which cannot say how they were trained; left out, it is
    False for `mae_visualize_*` files (trained on pixels) and True otherwise. The model computes in float32
    with XLA attention whatever it was trained with, so a checkpoint from any accelerator runs anywhere.
    """
    location = epath.Path(path)
    if location.suffix == ".pth":
        config, state = _from_pth(location, norm_pix_loss)
    elif (location / checkpointing.MODEL_CONFIG_FILE).exists():
        config, state = _from_params_dir(location)
    elif (location / "checkpoints").is_dir():
        config, state = _from_workdir(location)
    else:
        raise VisualizeError(
            f"{path} is not a parameter directory (model.json + params/), a training workdir (checkpoints/) "
            "or an official .pth file"
        )
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


def _portable(config: MAEConfig) -> MAEConfig:
    return dataclasses.replace(config, compute=Compute())


def _from_pth(path: epath.Path, norm_pix_loss: bool | None) -> tuple[MAEConfig, nnx.State]:
    if not path.is_file():
        raise VisualizeError(f"{path} does not exist")
    if norm_pix_loss is None:
        norm_pix_loss = not path.name.startswith(PIXEL_LOSS_PREFIX)
    state_dict = convert.load_pth(str(path))
    if "decoder_embed.weight" not in state_dict:
        raise VisualizeError(
            f"{path} holds an encoder only (like mae_pretrain_vit_*.pth): reconstructions need the decoder; "
            "use mae_visualize_vit_*.pth or *_full.pth"
        )
    try:
        config = _portable(convert.infer_config(state_dict, norm_pix_loss=norm_pix_loss))
        return config, convert.from_official(state_dict, config, encoder_only_ok=False)
    except ValueError as error:
        raise VisualizeError(f"{path}: {error}") from error


def _from_params_dir(path: epath.Path) -> tuple[MAEConfig, nnx.State]:
    config, state = checkpointing.load_params(path)
    if "decoder" not in state:
        raise VisualizeError(
            f"{path} holds an encoder only (what a run exports to WORKDIR/encoder): reconstructions need the "
            "decoder; pass the training workdir or a whole-MAE parameter directory"
        )
    return _portable(config), state


def _from_workdir(workdir: epath.Path) -> tuple[MAEConfig, nnx.State]:
    """Parameters of the newest checkpoint, without the optimizer state, onto this process's first device.

    Read-only: a running job's workdir is left as it is. The target sharding lets a checkpoint written on a
    pod restore onto one device.
    """
    # What read_only implies anyway; given explicitly, orbax does not warn about each.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options) as manager:
        step = manager.latest_step()
        if step is None:
            raise VisualizeError(f"{workdir}/checkpoints holds no complete checkpoint yet")
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        run_config = configuration.base_config()
        run_config.update(ml_collections.ConfigDict(saved))  # keys added since the run keep their defaults
        config = _portable(configuration.model_config(run_config))
        _, params, fixed = nnx.split(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), {"params": params, "fixed": fixed}
        )
        restore = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=restore)).state
    print(f"Loaded step {step} of {workdir}")
    return config, nnx.merge_state(restored["params"], restored["fixed"])


# ---------------------------------------------------------------------------------------------------
# Images and reconstructions
# ---------------------------------------------------------------------------------------------------
def load_image(path: str, size: int) -> np.ndarray:
    """A file (any PIL format, local or gs://) resized and center-cropped to `size` as at evaluation: uint8."""
    file = epath.Path(path)
    if not file.is_file():
        raise VisualizeError(f"image {path} does not exist")
    try:
        return input_pipeline.eval_transform(input_pipeline.decode(file.read_bytes()), size)
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for non-images and truncated files
        raise VisualizeError(f"cannot decode image {path} ({type(error).__name__})") from error


def check_mask_ratios(config: MAEConfig, mask_ratios: Sequence[float]) -> None:
    for ratio in mask_ratios:
        if not 0 <= ratio < 1 or num_kept(config.encoder.num_patches, ratio) < 1:
            raise VisualizeError(
                f"mask ratio {ratio} must be in [0, 1) and keep at least one of the {config.encoder.num_patches} "
                "patches"
            )


# Compiled once per model shape and mask ratio: re-running a notebook cell does not compile again.
_reconstruct_fn = functools.cache(reconstruction.make_reconstruct_fn)


def reconstruct(model: MAE, images: np.ndarray, mask_ratios: Sequence[float], seed: int = 0) -> np.ndarray:
    """(N, S, S, 3) uint8 images -> (N * R, 4, S, S, 3) normalized panels, a row per (image, ratio), image-major.

    One noise draw serves every ratio, so a higher ratio removes a superset of the patches a lower one does.
    """
    check_mask_ratios(model.config, mask_ratios)
    graphdef, params, fixed = nnx.split(model, nnx.Param, ...)
    normalized = input_pipeline.normalize(images)
    noise = model.draw_noise(jax.random.key(seed), len(images))
    panels = [np.asarray(_reconstruct_fn(graphdef, ratio)(params, fixed, normalized, noise)) for ratio in mask_ratios]
    return np.stack(panels, axis=1).reshape(-1, *panels[0].shape[1:])


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from error


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mae_jax.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="parameter directory, training workdir or official .pth")
    parser.add_argument("--images", type=lambda text: text.split(","), help="comma-separated; default: demo photos")
    parser.add_argument("--mask_ratio", type=_floats, default=[0.75], help="comma-separated, e.g. 0.75,0.9")
    parser.add_argument("--seed", type=int, default=0, help="masking noise")
    parser.add_argument("--out", default="reconstruction.png", help="PNG file (local or gs://)")
    pixels = parser.add_mutually_exclusive_group()
    loss_help = ".pth only: its training loss; default: pixels for mae_visualize_*.pth, else norm-pix"
    pixels.add_argument("--norm_pix_loss", action="store_true", default=None, help=loss_help)
    pixels.add_argument("--no_norm_pix_loss", dest="norm_pix_loss", action="store_false", help="trained on pixels")
    args = parser.parse_args(argv)

    try:
        model = load_model(args.params, args.norm_pix_loss)
        size = model.config.encoder.image_size
        if args.images:
            names, images = args.images, np.stack([load_image(path, size) for path in args.images])
        else:
            photos = input_pipeline.DemoPhotos()
            names = [record["name"] for record in photos]
            images = input_pipeline.fixed_eval_images(photos, len(photos), size)
        panels = reconstruct(model, images, args.mask_ratio, args.seed)
    except (VisualizeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    reconstruction.save_png(args.out, reconstruction.grid(panels))
    ratios = ", ".join(f"{ratio:g}" for ratio in args.mask_ratio)
    print(
        f"Wrote {args.out}: {len(names)} images ({', '.join(names)}) x mask ratios {ratios}; columns "
        f"{' / '.join(reconstruction.COLUMNS)}"
    )


if __name__ == "__main__":
    main()
