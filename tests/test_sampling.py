"""The sampling loop against velocity fields whose flows are known in closed form."""

import pytest
import torch

from vidlatent.config import DiTConfig, load_config
from vidlatent.diffusion.flow import add_noise
from vidlatent.diffusion.sampling import SAMPLERS, denoise, flow_edit, invert, make_scheduler, sigma_schedule
from vidlatent.models.dit import VideoDiT

SHAPE = (2, 1, 4, 32, 32)


def bcast(sigma, x):
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def point_mass(x, sigma, context, mask=None):
    """Exact velocity when all data sit at one point ``a`` (here the mean of the context): (x - a) / sigma."""
    a = bcast(context.mean(dim=(1, 2)), x)
    return (x - a) / bcast(sigma, x)


MU, STD = 0.5, 0.3


def gaussian(x, sigma, context, mask=None):
    """Exact velocity E[noise - x0 | x_sigma] for data ~ N(MU, STD^2) per element (a linear regression)."""
    s, x = bcast(sigma, x).double(), x.double()
    var = (1 - s) ** 2 * STD**2 + s**2  # Var x_sigma
    cov = s - (1 - s) * STD**2  # Cov(noise - x0, x_sigma)
    return (-MU + cov / var * (x - (1 - s) * MU)).float()


def noise(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_point_mass_is_reached_exactly(sampler, shift):
    # every scheduler turns the velocity into the data prediction x - sigma * v, which is exactly ``a`` here,
    # so each step lands on the straight line to ``a``: only fp32 rounding separates the result from it
    context = torch.full((2, 3, 4), 0.7)
    out = denoise(point_mass, noise(), context, sampler=sampler, steps=8, shift=shift, progress=False)
    assert (out - 0.7).abs().max() < 1e-5


def transport_error(sampler, steps, shift=1.0):
    """The exact flow carries noise z to MU + STD * z (the ODE of an affine Gaussian path is affine)."""
    z = noise(1)
    out = denoise(
        gaussian, z, torch.zeros(2, 1, 1), sampler=sampler, steps=steps, shift=shift, progress=False
    )
    return (out - (MU + STD * z)).abs().max().item(), out


def test_gaussian_euler_converges_at_first_order():
    e20, _ = transport_error("euler", 20)
    e40, _ = transport_error("euler", 40)
    assert 0.4 < e40 / e20 < 0.6  # halving the step halves the error: a first-order method, implemented right


@pytest.mark.parametrize("sampler", ["unipc", "dpm"])
def test_gaussian_multistep_samplers_transport_noise_to_the_data(sampler):
    err, out = transport_error(sampler, 40)
    euler_err, _ = transport_error("euler", 40)
    # the higher-order solvers leave only their first-order final step to sigma = 0
    # (~ curvature * dsigma^2 / 2 ~ (1/STD) * (1/40)^2 / 2 * |z|max ~ 5e-3): far below Euler's error
    assert err < 0.02 and err < euler_err / 4
    n = out.numel()
    # sample statistics: 5 standard errors of the mean / std estimate, plus the transport error bound
    assert abs(out.mean().item() - MU) < 5 * STD / n**0.5 + err
    assert abs(out.std().item() - STD) < 5 * STD / (2 * n) ** 0.5 + err


def test_batched_guidance_follows_the_guided_field():
    calls = []

    def model(x, sigma, context, mask=None):
        calls.append(x.shape[0])
        return point_mass(x, sigma, context)

    cond, uncond = torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), -0.5)
    out = denoise(
        model, noise(), cond, negative=uncond, guidance=3.0, sampler="euler", steps=6, progress=False
    )
    # v_u + g (v_c - v_u) is the point-mass field of a_u + g (a_c - a_u)
    assert (out - (-0.5 + 3.0 * 1.5)).abs().max() < 1e-4
    assert calls == [4] * 6  # one batched forward per step


