"""The model configs: one dataclass per component, mirrored by the yaml presets under ``vidlatent/configs/``.

Field names are public API (they are stored in every saved folder's config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["VAEConfig", "DiTConfig", "TextConfig", "HFTextConfig", "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD"]

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


@dataclass
class VAEConfig:
    """The Wan 2.1 causal VAE family. Defaults are the Wan 2.1 VAE itself."""

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
    # streaming: latent frames per chunk after the first (the first frame is always its own chunk)
    chunk_size: int = 1
    # spatial tiling, in pixels; tiling switches on automatically when h or w exceeds auto_tile_above
    tile_size: int = 256
    tile_overlap: int = 64
    auto_tile_above: int = 1024

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

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
