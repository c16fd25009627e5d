"""Text encoders behind one interface: ``encode(prompts) -> (tokens (b, n, d) float32, mask (b, n) bool)``.

* ``BuiltinTextEncoder``: a small word-level transformer with its own tokenizer, for the shipped default model
  (captions of a procedural world). Trainable jointly with the denoiser; deterministic.
* ``HFTextEncoder``: a Hugging Face transformers encoder from a local folder (T5 / UMT5 as in Wan, CLIP text,
  BERT-like); needs the optional extra ``pip install vidlatent[text]``; never downloads.
* ``load_text_encoder(src)``: a preset name, a vidlatent text folder, a Hugging Face model folder, or a
  diffusers pipeline root (``text_encoder/`` + ``tokenizer/``).

Conventions shared by both: mask True marks a real token; padded positions have mask False and zero tokens;
every row has at least one real token, so attention over the text always has a key. The empty prompt ``""``
(the unconditional / negative prompt of classifier-free guidance) is one real token: the built-in encoder's
``<empty>`` token (learned when training drops captions to ""), or whatever the HF tokenizer makes of "" (T5:
``</s>``; a tokenizer that adds nothing gets its pad token, marked real).

Letters: b batch, n tokens, d width, h heads, e head dim, k character trigrams per word.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import re
import shutil
import tempfile
import unicodedata
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from ..checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    atomic_write,
    load_into,
    load_state_dict,
    names_source,
    override_items,
    read_json,
    resolve_source,
    save_folder,
)
from ..config import (
    HF_SUBFOLDER,
    SPECIAL_TOKENS,
    HFTextConfig,
    TextConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from .layers import ATTENTION_BACKENDS, RMSNorm, attention

PAD, UNK, EMPTY = SPECIAL_TOKENS  # ids 0, 1, 2 of every built-in vocabulary
PADDINGS = ("longest", "max_length")
KIND = "text"  # the ``_vidlatent_kind`` of a text encoder folder

_WORDS = re.compile(r"\w+")  # punctuation separates words and is dropped: it never changes the tokens
_MAX_TRIGRAMS = 16  # trigrams kept per word (a word of 14+ characters keeps its first 16)


# ----------------------------------------------------------------------------------------------- configs


# ---------------------------------------------------------------------------------------------- tokenizer


def dropped_symbols(text: str) -> list[str]:
    """The symbols of ``text`` that ``split_words`` leaves out and that may have been meant (Unicode category S:
    emoji, arrows, math, currency), in order, once each; punctuation is not among them: it only separates."""
    normal = unicodedata.normalize("NFKC", text)
    return list(dict.fromkeys(c for c in normal if unicodedata.category(c).startswith("S")))


def split_words(text: str) -> list[str]:
    """Lowercase (after NFKC), then split into words; punctuation only separates them: "Red, ball!" -> red ball.
    So case and punctuation never change a prompt's tokens ("a red circle, moving right." is "a red circle
    moving right")."""
    return _WORDS.findall(unicodedata.normalize("NFKC", text).lower())


def build_vocab(texts: Iterable[str], min_count: int = 1, max_size: int | None = None) -> list[str]:
    """Vocabulary for ``TextConfig.vocab``: the special tokens, then words by frequency (ties alphabetical).

    ``min_count`` drops rare words; ``max_size`` caps the total size (specials included). Deterministic.
    """
    counts = Counter(w for t in texts for w in split_words(_check_text(t)))
    kept = (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS)
    words = sorted(kept, key=lambda w: (-counts[w], w))
    vocab = [*SPECIAL_TOKENS, *words]
    return vocab if max_size is None else vocab[: max(max_size, len(SPECIAL_TOKENS))]


def word_trigrams(word: str, buckets: int) -> list[int]:
    """Hashed character trigrams of ``<word>`` in ``[1, buckets]`` (0 is padding); crc32, so stable everywhere."""
    return list(_trigrams(word, buckets))