def invert_errors(steps, refine):
    """Invert data MU + STD z of the Gaussian field; errors of the noise found and of the Euler round trip."""
    z = noise(1)
    x0, context = MU + STD * z, torch.zeros(2, 1, 1)
    found = invert(gaussian, x0, context, steps=steps, refine=refine, progress=False)
    back = denoise(gaussian, found, context, sampler="euler", steps=steps, progress=False)
    return (found - z).abs().max().item(), (back - x0).abs().max().item()


def test_invert_walks_the_flow_back_and_refine_makes_the_euler_round_trip_exact():
    (noise20, trip20), (noise40, trip40) = invert_errors(20, 0), invert_errors(40, 0)
    # the exact flow carries z to MU + STD z: inversion finds z up to Euler's first-order error
    assert 0.4 < noise40 / noise20 < 0.6 and noise40 < 0.25
    # the plain (DDIM-style) round trip is first order too
    assert 0.4 < trip40 / trip20 < 0.6
    # each fixed-point iteration solves the implicit inverse Euler step better (measured 19x, 12x, then
    # 140x for two more): the round trip becomes exact whatever the step count
    trips = [invert_errors(20, k)[1] for k in (0, 1, 2, 4)]
    assert all(b < a / 8 for a, b in zip(trips, trips[1:])) and trips[-1] < 1e-4


def test_a_partial_inversion_stops_where_a_noised_denoise_starts():
    """invert(strength=s) walks the Euler grid up to the level denoise(strength=s, noised=True) starts from: it
    lands on the exact flow's point there (up to Euler's first-order error), and the round trip comes back."""
    z = noise(1)
    x0, context = MU + STD * z, torch.zeros(2, 1, 1)

    def error(steps):  # the exact flow of N(MU, STD^2) data carries z through (1 - s) MU + sqrt(...) z
        s = sigma_schedule("euler", steps)[steps - round(0.3 * steps)]
        on_path = (1 - s) * MU + ((1 - s) ** 2 * STD**2 + s**2).sqrt() * z
        mid = invert(gaussian, x0, context, steps=steps, strength=0.3, refine=4, progress=False)
        return mid, (mid - on_path).abs().max().item()

    (mid, e20), (_, e40) = error(20), error(40)
    assert e20 < 0.15 and 0.4 < e40 / e20 < 0.6  # measured 0.115 and 0.51
    full = invert(gaussian, x0, context, steps=20, refine=4, progress=False)
    assert (mid - full).abs().max() > 1.0  # it stopped part way
    back = denoise(
        gaussian, mid, context, sampler="euler", steps=20, strength=0.3, noised=True, progress=False
    )
    assert (back - x0).abs().max() < 1e-4
    with pytest.raises(ValueError, match="give no init"):
        denoise(gaussian, mid, context, steps=20, strength=0.3, noised=True, init=x0, progress=False)


def test_sigma_schedule_is_the_samplers_grid():
    scheduler = make_scheduler("unipc", 3.0)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(sigma_schedule("unipc", 7, 3.0), scheduler.sigmas.float())
    assert sigma_schedule("euler", 7)[0] == 1.0 and sigma_schedule("euler", 7)[-1] == 0.0


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    model = VideoDiT(load_config(DiTConfig, "dit", "tiny")).eval()
    with torch.no_grad():  # a fresh model outputs zero (zero-init head); give it a non-trivial field
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_guidance_one_is_the_conditional_model_alone(tiny_dit):
    z = noise(2, (1, 16, 2, 4, 6))
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    out = denoise(tiny_dit, z, cond, negative=uncond, guidance=1.0, sampler="euler", steps=4, progress=False)
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(4)
    x, s = z.clone(), scheduler.sigmas
    with torch.no_grad():
        for i in range(4):  # Euler by hand: x += (sigma_next - sigma) * v(x, sigma)
            x = x + (s[i + 1] - s[i]) * tiny_dit(x, s[i].expand(1), cond)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_batched_guidance_equals_separate_calls_with_uneven_prompts(tiny_dit):
    z = noise(4, (2, 16, 1, 4, 4))
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 6, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    out = denoise(tiny_dit, z, cond, negative=uncond, guidance=4.0, sampler="unipc", steps=5, progress=False)
    scheduler = make_scheduler("unipc")
    scheduler.set_timesteps(5)
    x = z.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i].expand(2)
            v_c, v_u = tiny_dit(x, sigma, cond), tiny_dit(x, sigma, uncond.expand(2, -1, -1))
            x = scheduler.step(v_u + 4.0 * (v_c - v_u), t, x, return_dict=False)[0]
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)


