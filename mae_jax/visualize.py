"""Reconstruction grids from a trained MAE, as in the paper's figures.

    python -m mae_jax.visualize --params=PATH [--images=a.jpg,b.png] [--mask_ratio=0.75,0.9] --out=grid.png

PATH is a parameter directory (`model.json` + `params/`), a training workdir (its newest checkpoint), or an
official `.pth` that holds a decoder (`mae_visualize_vit_*.pth`, `*_full.pth`). Rows are images x mask
ratios; columns original / masked / reconstruction / reconstruction with the visible patches pasted.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx

from mae_jax import input_pipeline, pretrained
from mae_jax.evaluators import reconstruction
from mae_jax.models.mae import MAE, MAEConfig, num_kept


class VisualizeError(ValueError):
    """An input that cannot be visualized; the message is one line saying why."""


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------
def load_model(path: str, norm_pix_loss: bool | None = None) -> MAE:
    """The whole MAE (the decoder is needed) from a parameter directory, a training workdir or an official .pth.

    `norm_pix_loss`: see `pretrained.load`.
    """
    try:
        config, state = pretrained.load(path, norm_pix_loss)
    except pretrained.PretrainedError as error:
        raise VisualizeError(str(error)) from error
    if "decoder" not in state:
        source = "like mae_pretrain_vit_*.pth" if path.endswith(".pth") else "what a run exports to WORKDIR/encoder"
        raise VisualizeError(
            f"{path} holds an encoder only ({source}): reconstructions need the decoder; use a training workdir, "
            "a whole-MAE parameter directory, mae_visualize_vit_*.pth or *_full.pth"
        )
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


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
    except input_pipeline.UNREADABLE_IMAGE_ERRORS as error:  # non-images, truncated files, decompression bombs
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
    parser.add_argument(
        "--params",
        required=True,
        help="parameter directory, training workdir, official .pth/.safetensors or Hugging Face directory",
    )
    parser.add_argument("--images", type=lambda text: text.split(","), help="comma-separated; default: demo photos")
    parser.add_argument("--mask_ratio", type=_floats, default=[0.75], help="comma-separated, e.g. 0.75,0.9")
    parser.add_argument("--seed", type=int, default=0, help="masking noise")
    parser.add_argument("--out", default="reconstruction.png", help="PNG file (local or gs://)")
    pixels = parser.add_mutually_exclusive_group()
    loss_help = ".pth only: its training loss; default: pixels for mae_visualize_*.pth, else norm-pix"
    pixels.add_argument("--norm_pix_loss", action="store_true", default=None, help=loss_help)
    pixels.add_argument("--no_norm_pix_loss", dest="norm_pix_loss", action="store_false", help="trained on pixels")
    args = parser.parse_args(argv)

    try:  # a bad --out fails now, not after the model ran
        epath.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        sys.exit(f"error: cannot create the folder of --out {args.out}: {error}")
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
    try:
        reconstruction.save_png(args.out, reconstruction.grid(panels))
    except OSError as error:
        sys.exit(f"error: cannot write --out {args.out}: {error}")
    ratios = ", ".join(f"{ratio:g}" for ratio in args.mask_ratio)
    print(
        f"Wrote {args.out}: {len(names)} images ({', '.join(names)}) x mask ratios {ratios}; columns "
        f"{' / '.join(reconstruction.COLUMNS)}"
    )


if __name__ == "__main__":
    main()
