"""Conversion between official PyTorch MAE checkpoints (facebookresearch/mae `.pth`) and mae_jax parameters.

    python -m mae_jax.convert import mae_visualize_vit_base.pth /tmp/mae_b16 [--variant B/16] [--no-norm-pix-loss]
    python -m mae_jax.convert export /tmp/mae_b16 /tmp/mae_b16.pth [--encoder-only]

`.pth` files need PyTorch (not a dependency); `.safetensors` files, in the same key layout, need only numpy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from absl import logging

from mae_jax import checkpointing
from mae_jax.convert.official import (
    OFFICIAL_DECODER_HEADS,
    describe,
    from_official,
    infer_config,
    load_state_dict,
    save_state_dict,
    to_official,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mae_jax.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="official .pth or .safetensors -> mae_jax parameter directory")
    importer.add_argument("checkpoint", help="an official .pth (needs PyTorch) or a .safetensors file")
    importer.add_argument("out_dir")
    importer.add_argument("--variant", help="e.g. B/16; inferred from the file when left out")
    importer.add_argument("--image-size", type=int, help="inferred from the position table when left out")
    importer.add_argument("--num-heads", type=int, help="encoder heads, for widths and depths of no known variant")
    importer.add_argument("--decoder-heads", type=int, default=OFFICIAL_DECODER_HEADS)
    importer.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the loss the file was trained with (mae_visualize_* files: --no-norm-pix-loss)",
    )
    importer.add_argument("--decoder-seed", type=int, default=0, help="decoder init for encoder-only files")
    exporter = commands.add_parser("export", help="mae_jax parameter directory -> official .pth or .safetensors")
    exporter.add_argument("params_dir")
    exporter.add_argument("out_file", help="NAME.safetensors (no PyTorch needed) or NAME.pth")
    exporter.add_argument("--encoder-only", action="store_true", help="leave out the decoder")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        _run(args)
    except (ValueError, OSError) as error:  # ConvertError, key/shape mismatches, missing or existing directories
        sys.exit(f"error: {error}")


def _run(args: argparse.Namespace) -> None:
    if args.command == "import":
        state_dict = load_state_dict(args.checkpoint)
        config = infer_config(
            state_dict,
            variant=args.variant,
            image_size=args.image_size,
            num_heads=args.num_heads,
            decoder_heads=args.decoder_heads,
            norm_pix_loss=args.norm_pix_loss,
        )
        state = from_official(state_dict, config, decoder_seed=args.decoder_seed)
        checkpointing.save_params(args.out_dir, config, state)
        logging.info("Wrote %s from %s to %s", describe(config), args.checkpoint, args.out_dir)
    else:
        config, state = checkpointing.load_params(args.params_dir)
        encoder_only = args.encoder_only or "decoder" not in state  # e.g. the encoder a pretraining run exports
        save_state_dict(args.out_file, to_official(state, encoder_only=encoder_only))
        logging.info("Wrote %s%s to %s", describe(config), " (encoder only)" * encoder_only, args.out_file)


if __name__ == "__main__":
    main()
