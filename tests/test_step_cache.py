"""Step caching (runtime/cache.py): off and threshold 0 are the plain run bitwise, a large threshold skips
(block evaluations counted by hooks on the blocks), each sample (guidance branch) keeps its own state, errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_dit import randomize

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.runtime.cache import CacheState, StepCache, cache_settings, fingerprint, write_settings

JOB = dict(frames=5, height=32, width=32, steps=6, guidance=3.0, progress=False, output_type="latent")
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with random, non-zero weights everywhere (the preset's zero gates make blocks no-ops)."""
    pipe = VideoPipeline.from_pretrained("tiny")
    randomize(pipe.dit, 0)
    return pipe


def counted(pipe):
    """A list whose first item counts block evaluations (a block run on b samples counts b)."""
    count = [0]
    for block in pipe.dit.blocks:
        block.register_forward_hook(lambda m, i, out: count.__setitem__(0, count[0] + out.shape[0]))
    return count


def test_off_and_threshold_zero_are_the_plain_run(pipe):
    pipe.cache = None
    plain = pipe.generate(PROMPTS, seed=1, **JOB)
    pipe.cache = 0
    zero = pipe.generate(PROMPTS, seed=1, **JOB)
    assert pipe.cache_states[0].skipped == 0
    pipe.cache = 1e9
    skipped = pipe.generate(PROMPTS, seed=1, **JOB)
    pipe.cache = "off"
    off = pipe.generate(PROMPTS, seed=1, **JOB)
    assert torch.equal(zero, plain) and torch.equal(off, plain)
    assert not torch.equal(skipped, plain)


def test_large_threshold_skips_all_but_first_block(pipe):
    count = counted(pipe)
    depth, steps, rows = len(pipe.dit.blocks), JOB["steps"], 2 * len(PROMPTS)  # guidance: cond + uncond rows
    pipe.cache = None
    pipe.generate(PROMPTS, seed=2, **JOB)
    assert count[0] == steps * rows * depth
    count[0] = 0
    pipe.cache = 1e9
    pipe.generate(PROMPTS, seed=2, **JOB)
    # the first step runs in full; after it only block 0
    assert count[0] == rows * depth + (steps - 1) * rows
    state = pipe.cache_states[0]
    assert (state.block_evals, state.skipped) == (count[0], (steps - 1) * rows)
    pipe.cache = None


@torch.no_grad()
def test_each_sample_keeps_its_own_state(pipe):
    dit = pipe.dit
    g = torch.Generator().manual_seed(0)
    c = dit.config.out_channels
    x = torch.randn(2, c, 2, 4, 4, generator=g)
    context = torch.randn(2, 8, dit.config.text_dim, generator=g)
    sigma = torch.full((2,), 0.5)
    state = CacheState(StepCache(0.05))
    first = dit(x, sigma, context, cache=state)
    x2 = x.clone()
    x2[1] = torch.randn(c, 2, 4, 4, generator=g)  # the second sample (say, the other guidance branch) moves
    again = dit(x2, sigma, context, cache=state)
    plain = dit(x2, sigma, context)
    assert state.skipped == 1  # the first sample reused its blocks, the second ran them
    assert torch.allclose(again[1], plain[1], atol=1e-5)
    assert torch.allclose(again[0], first[0], atol=1e-5)  # same input: the cached result
    assert state.block_evals == 2 * len(dit.blocks) + 2 + (len(dit.blocks) - 1)


def test_two_experts_and_branches_get_separate_states(pipe):
    pipe.cache = 0.1
    pipe.generate(PROMPTS, seed=3, **JOB)
    assert len(pipe.cache_states) == 1 and pipe.cache_states[0].reference.shape[0] == 2 * len(PROMPTS)
    pipe.cache = None


def test_settings_file_round_trip_and_refusal(pipe, tmp_path):
    path = write_settings(tmp_path / "c.json", pipe.dit, "tiny", {"quality": 0.02, "fast": 0.2}, [])
    assert cache_settings(str(path), pipe.dit) == StepCache(0.02)  # no "balanced": the first level
    assert cache_settings(f"{path}:fast", pipe.dit) == StepCache(0.2)
    with pytest.raises(ValueError, match="no cache level 'slow'; it has: quality, fast"):
        cache_settings(f"{path}:slow", pipe.dit)
    other = VideoPipeline.from_pretrained("tiny").dit
    randomize(other, 1)
    assert fingerprint(other) != fingerprint(pipe.dit)
    with pytest.raises(ValueError, match=r"cache settings for another model \('tiny'"):
        cache_settings(str(path), other)
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and data["levels"]["fast"] == 0.2


@pytest.mark.parametrize(
    "spec, message",
    [
        (-0.1, "cache threshold must be a number >= 0"),
        ("nan", "cache threshold must be a number >= 0"),
        ("fast", "neither a threshold nor a settings file"),
        (True, "cache takes a threshold"),
        ([0.1], "cache takes a threshold"),
    ],
)
def test_bad_settings_are_one_line(pipe, spec, message):
    with pytest.raises(ValueError, match=message) as err:
        pipe.cache = spec
    assert "\n" not in str(err.value)