@functools.lru_cache(maxsize=65536)  # a training run tokenizes the same few hundred words every step
def _trigrams(word: str, buckets: int) -> tuple[int, ...]:
    padded = f"<{word}>"
    grams = [padded[i : i + 3] for i in range(max(len(padded) - 2, 1))][:_MAX_TRIGRAMS]
    return tuple(1 + zlib.crc32(g.encode("utf-8")) % buckets for g in grams)


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
    return text


def check_prompts(prompts: Sequence[str] | str, name: str = "prompts") -> list[str]:
    """``prompts`` as a non-empty list of str; anything else raises ValueError naming the argument ``name``."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
        empty = " (an empty list)" if isinstance(prompts, Sequence) and not prompts else ""
        raise ValueError(
            f"{name} must be a str or a list of str; got {type(prompts).__name__}: {prompts!r:.80}{empty}"
        )
    return list(prompts)


def wan_clean(text: str) -> str:
    """Wan's prompt clean-up: ftfy's text repair when ftfy is installed, HTML entities decoded (twice, for
    doubly escaped text), every run of white space one space, no white space at either end."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


CLEANERS = {"none": lambda text: text, "wan": wan_clean}


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the built-in text encoder never saw in training (not in its vocabulary): they are read
    from their letters alone (hashed trigrams), which may mean nothing to the model."""


# ------------------------------------------------------------------------------------------- interface


class TextEncoder(nn.Module):
    """Base class of text encoders: ``encode(prompts) -> (tokens (b, n, d) float32, mask (b, n) bool)``."""

    dim: int

    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(b, n, d)`` float32 on the module's device and mask ``(b, n)`` bool (True = real token).

        ``n`` is the longest prompt of the batch or a fixed ``max_length``; padded positions have mask False and
        zero tokens; every row has at least one real token (the empty prompt too).
        """
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a vidlatent text folder that ``load_text_encoder`` reads back."""
        raise NotImplementedError

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` this encoder has never seen, in order, once each ([] for an encoder with a
        subword tokenizer, which reads every word)."""
        return []

    @classmethod
    def from_pretrained(cls, src: str | Path, device=None, dtype=None, overrides: Sequence[str] = ()):
        """``load_text_encoder``, checking that the result is a ``cls``."""
        enc = load_text_encoder(src, device=device, dtype=dtype, overrides=overrides)
        if not isinstance(enc, cls):
            raise ValueError(f"{src} holds a {type(enc).__name__}, not a {cls.__name__}")
        return enc

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ------------------------------------------------------------------------------------- built-in encoder


