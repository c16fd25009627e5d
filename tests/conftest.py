"""Session-scoped fixtures that several test files share, so each is built once per run.

They are shared objects: a test that changes one (loads a LoRA, fuses, sets a scale, loads a state dict,
swaps a part, registers a hook it does not remove) takes ``copy.deepcopy`` of it first, or builds its own.

The suite's budget: the default run (``python -m pytest -q``, which deselects ``slow`` and ``gpu``) stays
under 3 minutes on 2 CPU cores; a test that takes more than about 5 s there is marked ``@pytest.mark.slow``
and runs in CI's second step (``python -m pytest -q -m slow``, see .ci/run).
"""

from dataclasses import replace

import pytest
import torch
from test_dit import inputs, pair

from vidlatent import CausalVAE, VideoPipeline
from vidlatent.config import DiTConfig, load_config
from vidlatent.pipelines.encode import load_vae

# ------------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="session")
def tiny_pipe() -> VideoPipeline:
    """The tiny random pipeline (preset ``tiny``), progress bars off."""
    pipe = VideoPipeline.from_pretrained("tiny")
    pipe.progress = False
    return pipe


@pytest.fixture(scope="session")
def default_pipe() -> VideoPipeline:
    """The shipped default model (``vidlatent/weights/default``)."""
    return VideoPipeline.from_pretrained("default")


@pytest.fixture(scope="session")
def tiny_vae():
    """The tiny random VAE as the batch jobs load it (``load_vae("tiny")``), in eval mode."""
    return load_vae("tiny")[0]


@pytest.fixture(scope="session")
def first_stats_vae():
    """A maker: ``make(vae, seed=3)`` is ``vae`` (same weights) with random first-frame statistics of its own."""

    def make(vae: CausalVAE, seed: int = 3) -> CausalVAE:
        c = vae.config.latent_channels
        g = torch.Generator().manual_seed(seed)
        cfg = replace(
            vae.config,
            first_latents_mean=torch.randn(c, generator=g).tolist(),
            first_latents_std=(torch.rand(c, generator=g) + 0.2).tolist(),
        )
        out = CausalVAE(cfg).eval()
        out.load_state_dict(vae.state_dict())
        return out

    return make


# ------------------------------------------------ the tiny DiT and its diffusers twin (the LoRA tests)


@pytest.fixture(scope="session")
def cfg() -> DiTConfig:
    """The tiny DiT preset's config."""
    return load_config(DiTConfig, "dit", "tiny")


@pytest.fixture(scope="session")
def twins(cfg):
    """Ours and diffusers' WanTransformer3DModel holding the same random (unit-gain) weights."""
    return pair(cfg, seed=3)


@pytest.fixture(scope="session")
def batch(cfg):
    """(x, sigma, context) for the tiny DiT: 2 clips of 2 x 6 x 8 latents, 10 text tokens and 2 of padding."""
    return inputs(cfg, batch=2, t=2, h=6, w=8, text=10, pad=2)
