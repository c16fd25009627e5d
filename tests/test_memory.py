"""Peak tensor memory: the counter itself, and the VAE's and the denoiser's peaks against diffusers' on the meta
device."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from vidlatent import CausalVAE, StreamCache
from vidlatent.config import DiTConfig, VAEConfig, load_config, merge_config
from vidlatent.models.dit import VideoDiT, _cast, to_diffusers_config
from vidlatent.models.layers import RMSNorm
from vidlatent.models.vae import vae_config_to_diffusers
from vidlatent.runtime.memory import PeakMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_dit import fp32_as_loaded  # noqa: E402  (the benchmark's own: both size diffusers' model as loaded)

MB = 4 * 1000 * 1000  # a 1000 x 1000 fp32 tensor


def test_counts_what_is_made_and_frees_what_dies():
    outside = torch.ones(1000, 1000)
    with PeakMemory() as memory:
        view = outside[:10]  # a view of a storage from before: nothing new
        outside.mul_(2)  # in place on it: nothing new
        y = outside * 2  # one new tensor
        part = y[:5].clone()  # 5 rows: 20 KB
        also_y = y.view(-1)  # a view of y: the same storage, counted once
        del y, also_y
        z = torch.empty(1000, 1000)  # y is gone, so the peak stays at one tensor and the clone
    assert memory.peak == MB + 20_000
    assert memory.current == 20_000 + MB
    assert [held.op for held in memory.at_peak] == ["aten.mul.Tensor", "aten.clone.default"]
    assert memory.at_peak[0].shape == (1000, 1000)
    del view, part, z


def _meta_pair(dtype):
    cfg = load_config(VAEConfig, "vae", "wan2.1")
    with torch.device("meta"):
        ours, ref = CausalVAE(cfg), AutoencoderKLWan(**vae_config_to_diffusers(cfg))
    return ours.to(dtype).eval(), ref.to(dtype).eval()


def _peak(fn) -> int:
    with torch.no_grad(), PeakMemory() as memory:
        fn()
    return memory.peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vae_peak_memory_not_above_diffusers(dtype):
    """Sized on the meta device (no data): the Wan 2.1 VAE at 17 x 128 x 224. Ours held 1.8x diffusers' peak
    while its stream caches kept views of whole concatenations and its norms made fp32 copies of bf16 inputs."""
    ours, ref = _meta_pair(dtype)
    x = torch.zeros(1, 3, 17, 128, 224, device="meta", dtype=dtype)
    z = torch.zeros(1, 16, 5, 16, 28, device="meta", dtype=dtype)
    encode = _peak(lambda: ours.encode(x, tile=False).mean), _peak(lambda: ref.encode(x).latent_dist.mean)
    decode = _peak(lambda: ours.decode(z, tile=False)), _peak(lambda: ref.decode(z).sample)
    assert encode[0] <= 1.1 * encode[1], encode
    assert decode[0] <= 1.0 * decode[1], decode


def test_attention_on_meta_is_held_as_a_flash_kernel_holds_it():
    """On meta, SDPA's math path would make the (tokens x tokens) matrix no GPU kernel holds: sized as flash."""
    sdpa = F.scaled_dot_product_attention
    q = torch.empty(1, 4, 4096, 64, device="meta", dtype=torch.bfloat16)
    with PeakMemory() as memory:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and F.scaled_dot_product_attention is sdpa
    assert memory.peak < 2 * q.nbytes  # the output and its log-sum-exp, not 4 x 4096 x 4096
    real = torch.randn(1, 2, 16, 8)
    with PeakMemory():  # tensors with data are computed as ever
        assert torch.equal(F.scaled_dot_product_attention(real, real, real), sdpa(real, real, real))


