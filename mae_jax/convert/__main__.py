"""Conversion of MAE weights between mae_jax parameter directories and the official, Hugging Face and timm formats.

    python -m mae_jax.convert import mae_visualize_vit_base.pth /tmp/mae_b16 --no-norm-pix-loss   # official .pth
    python -m mae_jax.convert import vit-mae-base/ /tmp/mae_b16                                    # Hugging Face dir
    python -m mae_jax.convert export /tmp/mae_b16 /tmp/mae_b16.pth [--encoder-only]                # official (default)
    python -m mae_jax.convert export /tmp/mae_b16 /tmp/hf_b16 --format=hf [--encoder-only]
    python -m mae_jax.convert export /tmp/mae_b16 /tmp/mae_b16.safetensors --format=timm
    python -m mae_jax.convert export FINETUNE_WORKDIR /tmp/hf_classifier --format=hf               # a classifier

`import` tells the format from SRC: a directory holding config.json is a Hugging Face model (ViTMAEForPreTraining,
or the encoder of ViTMAEModel, ViTForImageClassification or ViTModel); a `.safetensors` file holds the official
layout, which timm's MAE encoders share; any other file is an official PyTorch checkpoint (needs PyTorch).
`export` reads a parameter directory, or a fine-tuned classifier: the `classifier.safetensors` that fine-tuning
and linear probing write (or `classifier.pth`), or the workdir holding it. Only `.pth` files need PyTorch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from mae_jax import checkpointing
from mae_jax.convert import hf, timm
from mae_jax.convert.official import (
    CLASSIFIER_FILE,
    OFFICIAL_DECODER_HEADS,
    SAFETENSORS_SUFFIX,
    ConvertError,
    describe,
    encoder_of_classifier,
    from_official,
    infer_config,
    is_classifier,
    load_state_dict,
    save_safetensors,
    save_state_dict,
    to_official,
)
from mae_jax.models.mae import MAEConfig

OFFICIAL, HF, TIMM = "official", "hf", "timm"
_FILE_SUFFIXES = (SAFETENSORS_SUFFIX, ".pth")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mae_jax.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="official, timm or Hugging Face weights -> mae_jax parameters")
    importer.add_argument("src", help="a .pth (needs PyTorch) or .safetensors file, or a Hugging Face directory")
    importer.add_argument("out_dir")
    shape = importer.add_argument_group("official and timm files (a Hugging Face config.json says all this)")
    shape.add_argument("--variant", help="e.g. B/16; inferred from the file when left out")
    shape.add_argument("--image-size", type=int, help="inferred from the position table when left out")
    shape.add_argument("--num-heads", type=int, help="encoder heads, for widths and depths of no known variant")
    shape.add_argument("--decoder-heads", type=int, help=f"decoder heads (default {OFFICIAL_DECODER_HEADS})")
    importer.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        help="the loss the weights were trained with; default: a ViTMAE config.json's, else true "
        "(mae_visualize_* files: --no-norm-pix-loss)",
    )
    importer.add_argument("--decoder-seed", type=int, default=0, help="decoder init for encoder-only weights")
    importer.add_argument(
        "--official-layer-norm-eps",
        action="store_true",
        help="import a config.json whose layer_norm_eps is not 1e-6 with the official 1e-6 (facebook/vit-mae-*)",
    )
    exporter = commands.add_parser("export", help="mae_jax parameters or a fine-tuned classifier -> another format")
    exporter.add_argument("params_dir", help="a parameter directory, classifier.safetensors, or a workdir holding it")
    exporter.add_argument("out", help="official: NAME.safetensors or NAME.pth; hf: a directory; timm: NAME.safetensors")
    exporter.add_argument("--format", choices=(OFFICIAL, HF, TIMM), default=OFFICIAL)
    exporter.add_argument("--encoder-only", action="store_true", help="leave out the decoder")
    exporter.add_argument("--mask-ratio", type=float, default=0.75, help="hf: mask_ratio of config.json")
    exporter.add_argument("--num-heads", type=int, help="classifiers of no known variant: the encoder's heads")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        (_import if args.command == "import" else _export)(args)
    except (ValueError, OSError) as error:  # ConvertError, key/shape mismatches, missing or existing directories
        sys.exit(f"error: {error}")


def _import(args: argparse.Namespace) -> None:
    if epath.Path(args.src).is_dir():
        config, state_dict = _read_model_dir(args)
    else:
        state_dict = load_state_dict(args.src)
        if is_classifier(state_dict):
            state_dict = encoder_of_classifier(state_dict)
        config = infer_config(
            state_dict,
            variant=args.variant,
            image_size=args.image_size,
            num_heads=args.num_heads,
            decoder_heads=OFFICIAL_DECODER_HEADS if args.decoder_heads is None else args.decoder_heads,
            norm_pix_loss=True if args.norm_pix_loss is None else args.norm_pix_loss,
        )
    state = from_official(state_dict, config, decoder_seed=args.decoder_seed)
    checkpointing.save_params(args.out_dir, config, state)
    logging.info("Wrote %s from %s to %s", describe(config), args.src, args.out_dir)


def _read_model_dir(args: argparse.Namespace) -> tuple[MAEConfig, dict[str, np.ndarray]]:
    if not hf.is_model_dir(args.src):
        if (epath.Path(args.src) / checkpointing.MODEL_CONFIG_FILE).exists():
            raise ConvertError(f"{args.src} is a mae_jax parameter directory already: export it, or use it as it is")
        raise ConvertError(f"{args.src} is a directory without {hf.CONFIG_FILE}: not a Hugging Face model")
    given = [
        flag for flag in ("variant", "image_size", "num_heads", "decoder_heads") if getattr(args, flag) is not None
    ]
    if given:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
        raise ConvertError(f"{flags}: config.json gives the model's shape; these are for official files")
    return hf.load_dir(args.src, norm_pix_loss=args.norm_pix_loss, official_layer_norm_eps=args.official_layer_norm_eps)


def _export(args: argparse.Namespace) -> None:
    source = epath.Path(args.params_dir)
    if source.is_dir() and (source / checkpointing.MODEL_CONFIG_FILE).exists():
        _export_mae(args)
        return
    if source.is_dir() and (source / CLASSIFIER_FILE).exists():
        source = source / CLASSIFIER_FILE
    elif source.is_dir():
        raise ConvertError(
            f"{source} is neither a parameter directory ({checkpointing.MODEL_CONFIG_FILE} + params/) nor a "
            f"fine-tuning workdir ({CLASSIFIER_FILE})"
        )
    _export_classifier(args, source)


def _check_out(out: str, format_name: str) -> None:
    if format_name == TIMM and not out.endswith(SAFETENSORS_SUFFIX):
        raise ConvertError(f"--format=timm writes a .safetensors file: name it {out}{SAFETENSORS_SUFFIX}")
    if format_name == HF and out.endswith(_FILE_SUFFIXES):
        raise ConvertError(f"--format=hf writes a directory (config.json + model.safetensors), not {out}")


def _export_mae(args: argparse.Namespace) -> None:
    _check_out(args.out, args.format)
    config, state = checkpointing.load_params(args.params_dir)
    if config.mask_tokens_in_encoder:
        raise ConvertError("the encoder's mask token (the 'encoder w/ [M]' ablation) has no place in other formats")
    encoder_only = args.encoder_only or "decoder" not in state  # e.g. the encoder a pretraining run exports
    if args.format == TIMM and not encoder_only:
        logging.info("timm's VisionTransformer holds the encoder: the decoder is left out")
        encoder_only = True
    state_dict = to_official(state, encoder_only=encoder_only)
    if args.format == OFFICIAL:
        save_state_dict(args.out, state_dict)
        written = "official state_dict"
    elif args.format == HF:
        written = hf.save_mae_dir(args.out, state_dict, config, args.mask_ratio)
    else:
        save_safetensors(args.out, timm.to_timm(state_dict))
        written = f"timm VisionTransformer({_kwargs(timm.vision_transformer_kwargs(config.encoder, state_dict))})"
    logging.info("Wrote %s%s as %s to %s", describe(config), " (encoder only)" * encoder_only, written, args.out)


def _export_classifier(args: argparse.Namespace, source: epath.Path) -> None:
    if args.encoder_only:
        raise ConvertError("--encoder-only applies to MAE parameter directories, not to classifiers")
    if not str(source).endswith(_FILE_SUFFIXES):
        raise ConvertError(f"{source} is not a parameter directory, a classifier file or a fine-tuning workdir")
    _check_out(args.out, args.format)
    state_dict = load_state_dict(source)
    if not is_classifier(state_dict):
        raise ConvertError(
            f"{source} holds an MAE, not a classifier: import it first (python -m mae_jax.convert import), then export"
        )
    if args.format == OFFICIAL:
        save_state_dict(args.out, state_dict)
        logging.info("Wrote the classifier of %s to %s", source, args.out)
        return
    encoder = infer_config(state_dict, num_heads=args.num_heads).encoder  # hf and timm need the heads
    if args.format == HF:
        hf.save_classifier_dir(args.out, state_dict, encoder)
        written = hf.VIT_CLASSIFIER
    else:
        save_safetensors(args.out, timm.to_timm(state_dict))
        written = f"timm VisionTransformer({_kwargs(timm.vision_transformer_kwargs(encoder, state_dict))})"
    logging.info("Wrote the classifier of %s as %s to %s", source, written, args.out)


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


if __name__ == "__main__":
    main()
