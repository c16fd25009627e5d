"""The pipeline's configs and the job options: every shipped preset loads, bad values fail clearly."""

import math

import pytest
import torch

from vidlatent.checkpoint import resolve_source, shipped_model
from vidlatent.config import (
    PRESET_DIR,
    FrameSelection,
    PipelineConfig,
    PipelinePreset,
    SamplingOptions,
    check_pipeline_config,
    list_presets,
    load_config,
)

DEFAULT_MODEL = shipped_model("default")  # the shipped model's pipeline folder


@pytest.mark.parametrize("name", list_presets("pipeline"))
def test_every_shipped_pipeline_preset_loads(name):
    preset = load_config(PipelinePreset, "pipeline", name)
    assert isinstance(preset.pipeline, PipelineConfig)
    check_pipeline_config(preset.pipeline, PRESET_DIR / "pipeline" / f"{name}.yaml")


def test_the_default_models_pipeline_json_loads():
    cfg = load_config(PipelineConfig, "pipeline", None, DEFAULT_MODEL / "pipeline.json")
    assert check_pipeline_config(cfg).frames == 17


def test_a_numpy_seed_is_taken_as_an_int():
    import numpy as np

    seed = SamplingOptions(seed=np.int64(7)).seed
    assert type(seed) is int and seed == 7
    torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be in"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"guidance": math.nan}, "guidance must be a finite number"),
        ({"shift": 0}, "shift must be in"),
        ({"sampler": "ddim"}, "unknown sampler 'ddim'; accepted: euler"),
        ({"output_type": "gif"}, "unknown output_type 'gif'"),
        ({"seed": 1.5}, "seed must be an integer"),
        (
            {"seed": 2**64},
            "seed must be an integer from -2\\*\\*63 to 2\\*\\*64 - 1; got 18446744073709551616",
        ),
        ({"seed": -(2**63) - 1}, "seed must be an integer from"),
    ],
)
def test_sampling_options_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frames": 0}, "frames must be at least 1"),
        ({"start": -1}, "need start >= 0"),
        ({"stride": 2, "fps": 8.0}, "give either stride or a positive fps"),
        ({"fps": math.inf}, "fps must be a finite number"),
        ({"size": (0, 16)}, "size must be"),
        ({"frame_policy": "loop"}, "frame_policy must be one of"),
        ({"size_policy": "squash"}, "unknown size policy 'squash'"),
    ],
)
def test_frame_selection_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrameSelection(**kwargs)


def test_keywords_merge_over_options_and_the_config_fills_the_rest():
    opts = SamplingOptions.from_keywords(SamplingOptions(steps=3, seed=1), {"seed": 2}, "generate")
    assert (opts.steps, opts.seed) == (3, 2)
    full = opts.resolve(PipelineConfig(guidance=4.0), progress=False)
    assert (full.steps, full.guidance, full.sampler, full.progress) == (3, 4.0, "unipc", False)
    with pytest.raises(TypeError, match="generate\\(\\) got an unexpected keyword argument 'stpes'"):
        SamplingOptions.from_keywords(None, {"stpes": 3}, "generate")


def test_one_resolver_tells_presets_from_paths(tmp_path):
    assert resolve_source("tiny", "vae").kind == "preset"
    assert resolve_source(DEFAULT_MODEL, "pipeline").kind == "vidlatent"
    assert resolve_source(DEFAULT_MODEL / "vae", "vae").kind == "vidlatent"
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert resolve_source(tmp_path / "w.safetensors", "vae").kind == "file"
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_source(tmp_path, "pipeline").kind == "diffusers"
    with pytest.raises(FileNotFoundError, match="no VAE at 'nope'"):
        resolve_source("nope", "vae")


def test_a_json_file_that_is_not_json_is_reported_in_json_s_words(tmp_path):
    from vidlatent.config import PipelineConfig, load_config

    path = tmp_path / "pipeline.json"
    path.write_text('{"steps": 20,\n "guidance": 5.0,, }')
    with pytest.raises(
        ValueError, match="pipeline.json: not valid JSON \\(Expecting property name .*, line 2\\)"
    ):
        load_config(PipelineConfig, "pipeline", None, path)
    path.write_text('{"steps": 12}')
    assert load_config(PipelineConfig, "pipeline", None, path).steps == 12
