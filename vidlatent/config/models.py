"""The model configs: one dataclass per component, mirrored by the yaml presets under ``vidlatent/configs/``.

Field names are public API (they are stored in every saved folder's config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "VAEConfig",
    "DiTConfig",
    "TextConfig",
    "HFTextConfig",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<empty>")  # ids 0, 1, 2 of every built-in vocabulary
HF_SUBFOLDER = "hf"  # where a text folder keeps its Hugging Face model

# Wan 2.1 VAE latent statistics (per channel), as published with the model.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# Wan 2.2 VAE latent statistics (48 channels), as published with the model (Wan2.2 wan/modules/vae2_2.py).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

VAE_STAGE_SHORTCUTS = ("none", "resample")
VAE_FIRST_FRAME = ("alone", "still", "still_context")  # VAEConfig.first_frame


@dataclass
class VAEConfig:
    """The Wan causal VAE family (2.1 and 2.2). Defaults are the Wan 2.1 VAE itself.

    What Wan 2.2 changes is three options, each meaning one thing: ``patch_size`` (pixels folded into
    channels around the network), ``decoder_base_channels`` (a decoder wider than the encoder) and
    ``stage_shortcut`` (parameter-free shortcuts around each resolution stage).
    """

    in_channels: int = 3
    base_channels: int = 96
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    # one entry per downsampling stage (len(channel_mult) - 1); True = that stage also halves time
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    latent_channels: int = 16
    dropout: float = 0.0
    latents_mean: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(WAN21_LATENTS_STD))
    # the first latent frame's own per-channel statistics, or None (Wan): latents_mean / latents_std for every
    # frame. The causal VAE encodes frame 0 alone, and a small VAE's frame-0 latents can carry much less
    # contrast than the later frames' (the default model's: a quarter of their spatial variance), which leaves
    # a denoiser's error on that frame, relative to its content, several times larger
    first_latents_mean: list[float] | None = None
    first_latents_std: list[float] | None = None
    # p x p pixel patches folded into channels before the encoder and unfolded after the decoder (Wan 2.2: 2);
    # the spatial factor is then 2^stages x p
    patch_size: int = 1
    # the decoder's base width; None = base_channels (Wan 2.1). Wan 2.2: encoder 160, decoder 256
    decoder_base_channels: int | None = None
    # "none" (Wan 2.1): plain stages, each decoder upsampler halves the channels. "resample" (Wan 2.2): each
    # stage adds a parameter-free resampled copy of its input (channel-grouped average pooling down,
    # duplication up), and decoder upsamplers keep the channels
    stage_shortcut: str = "none"
    # how the encoder codes a clip's first frame: "alone" (Wan): the causal first latent frame is frame 0 encoded by
    # itself; "still": the second latent frame of a still clip of 1 + temporal_factor copies of frame 0 (still
    # causal; later latent frames as with "alone"), the code later frames get. A small VAE's first frame alone can
    # carry a faint colour at a thirtieth of its later frames' signal (issue 26); an image is encoded alike.
    # "still_context": the clip with frame 0 repeated 1 + temporal_factor times, its first latent frame dropped:
    # frame 0 as with "still", and the later frames encoded after that still (with "still" they are encoded after
    # frame 0 alone, so the decoder reads them after a first latent frame from another context)
    first_frame: str = "alone"
    # streaming: latent frames per chunk after the first (the first frame is always its own chunk)
    chunk_size: int = 1
    # spatial tiling, in pixels; tiling switches on automatically when h or w exceeds auto_tile_above
    tile_size: int = 256
    tile_overlap: int = 64
    auto_tile_above: int = 1024

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1) * self.patch_size

    @property
    def decoder_channels(self) -> int:
        """The decoder's base width (``decoder_base_channels``, or ``base_channels`` when unset)."""
        return self.base_channels if self.decoder_base_channels is None else self.decoder_base_channels

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


@dataclass
class DiTConfig:
    """The Wan 2.1 transformer family: text-to-video, and by ``image_dim`` the image-conditioned I2V / FLF2V
    variant. Defaults are Wan 2.1 T2V-1.3B."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w)
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096
    text_len: int = 512  # text tokens the model was trained with (context is padded to this)
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: str = "rms_across_heads"  # "rms_across_heads" | "none"
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Image conditioning (Wan 2.1 I2V / FLF2V): the width of the CLIP image tokens the model cross-attends to
    # (1280), through its own key/value projections; None = a text-to-video model. Such a model also takes
    # in_channels - out_channels condition channels (Wan: 4 mask + 16 image latents = 36 in, 16 out).
    image_dim: int | None = None
    # FLF2V: a learned position embedding over the image tokens of both frames (2 x 257 = 514); None = none
    image_pos_len: int | None = None
    attention: str = "sdpa"  # the attention kernel used by models.layers.attention
    gradient_checkpointing: bool = False

    @property
    def condition_channels(self) -> int:
        """Channels concatenated to the noisy latents before the patch embedding (0 for text-to-video)."""
        return self.in_channels - self.out_channels


@dataclass
class TextConfig:
    """The built-in word-level encoder. ``vocab`` starts with ``<pad> <unk> <empty>`` (see ``build_vocab``)."""

    vocab: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))
    dim: int = 256
    ffn_dim: int = 1024
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 32  # words + punctuation marks; longer prompts are truncated (with a warning)
    # hashed character trigrams added to every word's embedding (fastText style), so unknown and inflected
    # words ("slides", "balls") share features with known ones instead of all becoming <unk>; 0 turns it off
    trigram_buckets: int = 1024
    padding: str = "longest"  # "longest": n = longest prompt in the batch; "max_length": n = max_length
    eps: float = 1e-6
    attention: str = "sdpa"  # the kernel used by models.layers.attention
    # initialization draws from a private generator with this seed: same config, same weights
    seed: int = 0


@dataclass
class HFTextConfig:
    """A Hugging Face encoder stored in (or referenced by) a vidlatent text folder."""

    path: str = HF_SUBFOLDER  # model folder, relative to the vidlatent folder or absolute
    tokenizer_path: str | None = None  # tokenizer folder if not the model folder
    max_length: int | None = None  # None: the model's position limit (CLIP 77, BERT 512), else 512 (T5, Wan)
    padding: str = "max_length"  # Wan zero-pads UMT5 output to 512 tokens and keeps the mask
    clean: str = "none"  # prompt clean-up before tokenizing: "none", or "wan" (``wan_clean``, as Wan does)