@pytest.mark.parametrize("per_token", [False, True])
def test_dit_peak_memory_not_above_diffusers(per_token, monkeypatch):
    """A 1.3B-wide 4-layer Wan denoiser at 5 x 30 x 52 latents, bf16, on meta. Ours held 1.11x diffusers' peak
    (the patch tokens kept through every block, a block's cross-attention input through its feed-forward) and,
    with one noise level per token (Wan 2.2 TI2V), 1.27x (all six (tokens, dim) fp32 modulation rows at once)."""
    cfg = merge_config(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), {"num_layers": 4})
    with torch.device("meta"):
        ours = _cast(VideoDiT(cfg), torch.bfloat16)
        ref = WanTransformer3DModel(**to_diffusers_config(cfg)).to(torch.bfloat16)
    fp32_as_loaded(ref)
    tokens = 5 * 15 * 26
    x = torch.empty(1, 16, 5, 30, 52, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 512, 4096, device="meta", dtype=torch.bfloat16)
    sigma = torch.empty(1, *([tokens] if per_token else []), device="meta")
    if per_token:  # torch.unique has no meta kernel: two levels, a TI2V step's clean first frame and the rest
        monkeypatch.setattr(
            torch, "unique", lambda s, return_inverse: (s.new_empty(2), torch.zeros_like(s, dtype=torch.long))
        )
    with torch.inference_mode():
        peaks = (
            _peak(lambda: ours(x, sigma, ctx)),
            _peak(lambda: ref(x, 1000 * sigma, ctx, return_dict=False)),
        )
    assert peaks[0] <= peaks[1], peaks


def test_control_hints_are_held_one_at_a_time():
    """VACE with a hint after each of 8 blocks, 1.3B wide, 5 x 30 x 52 latents, bf16, on meta: ours computes each
    hint when its block is reached (it computed all first and held them through the forward, as diffusers does)."""
    from diffusers import WanVACETransformer3DModel

    from vidlatent.config.control import control_config_for
    from vidlatent.models.control import ControlBranch, ControlledDiT

    cfg = merge_config(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), {"num_layers": 8})
    control_cfg = control_config_for(cfg, layers=list(range(8)))
    with torch.device("meta"):
        ours = ControlledDiT(
            _cast(VideoDiT(cfg), torch.bfloat16), _cast(ControlBranch(control_cfg), torch.bfloat16)
        )
        ref = WanVACETransformer3DModel(**to_diffusers_config(cfg), vace_layers=control_cfg.layers,
                                        vace_in_channels=control_cfg.in_channels).to(torch.bfloat16)  # fmt: skip
    fp32_as_loaded(ref)
    x = torch.empty(1, 16, 5, 30, 52, device="meta", dtype=torch.bfloat16)
    control = torch.empty(1, control_cfg.in_channels, 5, 30, 52, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, 512, 4096, device="meta", dtype=torch.bfloat16)
    sigma = torch.empty(1, device="meta")
    with torch.inference_mode():
        peaks = (_peak(lambda: ours(x, sigma, ctx, control=control)),
                 _peak(lambda: ref(x, 1000 * sigma, ctx, control_hidden_states=control, return_dict=False)))  # fmt: skip
    hint = 5 * 15 * 26 * 1536 * 2  # (tokens, dim) bf16
    assert peaks[0] <= peaks[1] - 6 * hint, (peaks, hint)  # of 8 hints at most 2 held, less their share


def test_stream_cache_holds_only_the_frames_it_needs():
    """A cache entry owns its few past frames; a view would keep the chunk's whole concatenation alive."""
    vae = CausalVAE.from_pretrained("tiny").eval()
    cache = StreamCache()
    with torch.no_grad():
        for a, b in [(0, 1), (1, 5), (5, 9)]:
            vae.encode_step(torch.zeros(1, 3, 9, 32, 32)[:, :, a:b], cache)
    assert cache.past
    for past in cache.past.values():
        assert past.untyped_storage().nbytes() == past.numel() * past.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_norm_low_precision(dtype):
    """Sums and factors in fp32, each product rounded once: within a few units of the last place of the fp32
    result, in range for fp16 inputs whose squares overflow, and the same whether written in place or not."""
    norm = RMSNorm(384, channels_first=True)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 3.0, 384).view(-1, 1, 1, 1))
        x = torch.randn(1, 384, 2, 6, 6, generator=torch.Generator().manual_seed(0)) * 3000
        x[:, :, :, 0] = 0.0  # a zero pixel: its norm is clamped, its output 0
        want = norm(x)
        low = x.to(dtype)
        got = norm.to(dtype)(low)
        copy = low.clone()
        in_place = norm(copy, out=copy)
    assert low.dtype == got.dtype == dtype and got.isfinite().all()
    assert torch.equal(got, in_place)
    eps = torch.finfo(dtype).eps
    assert ((got.float() - want).abs() <= 4 * eps * want.abs() + 1e-6).all()
    assert (got[:, :, :, 0] == 0).all()