class Block(nn.Module):
    """Pre-norm transformer layer: self-attention over the real tokens, then a GELU MLP."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.backend = cfg.num_heads, cfg.attention
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qkv = rearrange(
            self.qkv(self.norm1(x)), "b n (three h e) -> three b h n e", three=3, h=self.num_heads
        )
        out = attention(*qkv.unbind(0), mask=mask, backend=self.backend)
        x = x + self.proj(rearrange(out, "b h n e -> b n (h e)"))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class BuiltinTextEncoder(TextEncoder):
    """A small word-level transformer: word embedding (+ mean of hashed trigram embeddings) + learned positions
    -> pre-norm layers -> final RMSNorm. Unknown words map to ``<unk>`` plus their own trigrams.

    ``tokenize`` turns prompts into ids (for data loaders); ``forward(ids, trigrams, mask)`` is the network;
    ``encode`` does both. Gradients flow (no ``no_grad``), so it trains jointly with the denoiser.
    ``add_words`` grows the vocabulary (for fine-tuning on captions with new words).
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.dim = config.dim
        self.index = {w: i for i, w in enumerate(config.vocab)}
        self.word_embed = nn.Embedding(len(config.vocab), config.dim)
        self.trigram_embed = (
            nn.Embedding(config.trigram_buckets + 1, config.dim, padding_idx=0)
            if config.trigram_buckets
            else None
        )
        self.pos_embed = nn.Parameter(torch.empty(config.max_length, config.dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.eps)
        if self.pos_embed.device.type != "meta":
            init_weights(self)
        self.reported: set[str] = set()  # unknown words already named by a warning (each is named once)

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of ``prompt`` not in the vocabulary, in order, once each (after lowercasing; punctuation is
        no word): "a Crimson pyramid, crimson!" -> ["crimson", "pyramid"]."""
        return list(dict.fromkeys(w for w in split_words(_check_text(prompt)) if w not in self.index))

    def add_words(self, words: Iterable[str] | str) -> list[str]:
        """Append the words not yet in the vocabulary (in order, once each; each entry normalised as
        ``split_words`` does, so "Big" adds "big"; special tokens are skipped) and return them.

        Each new word-embedding row starts as a copy of the ``<unk>`` row, the one the word was read with
        before, so every prompt encodes bitwise as it did until training moves the new rows. The config's
        vocabulary grows with them (``save_pretrained`` writes it). Call before an optimizer is made: the
        word embedding is a new parameter.
        """
        entries = [words] if isinstance(words, str) else list(words)
        found = (w for e in entries if _check_text(e) not in SPECIAL_TOKENS for w in split_words(e))
        added = list(dict.fromkeys(w for w in found if w not in self.index))
        if not added:
            return []
        old = self.word_embed.weight
        with torch.no_grad():
            rows = old[self.index[UNK]].expand(len(added), -1)
            weight = torch.cat([old.detach(), rows])
        self.word_embed = nn.Embedding.from_pretrained(weight, freeze=not old.requires_grad)
        self.config = dataclasses.replace(self.config, vocab=[*self.config.vocab, *added])
        self.index.update((w, i) for i, w in enumerate(added, len(self.index)))
        return added

    def warn_unknown(self, prompts: Sequence[str] | str) -> None:
        """One ``UnknownWordsWarning`` line per prompt that holds unknown words not named before by this encoder
        (so a training loop or a sampler calling ``encode`` again names each word once), and one for symbols it
        leaves out (``dropped_symbols``: an emoji-only prompt would otherwise be an empty one, silently)."""
        for prompt in check_prompts(prompts):
            shown = prompt if len(prompt) <= 80 else f"{prompt[:60]}... ({len(prompt)} characters)"
            new = [w for w in self.unknown_words(prompt) if w not in self.reported]
            if new:
                self.reported.update(new)
                warnings.warn(
                    f"the text encoder has never seen {', '.join(map(repr, new))} (in the prompt {shown!r}): "
                    f"{'it is' if len(new) == 1 else 'they are'} read from the letters alone and may mean "
                    f"nothing to the model; it knows {len(self.config.vocab) - len(SPECIAL_TOKENS)} words",
                    UnknownWordsWarning,
                    stacklevel=3,
                )
            symbols = [c for c in dropped_symbols(prompt) if c not in self.reported]
            if symbols:
                self.reported.update(symbols)
                warnings.warn(
                    f"the text encoder reads words only and leaves out {', '.join(map(repr, symbols))} (in the "
                    f"prompt {shown!r})",
                    UnknownWordsWarning,
                    stacklevel=3,
                )

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts -> ids ``(b, n)`` long, trigrams ``(b, n, k)`` long (0 = none), mask ``(b, n)`` bool, on CPU."""
        cfg = self.config
        rows = []
        for p in check_prompts(prompts):
            words = split_words(p)
            if len(words) > cfg.max_length:
                shown = p if len(p) <= 80 else f"{p[:60]}... ({len(p)} characters)"
                warnings.warn(
                    f"prompt of {len(words)} words truncated to {cfg.max_length}: {shown!r}", stacklevel=3
                )
                words = words[: cfg.max_length]
            rows.append(words)
        n = cfg.max_length if cfg.padding == "max_length" else max(max(len(w) for w in rows), 1)
        grams = [
            [word_trigrams(w, cfg.trigram_buckets) if cfg.trigram_buckets else [] for w in r] for r in rows
        ]
        k = max((len(g) for r in grams for g in r), default=0)
        # nested lists, made into tensors once (a training batch tokenizes 128 prompts a step)
        ids, trigrams, mask = [], [], []
        for words, word_grams in zip(rows, grams):
            if not words:  # the empty prompt: one real <empty> token
                words, word_grams = [EMPTY], [[]]
            pad = n - len(words)
            ids.append([self.index.get(w, self.index[UNK]) for w in words] + [0] * pad)
            trigrams.append([g + [0] * (k - len(g)) for g in word_grams] + [[0] * k] * pad)
            mask.append([True] * len(words) + [False] * pad)
        ids = torch.tensor(ids, dtype=torch.long)
        trigrams = torch.tensor(trigrams, dtype=torch.long).view(len(rows), n, k)
        mask = torch.tensor(mask, dtype=torch.bool)
        return ids, trigrams, mask

    def forward(self, ids: torch.Tensor, trigrams: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids (b, n)``, ``trigrams (b, n, k)``, ``mask (b, n)`` -> tokens ``(b, n, d)``, zero where masked."""
        x = self.word_embed(ids)
        if self.trigram_embed is not None and trigrams.shape[-1]:
            count = (trigrams > 0).sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
            x = x + self.trigram_embed(trigrams).sum(-2) / count
        x = x + self.pos_embed[: ids.shape[1]]
        attn_mask = None if bool(mask.all()) else mask
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x) * mask[..., None].to(x.dtype)

    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and run: tokens ``(b, n, d)`` float32 on the module's device, mask ``(b, n)`` bool. Words
        outside the vocabulary are named by an ``UnknownWordsWarning`` (``warn_unknown``)."""
        self.warn_unknown(prompts)
        device = self.device
        ids, trigrams, mask = (t.to(device) for t in self.tokenize(prompts))
        return self(ids, trigrams, mask).float(), mask

    @classmethod
    def from_config(cls, config: TextConfig, device=None, dtype=None) -> BuiltinTextEncoder:
        return cls(config).to(device=device, dtype=dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` (``type: builtin``, vocabulary included) and ``model.safetensors``, atomically."""
        save_folder(folder, self.state_dict(), {"type": "builtin", **config_to_dict(self.config)}, kind=KIND)


def init_weights(model: BuiltinTextEncoder) -> None:
    """All initialization in one place, from a private generator seeded by ``config.seed`` (global RNG untouched).

    Embeddings and positions normal(0.02); linear weights normal(0.02), the residual projections (attention
    output, MLP output) scaled by 1/sqrt(2 * num_layers) as in GPT-2; biases zero; norm gains one.
    """
    gen = torch.Generator().manual_seed(model.config.seed)
    residual_std = 0.02 / (2 * max(model.config.num_layers, 1)) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # RMSNorm gains
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        if model.trigram_embed is not None:
            model.trigram_embed.weight[0] = 0.0


def _check_config(cfg: TextConfig) -> None:
    if list(cfg.vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"TextConfig.vocab must start with {list(SPECIAL_TOKENS)} (use build_vocab)")
    if len(set(cfg.vocab)) != len(cfg.vocab):
        dup = sorted(w for w, c in Counter(cfg.vocab).items() if c > 1)
        raise ValueError(f"TextConfig.vocab has duplicate entries: {dup[:20]}")
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.max_length < 1 or cfg.trigram_buckets < 0:
        raise ValueError(
            f"need max_length >= 1 and trigram_buckets >= 0, got {cfg.max_length}, {cfg.trigram_buckets}"
        )
    if cfg.padding not in PADDINGS:
        raise ValueError(f"unknown padding {cfg.padding!r}; available: {', '.join(PADDINGS)}")
    if cfg.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention {cfg.attention!r}; available: {', '.join(ATTENTION_BACKENDS)}")


# ----------------------------------------------------------------------------------- Hugging Face encoder


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face text encoders need transformers: pip install vidlatent[text]") from e
    return transformers


def _dtype_kwarg(transformers, dtype) -> dict:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older, where ``dtype`` would be silently ignored)."""
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype or "auto"}


def _model_class(transformers, model_type: str):
    """The encoder-only class for a config's ``model_type`` (T5 family -> its EncoderModel, CLIP -> text tower)."""
    names = {
        "t5": "T5EncoderModel",
        "mt5": "MT5EncoderModel",
        "umt5": "UMT5EncoderModel",
        "clip": "CLIPTextModel",
        "clip_text_model": "CLIPTextModel",
    }
    return getattr(transformers, names.get(model_type, "AutoModel"))


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt", "vocab.json")
    return any((folder / n).is_file() for n in names)


class HFTextEncoder(TextEncoder):
    """A transformers encoder and its tokenizer from local folders; ``encode`` returns ``last_hidden_state``.

    Like Wan's pipeline, prompts are padded to ``max_length`` (or the longest, with ``padding="longest"``), the
    encoder sees the attention mask, and outputs beyond each prompt's length are zeroed. The model is loaded in
    eval mode with gradients off (re-enable with ``requires_grad_(True)`` to fine-tune; ``encode`` then keeps
    the graph; note that ``.train()`` turns on the model's dropout, T5's included). Weights load from safetensors where the folder has them (``.bin`` goes through transformers'
    ``weights_only`` loader); nothing is downloaded and no remote code runs.
    """

    def __init__(self, model: nn.Module, tokenizer, config: HFTextConfig):
        super().__init__()
        if config.padding not in PADDINGS:
            raise ValueError(f"unknown padding {config.padding!r}; available: {', '.join(PADDINGS)}")
        if config.clean not in CLEANERS:
            raise ValueError(f"unknown clean {config.clean!r}; available: {', '.join(CLEANERS)}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        mcfg = model.config
        self.dim = int(getattr(mcfg, "d_model", None) or mcfg.hidden_size)
        if config.max_length is None:
            limit = getattr(mcfg, "max_position_embeddings", None) or 512
            tok_limit = getattr(tokenizer, "model_max_length", None)
            self.max_length = min(limit, tok_limit) if tok_limit and tok_limit < 1_000_000 else limit
        else:
            limit = getattr(mcfg, "max_position_embeddings", None)
            if limit is not None and config.max_length > limit:
                raise ValueError(f"max_length {config.max_length} exceeds the model's {limit} positions")
            self.max_length = config.max_length
        if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS/UNK (masked out anyway)
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token is None:
                raise ValueError("the tokenizer has no pad, eos or unk token to pad with")
        self.source = None  # the folder it was loaded from (used by save_pretrained(copy=False))

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        tokenizer_folder: str | Path | None = None,
        device=None,
        dtype=None,
        config: HFTextConfig | None = None,
    ) -> HFTextEncoder:
        """Load a Hugging Face model folder (config.json with ``model_type``); the tokenizer comes from
        ``tokenizer_folder``, else the model folder, else a sibling ``tokenizer/`` (diffusers pipeline layout).

        ``dtype`` defaults to the checkpoint's.
        """
        transformers = _import_transformers()
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; expected a Hugging Face model folder")
        model_type = read_json(folder / CONFIG_NAME).get("model_type")
        if model_type is None:
            raise ValueError(
                f"{folder / CONFIG_NAME} has no model_type; not a Hugging Face transformers model"
            )
        if tokenizer_folder is None:
            candidates = [folder, folder.parent / "tokenizer"]
            tokenizer_folder = next((c for c in candidates if _has_tokenizer(c)), None)
            if tokenizer_folder is None:
                raise FileNotFoundError(f"no tokenizer files in {folder} or {folder.parent / 'tokenizer'}")
        has_safetensors = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
        model_cls = _model_class(transformers, model_type)
        kwargs = {"trust_remote_code": False} if model_cls is transformers.AutoModel else {}
        model = model_cls.from_pretrained(
            str(folder),
            local_files_only=True,
            use_safetensors=has_safetensors,
            **_dtype_kwarg(transformers, dtype),
            **kwargs,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(tokenizer_folder), local_files_only=True, trust_remote_code=False
        )
        model.requires_grad_(False)
        enc = cls(model.eval(), tokenizer, config or HFTextConfig()).to(device)
        enc.source = (folder.resolve(), Path(tokenizer_folder).resolve())
        return enc

    def encode(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(b, n, d)`` float32 (zero beyond each prompt), mask ``(b, n)`` bool; n = max_length or longest."""
        batch = self.tokenizer(
            [CLEANERS[self.config.clean](p) for p in check_prompts(prompts)],
            padding=self.config.padding,
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        mask[:, 0] |= ~mask.any(dim=1)  # a tokenizer that makes nothing of "": keep one (pad) token as real
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(grad):
            out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float() * mask[..., None], mask

    def save_pretrained(self, folder: str | Path, copy: bool = True) -> None:
        """Write a vidlatent text folder: ``config.json`` (``type: hf``) and the model + tokenizer in ``hf/``.

        ``copy=False`` writes no weights and records the absolute path of the folders it was loaded from
        instead (for multi-GB encoders such as UMT5-XXL; the folder then breaks if those move).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = HFTextConfig(max_length=self.max_length, padding=self.config.padding, clean=self.config.clean)
        if copy:
            tmp = Path(tempfile.mkdtemp(prefix=f".{HF_SUBFOLDER}.", dir=folder))
            try:
                self.model.save_pretrained(str(tmp))
                self.tokenizer.save_pretrained(str(tmp))
                _replace_dir(tmp, folder / HF_SUBFOLDER)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        elif self.source is None:
            raise ValueError("save_pretrained(copy=False) needs an encoder loaded from a folder")
        else:
            cfg.path, cfg.tokenizer_path = (str(p) for p in self.source)
        text = json.dumps({"_vidlatent_kind": KIND, "type": "hf", **config_to_dict(cfg)}, indent=2)
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` (renames only, so a crash leaves one whole copy)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- original Wan T5 checkpoint

# An original Wan 2.1 release folder holds its text encoder as Wan's own T5 code's state dict (wan/modules/t5.py,
# ``umt5_xxl(encoder_only=True)``) and a Hugging Face tokenizer folder (wan/configs/wan_t2v_*.py: t5_checkpoint,
# t5_tokenizer). Wan's ``T5Encoder`` with ``shared_pos=False`` is transformers' ``UMT5EncoderModel`` under the
# renaming below: one relative-position table per block (bidirectional buckets, max distance 128), unscaled
# attention (no 1/sqrt(d), as T5), RMS norms with eps 1e-6, and a gated FFN ``fc2(fc1(x) * gelu_tanh(gate(x)))``
# whose gelu branch ``gate.0`` is T5's ``wi_0`` ("gated-gelu", gelu_new). Wan pads prompts to 512 tokens.
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER = "google/umt5-xxl"
WAN_TEXT_LEN = 512
_WAN_T5_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_WAN_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    **{f"attn.{n}.weight": f"layer.0.SelfAttention.{n}.weight" for n in "qkvo"},
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_T5_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def wan_t5_key_map(num_layers: int) -> dict[str, str]:
    """Wan T5 encoder names -> transformers ``UMT5EncoderModel`` names, for ``num_layers`` blocks."""
    blocks = {
        f"blocks.{i}.{a}": f"encoder.block.{i}.{b}"
        for i in range(num_layers)
        for a, b in _WAN_T5_BLOCK.items()
    }
    return {**_WAN_T5_TOP, **blocks}


def from_wan_t5_state_dict(state) -> dict[str, torch.Tensor]:
    """Wan's T5 encoder state dict -> ``UMT5EncoderModel``'s (tensors shared, not copied). Raises
    ``CheckpointMismatchError`` listing every missing and unexpected key, in Wan's names."""
    layers = 1 + max((int(m[1]) for k in state if (m := _WAN_T5_BLOCK_KEY.fullmatch(k))), default=0)
    mapping = wan_t5_key_map(layers)
    missing, unexpected = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    if missing or unexpected:
        lines = [
            "checkpoint does not fit Wan's T5 encoder (wan/modules/t5.py: UMT5, a position table per block):"
        ]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = [f"... and {len(keys) - 50} more"] if len(keys) > 50 else []
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:50] + more))
        raise CheckpointMismatchError("\n".join(lines))
    out = {mapping[k]: v for k, v in state.items()}
    out["encoder.embed_tokens.weight"] = out["shared.weight"]  # tied in transformers
    return out


