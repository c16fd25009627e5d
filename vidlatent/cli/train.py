"""``vidlatent train``: a train config (yaml or preset) and overrides, then ``vidlatent.train.train``."""

from __future__ import annotations

import argparse
import sys

from .common import add_common


def cmd_train(args: argparse.Namespace) -> int:
    from ..checkpoint import check_writable
    from ..train import NonFiniteLossError, load_train_config, train

    cfg = load_train_config(args.config_file, *args.config, overrides=args.overrides)
    if args.device is not None:
        cfg.device = args.device
    if cfg.output:
        check_writable(cfg.output, folder=True)
    try:  # under torchrun, cli.run leaves the process group the trainer joined
        trainer = train(cfg)
    except NonFiniteLossError as err:  # every rank stops at the same step (the loss is all-reduced)
        print(f"vidlatent train: stopped: {err}", file=sys.stderr)
        return 1
    if trainer.dist.main:
        print(f"trained {trainer.step} steps; last checkpoint {trainer.last_checkpoint}")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a denoiser, a VAE or a control branch (task=denoiser|vae|control)",
        description="Train what CONFIG's task names: the denoiser (flow matching on the latent files `vidlatent "
        "encode` writes), the VAE, or a control branch beside a frozen pipeline; CONFIG is a yaml file or a "
        "train preset such as 'tiny', with key=value overrides. resume=auto continues the latest "
        "checkpoint under output=. Exits 1 when the loss became NaN/inf (the last good checkpoint is kept).",
        epilog="examples:\n  vidlatent train tiny data=latents/ output=runs/tiny steps=500 resume=auto\n"
        "  vidlatent train finetune.yaml  (pipeline: WAN_FOLDER, data: clips/, lora_rank: 16: fine-tune a pipeline "
        "on captioned clips through a disk cache; docs/training.md)\n"
        "  torchrun --nproc_per_node=8 -m vidlatent.cli train CONFIG parallel=ddp|fsdp  "
        "(global batch = batch_size x ranks x grad_accum)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config_file", metavar="CONFIG", help="train yaml file or preset name (tiny)")
    add_common(p, model=False)
    p.set_defaults(func=cmd_train)