def test_not_a_settings_file(pipe, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="is not a step cache settings file"):
        pipe.cache = str(path)


def test_cli_cache_flag_and_calibrate(tmp_path, capsys):
    out = tmp_path / "c.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main(["calibrate-cache", "--model", "tiny", "--prompts-file", str(prompts), "-o", str(out), "-q",
                 "--steps", "3", "frames=5", "height=32", "width=32"])  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["levels"].keys() == {"quality", "balanced", "fast"}
    code = main(["generate", "a red circle", "--model", "tiny", "--cache", f"{out}:fast", "-o",
                 str(tmp_path / "a.png"), "--frames", "1", "--height", "32", "--width", "32", "-q", "steps=2"])  # fmt: skip
    assert code == 0 and (tmp_path / "a.png").exists()
    code = main(
        ["generate", "a red circle", "--model", "tiny", "--cache", "-1", "-o", str(tmp_path / "b.png")]
    )
    assert code != 0 and "cache threshold must be a number >= 0" in capsys.readouterr().err


def test_tiny_wan_folder_relative_difference(tmp_path):
    """The tiny Wan 2.1 folder (tests/wan_folders.py): the cached run's latents against the uncached, reported
    (pytest -s prints them); a threshold that skips moves them, by less than they measure."""
    from wan_folders import wan_t2v_root

    wan_t2v_root(tmp_path / "wan")
    pipe = VideoPipeline.from_pretrained(tmp_path / "wan")
    job = dict(frames=5, height=32, width=32, steps=10, guidance=5.0, progress=False, output_type="latent")
    plain = pipe.generate("a red ball", seed=0, **job)
    for threshold in (0.1, 0.3, 0.5):
        pipe.cache = threshold
        z = pipe.generate("a red ball", seed=0, **job)
        state = pipe.cache_states[0]
        diff = float((z - plain).norm() / plain.norm())
        print(f"tiny Wan, cache {threshold}: relative difference {diff:.4f}, block evaluations "
              f"{state.block_evals}/{state.full_evals}")  # fmt: skip
        assert diff < 1 and (diff > 0) == (state.skipped > 0)


def test_flow_edit_caches_each_side_apart(default_pipe):
    """FlowEdit runs the denoiser on the source and the target side each step: each side has its own state;
    threshold 0 is the plain edit bitwise, a large one skips on both sides and changes the edit."""
    import copy

    plain, cached = copy.deepcopy(default_pipe), copy.deepcopy(default_pipe)
    video = plain.generate("a red circle moving right", frames=5, steps=2, seed=0)
    kw = dict(source_prompt="a red circle moving right", strength=0.8, steps=6, seed=1, output_type="latent")
    want = plain.edit(video, "a blue circle moving right", **kw)
    cached.cache = 0.0
    assert torch.equal(cached.edit(video, "a blue circle moving right", **kw), want)
    assert len(cached.cache_states) == 2 and all(st.skipped == 0 for st in cached.cache_states)
    cached.cache = 1e6
    got = cached.edit(video, "a blue circle moving right", **kw)
    assert all(st.skipped > 0 for st in cached.cache_states)
    assert not torch.equal(got, want)


def test_control_is_cached():
    """The control job wraps its own denoiser: threshold 0 is the plain job bitwise; a large one skips."""
    from test_control_job import fresh_branch

    pipe = VideoPipeline.from_pretrained("tiny")
    randomize(pipe.dit, seed=5)
    branch = fresh_branch(pipe)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pipe.load_control(branch)
    control = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    kw = dict(steps=4, seed=3, guidance=3.0, output_type="latent", progress=False)
    want = pipe.control("a red ball", control, **kw)
    pipe.cache = 0.0
    assert torch.equal(pipe.control("a red ball", control, **kw), want)
    pipe.cache = 1e6
    got = pipe.control("a red ball", control, **kw)
    assert len(pipe.cache_states) == 1 and pipe.cache_states[0].skipped > 0
    assert not torch.equal(got, want)


def test_the_noise_morph_says_it_runs_uncached(default_pipe, tmp_path):
    """The noise morph's inversion is a fixed-point walk: it runs uncached, says so in one line, and gives
    the plain morph exactly."""
    import copy

    plain, cached = copy.deepcopy(default_pipe), copy.deepcopy(default_pipe)
    a = plain.generate("a red circle", frames=1, steps=2, seed=0)
    b = plain.generate("a blue square", frames=1, steps=2, seed=1)
    kw = dict(frames=3, mode="noise", prompt_a="a red circle", prompt_b="a blue square", steps=2)
    want = plain.morph(a, b, **kw)
    cached.cache = 0.5
    with pytest.warns(UserWarning, match="step caching is not applied to a noise morph"):
        got = cached.morph(a, b, **kw)
    assert torch.equal(want, got) and cached.cache_states == []