def to_wan_t5_state_dict(state) -> dict[str, torch.Tensor]:
    """``UMT5EncoderModel`` state dict -> Wan's T5 encoder names (the inverse of ``from_wan_t5_state_dict``)."""
    layers = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.block.")), default=-1)
    inverse = {b: a for a, b in wan_t5_key_map(layers).items()}
    return {inverse[k]: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def wan_t5_config(state):
    """A transformers ``UMT5Config`` read off Wan T5 tensor shapes (Wan names); the rest is Wan's UMT5-XXL."""
    transformers = _import_transformers()
    vocab, d_model = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    return transformers.UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=state["blocks.0.attn.q.weight"].shape[0] // heads,
        d_ff=state["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads, relative_attention_num_buckets=buckets,
        num_layers=sum(1 for k in state if k.endswith(".ffn.fc1.weight")), relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip


def load_wan_t5(
    checkpoint: str | Path, tokenizer_folder: str | Path | None = None, device=None, dtype=None,
    config: HFTextConfig | None = None,
) -> HFTextEncoder:  # fmt: skip
    """Wan's T5 checkpoint (``models_t5_umt5-xxl-enc-bf16.pth``, read with ``weights_only=True``) as an
    ``HFTextEncoder`` over a transformers ``UMT5EncoderModel``, converted in memory. The tokenizer comes from
    ``tokenizer_folder``, else the ``google/umt5-xxl/`` folder beside the checkpoint (Wan's release layout).
    ``dtype`` defaults to the checkpoint's (bf16 in Wan's release)."""
    transformers = _import_transformers()
    checkpoint = Path(checkpoint)
    tokenizer_folder = Path(tokenizer_folder or checkpoint.parent / WAN_TOKENIZER)
    if not _has_tokenizer(tokenizer_folder):
        raise FileNotFoundError(
            f"no tokenizer for {checkpoint}: expected a Hugging Face tokenizer folder at {tokenizer_folder} "
            f"(Wan's release keeps it in {WAN_TOKENIZER}/ beside the checkpoint)"
        )
    raw = load_state_dict(checkpoint)
    dtype = dtype or raw.get("token_embedding.weight", torch.empty(0)).dtype
    # cast before the renaming, which ties the token embedding: one tensor for both names
    state = from_wan_t5_state_dict({k: v.to(dtype) for k, v in raw.items()})
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(wan_t5_config(raw)).to(dtype)
    load_into(model, state, what=f"UMT5EncoderModel (Wan T5 checkpoint {checkpoint})")
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tokenizer_folder), local_files_only=True, trust_remote_code=False
    )
    config = config or HFTextConfig(max_length=WAN_TEXT_LEN, clean="wan")
    enc = HFTextEncoder(model.requires_grad_(False).eval(), tokenizer, config).to(device)
    enc.source = (checkpoint.resolve(), tokenizer_folder.resolve())  # for save_pretrained(copy=False)
    return enc


