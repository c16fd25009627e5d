"""Control inputs as VACE builds them, and one controlled sampling run (``sample_control``).

From a control video, an optional mask video and optional reference images, VACE makes one latent video of
``2c + p*q`` channels (``control_latents``):

- the video split by the (binarized) mask into an *inactive* part (where the mask is 0: kept) and a
  *reactive* part (where it is 1: to be generated), each encoded by the VAE to normalized latents;
- the mask folded into latent resolution: every p x q pixel block becomes p*q channels (space-to-depth), and
  the frames are resampled to the latent frame count (nearest);
- each reference image, fitted onto a white canvas of the video's size, encoded as a one-frame clip and put
  in front as a latent frame of its own (its reactive half and its mask zero).

The denoiser then samples ``references + latent frames`` frames; the leading reference frames are dropped
before decoding. Without a mask the whole video is reactive (the control signal itself: a pose, depth or
silhouette video); without a video there is nothing to keep.

Multiple reference images go in the order given, as in the original VACE (diffusers' ``WanVACEPipeline``
puts them in reverse order; with one reference the two agree).

Wan2.1-Fun Control (alibaba-pai's Wan2.1-Fun-1.3B/14B-Control) has no branch: its denoiser reads 3c input
channels, the noisy latents then ``fun_control_inputs``' condition (the control video's latents, then a first
frame's latents in latent frame 0 and zeros after), and CLIP tokens of that image (zeros without one), as
VideoX-Fun's ``WanFunControlPipeline`` builds them. No mask and no hint scale.

Letters: b batch, c latent channels, t h w frames/height/width, r reference images, p q pixels per latent
pixel (the VAE's spatial factor), i image tokens, d their width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ..diffusion.sampling import denoise
from ..models.control import ControlledDiT, Scale, hint_scales
from ..models.image import ImageEncoder
from ..models.vae import CausalVAE
from ..runtime.cache import Cached, CacheState


@torch.no_grad()
def control_latents(
    vae: CausalVAE,
    video: torch.Tensor,
    mask: torch.Tensor | None = None,
    reference: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """VACE's control latents (b, 2c + p*q, r + t', h', w') fp32 for a control ``video`` (b, 3, t, h, w) in
    [-1, 1], a ``mask`` (b, 1, t, h, w) in [0, 1] (1 = generate; > 0.5 counts as 1; None: all 1) and
    ``reference`` images, each (b, 3, h_i, w_i) in [-1, 1] (any size: fitted onto a white canvas).

    ValueError when the video is not (b, 3, 1 + k*tf, h, w) with h and w multiples of the VAE's factor, or
    the mask not one channel of the video's size.
    """
    check_control_video(video, vae.temporal_factor, vae.spatial_factor)
    b, _, t, h, w = video.shape
    if mask is None:
        mask = torch.ones(b, 1, t, h, w, device=video.device)
    elif mask.ndim != 5 or tuple(mask.shape) != (b, 1, t, h, w):
        raise ValueError(
            f"the mask must be one channel of the control video's size, (b, 1, t, h, w) = {(b, 1, t, h, w)}; "
            f"got {tuple(mask.shape)}"
        )
    mask = (mask.to(video.device) > 0.5).to(video.dtype)
    inactive, reactive = encode(vae, video * (1 - mask)), encode(vae, video * mask)
    latents = torch.cat([inactive, reactive], dim=1)
    folded = fold_mask(mask, latents.shape[2], vae.spatial_factor)
    refs = [encode(vae, fit_image(image, h, w)[:, :, None]) for image in as_images(reference, b)]
    if refs:
        ref_latents = torch.cat([torch.cat([z, torch.zeros_like(z)], dim=1) for z in refs], dim=2)
        latents = torch.cat([ref_latents, latents], dim=2)
        folded = torch.cat([folded.new_zeros(*folded.shape[:2], len(refs), *folded.shape[3:]), folded], dim=2)
    return torch.cat([latents, folded], dim=1)


@torch.no_grad()
def sample_control(
    vae: CausalVAE,
    model: ControlledDiT,
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    *,
    control: torch.Tensor,
    mask: torch.Tensor | None = None,
    reference: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scale: Scale = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    output_type: str = "video",
    cache: CacheState | None = None,
    **options,
) -> torch.Tensor:
    """Generate a video steered by a ``control`` video (b, 3, t, h, w) (with a ``mask`` and ``reference``
    images as in ``control_latents``): the output has the control video's size. Returns the video
    (b, 3, t, h, w) in [-1, 1], or with ``output_type="latent"`` its normalized latents; either way without
    the reference frames.

    ``scale``: the hints' scale (a float, one per hint, or (b, hints)). ``noise``: the start noise
    (b, c, r + t', h', w'), else drawn from ``generator``. ``options`` go to ``sampling.denoise`` (negative
    tokens, guidance, sampler, steps, shift, timesteps, scheduler_config, hook, progress, ...). ``cache``: a
    step cache's state for this run (``runtime.cache.CacheState``), or None.
    """
    if output_type not in ("video", "latent"):
        raise ValueError(f"unknown output_type {output_type!r}; accepted: video, latent")
    _, ph, pw = model.config.patch_size
    if control.ndim == 5 and (
        control.shape[3] % (vae.spatial_factor * ph) or control.shape[4] % (vae.spatial_factor * pw)
    ):
        raise ValueError(
            f"the control video is {control.shape[4]}x{control.shape[3]} (width x height); its sides must be "
            f"multiples of {vae.spatial_factor * ph} and {vae.spatial_factor * pw} (VAE x patch)"
        )
    latents = control_latents(vae, control, mask, reference).to(model.dit.patch_embed.weight.dtype)
    want = model.control.config.in_channels
    if latents.shape[1] != want:
        raise ValueError(
            f"the control branch reads {want} channels; this VAE makes control latents of {latents.shape[1]} "
            f"(2 x {vae.config.latent_channels} + {vae.spatial_factor}^2)"
        )
    b, _, t, h, w = latents.shape
    shape = (b, model.config.out_channels, t, h, w)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(
            f"noise must have the control latents' size, (b, c, r + t', h', w') = {shape}; got {tuple(noise.shape)}"
        )
    scales = hint_scales(scale, b, len(model.control.config.layers), latents.device)
    z = denoise(
        model if cache is None else Cached(model, cache),
        shape if noise is None else noise,
        context,
        context_mask,
        generator=generator,
        model_kwargs={"control": latents, "control_scale": scales},
        **options,
    )
    references = t - (1 + (control.shape[2] - 1) // vae.temporal_factor)
    z = z[:, :, references:]
    if output_type == "latent":
        return z
    return vae.decode(vae.denormalize(z.float())).float()


@torch.no_grad()
def fun_control_inputs(
    vae: CausalVAE,
    video: torch.Tensor,
    reference: torch.Tensor | None = None,
    image_encoder: ImageEncoder | None = None,
) -> dict[str, torch.Tensor]:
    """The denoiser keywords of Wan2.1-Fun Control for a control ``video`` (b, 3, t, h, w) in [-1, 1] and an
    optional ``reference`` image (1 or b, 3, h_i, w_i) in [-1, 1] of any size, the first frame to show, as
    VideoX-Fun's ``WanFunControlPipeline`` builds them:

    - ``condition`` (b, 2c, t', h', w') fp32, joined after the noisy latents: the control video's normalized
      latents (the posterior mode of the video as given), then the reference's (stretched to h x w, bilinear,
      and encoded as a one-frame clip) in latent frame 0 and zeros in the others; zeros without a reference,
      and for a one-latent-frame output (VideoX-Fun leaves them zero there too);
    - ``image`` (b, i, d) with an ``image_encoder``: the reference's CLIP tokens (of the image as given), or
      zeros of that shape without one.

    ValueError when the video is not (b, 3, 1 + k*tf, h, w) with h and w multiples of the VAE's factor, or the
    reference not one image.
    """
    check_control_video(video, vae.temporal_factor, vae.spatial_factor)
    b, _, _, h, w = video.shape
    control = encode(vae, video)
    first = torch.zeros_like(control)
    image = None if reference is None else as_images(reference, b)[0].to(video.device)
    if image is not None and control.shape[2] > 1:
        first[:, :, :1] = encode(vae, stretch(image, h, w)[:, :, None])
    kwargs = {"condition": torch.cat([control, first], dim=1)}
    if image_encoder is not None:
        if image is None:
            kwargs["image"] = torch.zeros(b, image_encoder.tokens, image_encoder.dim, device=video.device)
        else:
            kwargs["image"] = image_encoder.encode(image).to(video.device)
    return kwargs


# ------------------------------------------------------------------------------------------------ parts


def check_control_video(video: torch.Tensor, temporal_factor: int, spatial_factor: int) -> None:
    """ValueError unless ``video`` is a float (b, 3, 1 + k*tf, h, w) clip with sides multiples of sf."""
    ok = (
        isinstance(video, torch.Tensor)
        and video.ndim == 5
        and video.shape[1] == 3
        and video.is_floating_point()
    )
    if not ok:
        what = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"the control video must be a float tensor (b, 3, t, h, w) in [-1, 1]; got {what}")
    t, h, w = video.shape[2:]
    if (t - 1) % temporal_factor or h % spatial_factor or w % spatial_factor:
        raise ValueError(
            f"the control video has {t} frames of {w}x{h} (width x height): frames must be 1 + {temporal_factor}k "
            f"and sides multiples of {spatial_factor}"
        )


def encode(vae: CausalVAE, video: torch.Tensor) -> torch.Tensor:
    """Pixels (b, 3, t, h, w) -> normalized latents fp32 (the posterior mean), as every job encodes."""
    return vae.normalize(vae.encode(video).mode().float())


def fold_mask(mask: torch.Tensor, frames: int, spatial_factor: int) -> torch.Tensor:
    """A pixel mask (b, 1, t, h, w) -> (b, p*q, frames, h/p, w/q): each p x q block's pixels become channels
    (row-major in the block), and the t frames are resampled to ``frames`` (nearest, as VACE)."""
    sf = spatial_factor
    folded = rearrange(mask, "b 1 t (h p) (w q) -> b (p q) t h w", p=sf, q=sf)
    return F.interpolate(folded, size=(frames, *folded.shape[3:]), mode="nearest-exact")


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image (b, 3, h, w) scaled to fit inside height x width (bilinear, aspect kept) and centred on a white
    canvas of that size, as VACE places its reference images."""
    h, w = image.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = int(h * scale), int(w * scale)
    resized = F.interpolate(image.float(), size=(nh, nw), mode="bilinear", align_corners=False)
    canvas = torch.ones(image.shape[0], 3, height, width, device=image.device)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, :, top : top + nh, left : left + nw] = resized
    return canvas


def stretch(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image (b, 3, h, w) resized to height x width, aspect not kept (bilinear, antialiased, kept in the
    input's range), as VideoX-Fun resizes its first frame; as it is when it has that size."""
    if tuple(image.shape[-2:]) == (height, width):
        return image.float()
    resized = F.interpolate(
        image.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp(image.min(), image.max())


def as_images(reference, b: int) -> list[torch.Tensor]:
    """None, one image or a sequence of images, each (b, 3, h, w) or (3, h, w) -> a list of (b, 3, h, w)."""
    if reference is None:
        return []
    images = [reference] if isinstance(reference, torch.Tensor) else list(reference)
    out = []
    for image in images:
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] not in (1, b):
            raise ValueError(
                f"a reference image must be (3, h, w) or (b={b}, 3, h, w); got {tuple(image.shape)}"
            )
        out.append(image.float().expand(b, -1, -1, -1))
    return out
