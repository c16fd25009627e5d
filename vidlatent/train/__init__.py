"""Training: the latent-cache dataset and the flow-matching denoiser trainer."""

from .data import BucketSampler, LatentDataset, read_captions
from .trainer import NonFiniteLossError, TrainConfig, Trainer, dit_flops, load_train_config, train

__all__ = [
    "BucketSampler",
    "LatentDataset",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "dit_flops",
    "load_train_config",
    "read_captions",
    "train",
]
