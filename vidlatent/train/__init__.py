"""Training: a loop (``loop.Trainer``) around one task (``tasks/``: the denoiser on latent files, the VAE on
clips), the latent-cache dataset and its bucket sampler."""

from ..config.train import TrainConfig
from .configure import load_train_config
from .data import BucketSampler, LatentDataset, read_captions
from .loop import NonFiniteLossError, Trainer, train
from .tasks.denoiser import dit_flops

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
