import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from vidlatent.diffusion.flow import (
    add_noise,
    flow_loss,
    sample_sigmas,
    shift_for_tokens,
    shift_sigmas,
    velocity_target,
)


def test_add_noise_endpoints_and_per_sample_mix():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    out = add_noise(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(out[0], x0[0])  # sigma 0: clean
    assert torch.equal(out[1], noise[1])  # sigma 1: pure noise
    torch.testing.assert_close(out[2], 0.75 * x0[2] + 0.25 * noise[2], rtol=0, atol=1e-6)


def test_add_noise_rejects_a_sigma_per_element():
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\)"):
        add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))


def test_velocity_target_is_the_derivative_of_the_path():
    g = torch.Generator().manual_seed(1)
    x0, noise = (
        torch.randn(2, 8, dtype=torch.float64, generator=g),
        torch.randn(2, 8, dtype=torch.float64, generator=g),
    )
    sigma, h = torch.tensor([0.3, 0.7], dtype=torch.float64), 1e-6
    slope = (add_noise(x0, noise, sigma + h) - add_noise(x0, noise, sigma - h)) / (2 * h)
    torch.testing.assert_close(velocity_target(x0, noise), slope, rtol=0, atol=1e-8)
    assert torch.equal(velocity_target(x0, noise), noise - x0)


def test_sample_sigmas_uniform_and_logit_normal_statistics():
    n = 200_000
    u = sample_sigmas(n, "uniform", generator=torch.Generator().manual_seed(0))
    assert u.shape == (n,) and 0 <= u.min() and u.max() < 1
    # 5 standard errors: 1/sqrt(12 n) for the mean of U(0, 1)
    assert abs(u.mean().item() - 0.5) < 5 / math.sqrt(12 * n)
    s = sample_sigmas(n, "logit_normal", mean=0.5, std=0.8, generator=torch.Generator().manual_seed(0))
    logit = torch.logit(s.double())
    assert abs(logit.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(n)
    assert abs(logit.std().item() - 0.8) < 5 * 0.8 / math.sqrt(2 * n)


def test_sample_sigmas_seeded_and_validated():
    a = sample_sigmas(16, "logit_normal", generator=torch.Generator().manual_seed(3))
    b = sample_sigmas(16, "logit_normal", generator=torch.Generator().manual_seed(3))
    c = sample_sigmas(16, "logit_normal", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="accepted: uniform, logit_normal"):
        sample_sigmas(4, "cosine")


def test_shift_sigmas_values_and_inverse():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == 0.75  # 3 * 0.5 / (1 + 2 * 0.5)
    shifted = shift_sigmas(s, 5.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    torch.testing.assert_close(shift_sigmas(shifted, 1 / 5.0), s)  # shifting by 1/shift undoes it
    with pytest.raises(ValueError):
        shift_sigmas(s, 0.0)


def test_shift_sigmas_matches_diffusers_schedules():
    base = torch.linspace(1, 1 / 1000, 20, dtype=torch.float64)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=base.tolist())  # the scheduler shifts the sigmas it is given
    torch.testing.assert_close(shift_sigmas(base, 3.0).float(), sched.sigmas[:-1], rtol=0, atol=1e-6)
    # the dynamic (mu) shift of flux/SD3 is the same map with shift = exp(mu)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(sigmas=base.tolist(), mu=0.9)
    torch.testing.assert_close(
        shift_sigmas(base, math.exp(0.9)).float(), dynamic.sigmas[:-1], rtol=0, atol=1e-6
    )


def test_shift_for_tokens_is_exp_of_a_line_through_the_anchors():
    assert shift_for_tokens(256) == pytest.approx(math.exp(0.5))
    assert shift_for_tokens(4096) == pytest.approx(math.exp(1.15))
    assert shift_for_tokens(2176) == pytest.approx(math.exp((0.5 + 1.15) / 2))  # midpoint
    # anchors through Wan 2.1's fixed shift of 5 at 480p (21 x 30 x 52 = 32,760 tokens)
    wan = shift_for_tokens(32760, base_tokens=256, max_tokens=32760, base_shift=0.0, max_shift=math.log(5))
    assert wan == pytest.approx(5.0)
    assert shift_for_tokens(8192) > shift_for_tokens(4096)  # continues past the anchors


def test_flow_loss_exact_values_and_weighting():
    target = torch.zeros(2, 3, 4)
    pred = torch.stack([torch.full((3, 4), 2.0), torch.full((3, 4), 1.0)])
    assert flow_loss(pred, target).item() == pytest.approx((4.0 + 1.0) / 2)
    assert flow_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(2.0)
    assert flow_loss(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match="weighting must have shape"):
        flow_loss(pred, target, torch.ones(3))
