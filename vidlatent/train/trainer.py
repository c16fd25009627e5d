"""The names ``vidlatent.train.trainer`` has always had, now at home elsewhere: the loop (``loop``), the
tasks (``tasks/``), the optimizer side (``optim``), the config (``vidlatent.config.train``) and its loading
(``configure``). Import from those in new code."""

from ..config.train import TrainConfig
from .configure import PRECISIONS, SCHEDULES, load_train_config
from .loop import RESUME_FREE, NonFiniteLossError, Trainer, train
from .optim import lr_factor
from .tasks import TASKS
from .tasks.denoiser import dit_flops

__all__ = [
    "PRECISIONS",
    "RESUME_FREE",
    "SCHEDULES",
    "TASKS",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "dit_flops",
    "load_train_config",
    "lr_factor",
    "train",
]