def test_same_seed_same_output_and_other_seed_differs(tiny_dit):
    context = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    shape = (1, 16, 1, 4, 4)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return denoise(tiny_dit, shape, context, sampler="dpm", steps=3, generator=g, progress=False)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_hook_sees_every_step_and_can_pin_a_region():
    target, z = torch.full(SHAPE, 2.0), noise()
    seen = []

    def pin_left_half(step, sigma, x):  # what an inpainting pipeline does with a known region
        seen.append((step, sigma))
        x = x.clone()
        known = add_noise(target, z, torch.full((x.shape[0],), sigma))
        x[..., :16] = known[..., :16]
        return x

    context = torch.full((2, 1, 1), -1.0)
    out = denoise(point_mass, z, context, sampler="unipc", steps=5, hook=pin_left_half, progress=False)
    scheduler = make_scheduler("unipc")
    scheduler.set_timesteps(5)
    assert [s for s, _ in seen] == list(range(6)) and seen[-1][1] == 0.0
    assert [sig for _, sig in seen[:-1]] == pytest.approx(scheduler.sigmas[:5].tolist())
    assert torch.equal(out[..., :16], target[..., :16])
    assert (out[..., 16:] + 1.0).abs().max() < 1e-4


def test_sdedit_strength_starts_from_noised_init():
    init, z = torch.full(SHAPE, 3.0), noise()
    sigmas_seen = []

    def still(x, sigma, context, mask=None):  # zero velocity: the sampler returns its starting point
        sigmas_seen.append(sigma[0].item())
        return torch.zeros_like(x)

    out = denoise(
        still, z, torch.zeros(2, 1, 1), sampler="euler", steps=10, init=init, strength=0.4, progress=False
    )
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(10)
    start = scheduler.sigmas[6]
    assert len(sigmas_seen) == 4 and sigmas_seen[0] == pytest.approx(start.item())
    torch.testing.assert_close(out, add_noise(init, z, start.expand(2)))


@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize("guidance", [(1.0, 1.0), (5.0, 1.5)])
def test_flow_edit_moves_a_point_mass_by_the_difference_of_the_prompts(strength, guidance):
    # For data at one point a (given by the context), v(x) = (x - a) / sigma, and with guidance g against a
    # negative point n the guided point is n + g (a - n). The edit d = z - x0 then obeys
    # dd/dsigma = (d - D) / sigma with D the target's guided point minus the source's: Euler steps shrink
    # d - D by sigma_next / sigma each, so at sigma 0 the edit has moved x0 by exactly D, whatever the noise.
    x0, (g_target, g_source) = noise(3), guidance
    target, source, negative = (
        torch.full((2, 1, 1), 2.0),
        torch.full((2, 1, 1), -1.0),
        torch.full((1, 1, 1), 0.5),
    )
    out = flow_edit(point_mass, x0, target, None, source, None, negative=negative, guidance=g_target,
                    source_guidance=g_source, steps=12, shift=3.0, strength=strength,
                    generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
    moved = (0.5 + g_target * (2.0 - 0.5)) - (0.5 + g_source * (-1.0 - 0.5))
    torch.testing.assert_close(out, x0 + moved, rtol=1e-5, atol=1e-4)


def test_flow_edit_with_the_same_prompt_on_both_sides_returns_the_input_exactly():
    dit = VideoDiT(load_config(DiTConfig, "dit", "tiny")).eval()
    with torch.no_grad():  # the output head starts at zero (no velocity at all): give every weight a value
        for i, p in enumerate(dit.parameters()):
            p.copy_(noise(100 + i, p.shape) * 0.1)
    x0, context = noise(4, (1, 16, 2, 8, 8)), noise(5, (1, 3, 32))
    out = flow_edit(dit, x0, context, None, context.clone(), None, negative=torch.zeros(1, 3, 32), guidance=4.0,
                    source_guidance=4.0, steps=6, strength=0.8, progress=False)  # fmt: skip
    assert torch.equal(out, x0)
    other = flow_edit(dit, x0, -context, None, context, None, steps=6, strength=0.8, progress=False)
    assert not torch.allclose(other, x0)
    with pytest.raises(ValueError, match="strength must be in"):
        flow_edit(dit, x0, context, None, context, None, strength=0.0, progress=False)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="accepted: euler, unipc, dpm"):
        denoise(point_mass, noise(), torch.zeros(2, 1, 1), sampler="ddim", progress=False)
    with pytest.raises(ValueError, match="needs init latents"):
        denoise(point_mass, noise(), torch.zeros(2, 1, 1), strength=0.5, progress=False)


