"""Every typed config of vidlatent, and how yaml presets, files and ``key=value`` overrides become one.

Each component takes one dataclass config (``models``: VAE, denoiser, text encoders). A preset is a yaml
file under ``vidlatent/configs/<kind>/`` (shipped inside the package, so ``from_pretrained("tiny")`` works
after ``pip install``); omegaconf merges a preset, further yaml files and dotlist overrides into the
dataclass, checking names and types (``base``).
"""

from .base import (
    PRESET_DIR,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    load_yaml,
    merge_config,
)
from .control import VACE_IN_CHANNELS, ControlConfig, control_config_for
from .models import (
    HF_SUBFOLDER,
    SPECIAL_TOKENS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    DiTConfig,
    HFTextConfig,
    TextConfig,
    VAEConfig,
)
from .pipeline import FrameSelection, PipelineConfig, PipelinePreset, SamplingOptions, check_pipeline_config
from .train import TrainConfig

__all__ = [
    "PRESET_DIR",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config",
    "load_yaml",
    "merge_config",
    "HF_SUBFOLDER",
    "SPECIAL_TOKENS",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "DiTConfig",
    "HFTextConfig",
    "TextConfig",
    "VAEConfig",
    "VACE_IN_CHANNELS",
    "ControlConfig",
    "control_config_for",
    "FrameSelection",
    "PipelineConfig",
    "PipelinePreset",
    "SamplingOptions",
    "check_pipeline_config",
    "TrainConfig",
]