# ----------------------------------------------------------------------------------------------- loading


@names_source("text encoder")
def load_text_encoder(src: str | Path, device=None, dtype=None, overrides: Sequence[str] = ()) -> TextEncoder:
    """Load a text encoder from a shipped model's name (``"default"``: its trained encoder), a preset name
    (random-init built-in encoder, e.g. ``"tiny"``, ``"default-arch"``), a vidlatent text
    folder (``save_pretrained``), a Hugging Face model folder (config.json with ``model_type``), a diffusers
    pipeline root holding ``text_encoder/`` and ``tokenizer/``, or Wan's own T5 checkpoint (an original Wan 2.1
    folder holding ``models_t5_umt5-xxl-enc-bf16.pth`` and ``google/umt5-xxl/``, or that file: ``load_wan_t5``).

    ``overrides`` are config fields (``key=value`` strings or a dict) (``TextConfig`` for built-in, ``HFTextConfig`` for HF, e.g.
    ``max_length=256``). ``dtype`` defaults to float32 for built-in encoders and to the checkpoint's for HF.
    Nothing is downloaded and no code is executed while loading.
    """
    if isinstance(overrides, Mapping):
        overrides = [f"{k}={v}" for k, v in override_items(overrides).items()]
    source = resolve_source(src, KIND)
    if source.kind == "preset":
        cfg = load_config(TextConfig, KIND, source.name, overrides=overrides)
        return BuiltinTextEncoder.from_config(cfg, device, dtype).eval()
    path = source.path
    if not path.is_dir() or (path / WAN_T5_FILE).is_file():  # Wan's T5 checkpoint, or a folder holding it
        cfg = load_config(
            HFTextConfig, KIND, None, overrides=[f"max_length={WAN_TEXT_LEN}", "clean=wan", *overrides]
        )
        return load_wan_t5(
            path if path.is_file() else path / WAN_T5_FILE, device=device, dtype=dtype, config=cfg
        )
    if not (path / CONFIG_NAME).is_file() and (path / "text_encoder" / CONFIG_NAME).is_file():
        path = path / "text_encoder"  # a diffusers pipeline root (Wan: text_encoder/ + tokenizer/)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_NAME}; expected a vidlatent or Hugging Face text encoder"
        )
    raw = read_json(path / CONFIG_NAME)
    kind = raw.pop("_vidlatent_kind", None)
    if kind is None and "model_type" in raw:
        cfg = load_config(HFTextConfig, KIND, None, overrides=overrides)
        return HFTextEncoder.from_folder(path, device=device, dtype=dtype, config=cfg)
    if kind != KIND:
        what = f"a vidlatent {kind!r} model" if kind else "neither a vidlatent nor a Hugging Face model"
        raise ValueError(f"{path} holds {what}, not a text encoder")
    kind_type = raw.pop("type", None)
    if kind_type == "builtin":
        cfg = config_from_dict(TextConfig, raw)
        if overrides:
            cfg = _apply_overrides(cfg, overrides)
        with torch.device("meta"):
            model = BuiltinTextEncoder(cfg)
        load_into(model, load_state_dict(path / WEIGHTS_NAME), what=f"BuiltinTextEncoder ({path})")
        return model.to(device=device, dtype=dtype).eval()
    if kind_type == "hf":
        cfg = _apply_overrides(config_from_dict(HFTextConfig, raw), overrides)
        model_dir = path / cfg.path
        tok_dir = None if cfg.tokenizer_path is None else path / cfg.tokenizer_path
        if model_dir.is_file():  # a link to Wan's T5 checkpoint (save_pretrained(copy=False))
            return load_wan_t5(model_dir, tok_dir, device=device, dtype=dtype, config=cfg)
        return HFTextEncoder.from_folder(model_dir, tok_dir, device=device, dtype=dtype, config=cfg)
    raise ValueError(
        f"{path / CONFIG_NAME} has unknown text encoder type {kind_type!r}; expected builtin or hf"
    )


def _apply_overrides(cfg, overrides: Sequence[str]):
    if not overrides:
        return cfg
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)