class CallLog(torch.nn.Module):
    """``model`` recording the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x, *args, **kwargs):
        self.batches.append(x.shape[0])
        return self.model(x, *args, **kwargs)


@pytest.mark.parametrize("loop", ["denoise", "flow_edit", "invert"])
def test_split_guidance_runs_the_halves_apart_with_the_batched_result(tiny_dit, loop):
    """``split_guidance``: guidance's halves as two calls of the prompts' batch (uneven prompt lengths, so masks
    differ), the same latents as one batch of both to rounding."""
    z = noise(6, (2, 16, 1, 4, 4))
    g = torch.Generator().manual_seed(7)
    cond, uncond, source = (torch.randn(2, 6, 32, generator=g), torch.randn(1, 3, 32, generator=g),
                            torch.randn(2, 4, 32, generator=g))  # fmt: skip
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False

    def run(split):
        model = CallLog(tiny_dit)
        kw = dict(negative=uncond, guidance=4.0, steps=3, progress=False, split_guidance=split)
        if loop == "denoise":
            out = denoise(model, z, cond, mask, sampler="unipc", **kw)
        elif loop == "flow_edit":
            out = flow_edit(model, z, cond, mask, source, source_guidance=2.0,
                            generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
        else:
            out = invert(model, z, cond, mask, **kw)
        return out, model.batches

    (batched, sizes), (split, split_sizes) = run(False), run(True)
    assert set(sizes) == {4} and set(split_sizes) == {2} and len(split_sizes) == 2 * len(sizes)
    torch.testing.assert_close(split, batched, rtol=0, atol=1e-4)
    assert not torch.allclose(batched, z, atol=1e-3)  # it moved: the comparison can fail


def test_split_guidance_holds_half_the_activations():
    """A 1.3B-wide 2-layer denoiser at 5 x 30 x 52 latents on meta: the batched halves hold twice the
    activations of one call (what diffusers runs), the split ones those of one call."""
    from vidlatent.config import merge_config
    from vidlatent.diffusion.sampling import guided_velocity
    from vidlatent.runtime.memory import PeakMemory

    cfg = merge_config(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), {"num_layers": 2})
    with torch.device("meta"):
        model = VideoDiT(cfg).to(torch.bfloat16)
    x = torch.empty(1, 16, 5, 30, 52, device="meta")
    cond, uncond = (torch.empty(1, 512, 4096, device="meta", dtype=torch.bfloat16) for _ in range(2))
    peaks = {}
    for split in (False, True):
        velocity = guided_velocity(model, cond, None, uncond, None, 5.0, split=split)
        with torch.inference_mode(), PeakMemory() as memory:
            velocity(x, torch.tensor(0.5, device="meta"))
        peaks[split] = memory.peak
    assert peaks[True] < 0.6 * peaks[False], peaks
