"""Text encoders: the built-in word-level encoder, the Hugging Face wrapper (a tiny random T5), loading."""

import json

import pytest
import torch

from vidlatent.checkpoint import CheckpointMismatchError
from vidlatent.config import list_presets
from vidlatent.models.text import (
    EMPTY,
    SPECIAL_TOKENS,
    BuiltinTextEncoder,
    TextConfig,
    TextEncoder,
    build_vocab,
    load_text_encoder,
    split_words,
)

PROMPTS = ["a red circle moving left", "a blue square slides to the right, then bounces up and down", ""]


@pytest.fixture(scope="module")
def tiny():
    return load_text_encoder("tiny")


# ------------------------------------------------------------------------------------------------- built-in


def test_tokenizer_and_vocab():
    # punctuation separates words and is no token of its own (issue 26: it must never change the result)
    assert split_words("A Red-ball,  moving LEFT!") == ["a", "red", "ball", "moving", "left"]
    assert split_words("   ") == []
    vocab = build_vocab(["a red ball", "a blue ball", "a red box"])
    assert vocab == [*SPECIAL_TOKENS, "a", "ball", "red", "blue", "box"]  # by count, then alphabetical
    assert build_vocab(["a red ball", "a blue ball"], min_count=2) == [*SPECIAL_TOKENS, "a", "ball"]
    assert build_vocab(["a red ball"], max_size=4) == [*SPECIAL_TOKENS, "a"]
    with pytest.raises(ValueError, match="must start with"):
        BuiltinTextEncoder(TextConfig(vocab=["a", "b"], dim=8, ffn_dim=8, num_heads=2))


def test_shapes_mask_and_zero_padding(tiny):
    assert isinstance(tiny, TextEncoder) and tiny.dim == 32 and "tiny" in list_presets("text")
    tokens, mask = tiny.encode(PROMPTS)
    n = len(split_words(PROMPTS[1]))
    assert tokens.shape == (3, n, 32) and tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, n, 1]  # the empty prompt is one real token
    assert torch.all(tokens[~mask] == 0) and torch.all(tokens[mask].abs().sum(-1) > 0)
    single, m1 = tiny.encode("a red circle moving left")
    assert single.shape == (1, 5, 32) and m1.all()


def test_padding_invariance(tiny):
    alone, _ = tiny.encode(PROMPTS[0])
    batched, _ = tiny.encode(PROMPTS)
    torch.testing.assert_close(batched[0, :5], alone[0], atol=1e-6, rtol=0)
    fixed = load_text_encoder("tiny", overrides=["padding=max_length"])
    tokens, mask = fixed.encode(PROMPTS)
    assert tokens.shape == (3, 32, 32) and mask.sum(1).tolist() == [5, len(split_words(PROMPTS[1])), 1]
    torch.testing.assert_close(tokens[0, :5], alone[0], atol=1e-6, rtol=0)


def test_empty_prompt_and_unknown_words(tiny):
    ids, _, mask = tiny.tokenize(["", "   "])
    assert ids[:, 0].tolist() == [tiny.index[EMPTY]] * 2 and mask.tolist() == [[True], [True]]
    a, b = tiny.encode(["", "   "])[0]
    torch.testing.assert_close(a, b)
    # unknown words map to <unk> but keep their own trigram features, so they are not all the same
    ids, trigrams, _ = tiny.tokenize("zorgle blorp")
    assert ids.tolist() == [[1, 1]] and not torch.equal(trigrams[0, 0], trigrams[0, 1])
    tokens, _ = tiny.encode(["a zorgle circle", "a blorp circle"])
    assert not torch.allclose(tokens[0, 1], tokens[1, 1])
    # without trigrams every unknown word is the same <unk>
    plain = load_text_encoder("tiny", overrides=["trigram_buckets=0"])
    tokens, _ = plain.encode(["a zorgle circle", "a blorp circle"])
    torch.testing.assert_close(tokens[0], tokens[1])


def test_truncation_warns(tiny):
    with pytest.warns(UserWarning, match="truncated"):
        tokens, mask = tiny.encode("red " * 40)
    assert tokens.shape[1] == 32 and mask.all()


def test_deterministic_and_trainable():
    a, b = load_text_encoder("tiny"), load_text_encoder("tiny")  # same config -> same weights (private RNG)
    state = torch.random.get_rng_state()
    torch.testing.assert_close(a.encode(PROMPTS), b.encode(PROMPTS), rtol=0, atol=0)
    assert torch.equal(state, torch.random.get_rng_state())
    other = load_text_encoder("tiny", overrides=["seed=1"])
    assert not torch.allclose(a.encode(PROMPTS)[0], other.encode(PROMPTS)[0])
    tokens, mask = a.encode(PROMPTS)
    tokens[mask].pow(2).mean().backward()
    grads = {n: p.grad for n, p in a.named_parameters()}
    assert all(g is not None for g in grads.values()) and grads["word_embed.weight"].abs().sum() > 0


def test_bad_prompts(tiny):
    for bad in (None, 3, [], ["ok", 5], [b"bytes"]):
        with pytest.raises(ValueError, match="prompt"):
            tiny.encode(bad)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "enc")
    raw = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert raw["_vidlatent_kind"] == "text" and raw["type"] == "builtin" and raw["vocab"] == tiny.config.vocab
    back = load_text_encoder(tmp_path / "enc")
    assert isinstance(back, BuiltinTextEncoder) and back.config == tiny.config
    torch.testing.assert_close(back.encode(PROMPTS), tiny.encode(PROMPTS), rtol=0, atol=0)
    assert BuiltinTextEncoder.from_pretrained(tmp_path / "enc").dim == 32
    half = load_text_encoder(tmp_path / "enc", dtype=torch.bfloat16)
    assert (
        half.word_embed.weight.dtype == torch.bfloat16 and half.encode("a red ball")[0].dtype == torch.float32
    )


@pytest.mark.filterwarnings("ignore::vidlatent.models.text.UnknownWordsWarning")
def test_add_words_keeps_every_encoding_and_round_trips(tmp_path):
    enc = load_text_encoder("tiny")
    prompts = [*PROMPTS, "two Small squares, still!", "a big zorgle on a teal background", "<unk> small"]
    with pytest.warns(UserWarning, match="never seen"):
        before = enc.encode(prompts)
        small = enc.encode("small")[0]
    old_vocab = list(enc.config.vocab)
    added = enc.add_words(["Small", "still", "red", "<unk>", "<empty>", "small", "two-tone", "zorgle"])
    assert added == ["small", "still", "two", "tone", "zorgle"]
    assert enc.config.vocab == [*old_vocab, *added]
    assert enc.word_embed.weight.shape[0] == len(enc.config.vocab)
    ids, _, _ = enc.tokenize("two small zorgle")
    assert ids.tolist() == [[enc.index["two"], enc.index["small"], enc.index["zorgle"]]]
    assert min(ids[0].tolist()) == len(old_vocab)
    after = enc.encode(prompts)  # each new word reads as <unk> did: bitwise the same encodings
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert enc.add_words(["small", "STILL"]) == [] and enc.word_embed.weight.requires_grad

    enc.word_embed.weight.data[enc.index["small"]] += 1.0  # as training would move it
    enc.save_pretrained(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["vocab"] == enc.config.vocab
    back = load_text_encoder(tmp_path / "enc")
    assert back.config == enc.config and back.unknown_words("two small zorgle") == []
    torch.testing.assert_close(back.encode(prompts), enc.encode(prompts), rtol=0, atol=0)
    assert not torch.allclose(back.encode("small")[0], small)  # the moved row is read back
    assert back.add_words(enc.config.vocab) == []


def test_load_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_text_encoder("no-such-preset")
    tiny.save_pretrained(tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    cfg["dim"] = 64
    cfg["ffn_dim"] = 64
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_text_encoder(tmp_path / "enc")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_vidlatent_kind": "vae"}))
    with pytest.raises(ValueError, match="not a text encoder"):
        load_text_encoder(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_vidlatent_kind": "text", "type": "x"}))
    with pytest.raises(ValueError, match="unknown text encoder type"):
        load_text_encoder(tmp_path / "other")


# ------------------------------------------------------------------------------------------- Hugging Face

WORDS = "a red blue circle square moving left right slides to the , then bounces up and down".split()


def make_tokenizer(eos: bool = True):
    """A word-level tokenizer built locally (no download), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos:  # T5 style: every prompt ends with </s>, so "" is one real token
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_model(family: str):
    """A tiny randomly initialised encoder of one family (seeded, so every call builds the same weights)."""
    import transformers as tf

    torch.manual_seed(0)
    size = dict(vocab_size=len(WORDS) + 3, pad_token_id=0, eos_token_id=1)
    t5 = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    bert = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    cls, cfg = {
        "t5": (tf.T5EncoderModel, tf.T5Config(**size, **t5)),
        "umt5": (tf.UMT5EncoderModel, tf.UMT5Config(**size, **t5)),
        "clip": (tf.CLIPTextModel, tf.CLIPTextConfig(**size, **bert, max_position_embeddings=24)),
        "bert": (tf.BertModel, tf.BertConfig(**size, **bert, max_position_embeddings=40)),
    }[family]
    return cls, cls(cfg).eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    for family in ("t5", "umt5", "clip", "bert"):
        _, model = make_model(family)
        model.save_pretrained(root / family)
        make_tokenizer().save_pretrained(root / family)
    return root


def run_direct(family, folder, prompts, max_length, padding="max_length"):
    cls, _ = make_model(family)
    model = cls.from_pretrained(folder).eval()
    batch = make_tokenizer()(
        prompts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return out * batch["attention_mask"][..., None], batch["attention_mask"].bool()


@pytest.mark.parametrize("family,max_length", [("t5", 512), ("umt5", 512), ("clip", 24), ("bert", 40)])
def test_hf_matches_the_model(hf_folders, family, max_length):
    from vidlatent.models.text import HFTextEncoder

    enc = load_text_encoder(hf_folders / family)
    assert isinstance(enc, HFTextEncoder) and enc.dim == 16 and enc.max_length == max_length
    assert not any(p.requires_grad for p in enc.parameters())
    tokens, mask = enc.encode(PROMPTS)
    assert tokens.shape == (3, max_length, 16) and tokens.dtype == torch.float32 and mask.dtype == torch.bool
    ref, ref_mask = run_direct(family, hf_folders / family, PROMPTS, max_length)
    assert torch.equal(mask, ref_mask) and mask.sum(1).tolist() == [6, 14, 1]  # words + </s>
    assert torch.all(tokens[~mask] == 0)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


def test_hf_padding_truncation_and_dtype(hf_folders):
    enc = load_text_encoder(hf_folders / "t5", overrides=["padding=longest", "max_length=8"])
    tokens, mask = enc.encode(PROMPTS)
    assert tokens.shape == (3, 8, 16) and mask.sum(1).tolist() == [6, 8, 1]
    ref, _ = run_direct("t5", hf_folders / "t5", PROMPTS, 8, padding="longest")
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)
    full, _ = load_text_encoder(hf_folders / "t5").encode(
        PROMPTS[0]
    )  # the mask makes padding length irrelevant
    torch.testing.assert_close(full[0, :6], tokens[0, :6], atol=1e-5, rtol=1e-5)
    half = load_text_encoder(hf_folders / "t5", dtype=torch.bfloat16)
    assert (
        next(half.model.parameters()).dtype == torch.bfloat16
        and half.encode("a red")[0].dtype == torch.float32
    )
    with pytest.raises(ValueError, match="prompt"):
        enc.encode(["a", 3])
    with pytest.raises(ValueError, match="exceeds the model's 24 positions"):
        load_text_encoder(hf_folders / "clip", overrides=["max_length=100"])
    with pytest.raises(ValueError, match="not a BuiltinTextEncoder"):
        BuiltinTextEncoder.from_pretrained(hf_folders / "bert")


def test_hf_empty_prompt_without_eos(hf_folders, tmp_path):
    _, model = make_model("t5")
    model.save_pretrained(tmp_path / "t5")
    make_tokenizer(eos=False).save_pretrained(tmp_path / "t5")
    tokens, mask = load_text_encoder(tmp_path / "t5", overrides=["padding=longest"]).encode(["", "a red"])
    assert mask.tolist() == [[True, False], [True, True]]  # "" keeps its (pad) token as the one real key
    assert torch.all(tokens[0, 1] == 0) and tokens[0, 0].abs().sum() > 0


def test_hf_save_load_and_layouts(hf_folders, tmp_path):
    enc = load_text_encoder(hf_folders / "t5", overrides=["max_length=16"])
    expected = enc.encode(PROMPTS)
    enc.save_pretrained(tmp_path / "copy")
    raw = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert raw["_vidlatent_kind"] == "text" and raw["type"] == "hf" and raw["max_length"] == 16
    assert (tmp_path / "copy" / "hf" / "model.safetensors").is_file()
    torch.testing.assert_close(load_text_encoder(tmp_path / "copy").encode(PROMPTS), expected, rtol=0, atol=0)
    enc.save_pretrained(tmp_path / "copy")  # overwriting an existing folder works
    enc.save_pretrained(tmp_path / "ref", copy=False)
    assert not (tmp_path / "ref" / "hf").exists()
    torch.testing.assert_close(load_text_encoder(tmp_path / "ref").encode(PROMPTS), expected, rtol=0, atol=0)
    # a diffusers pipeline root: text_encoder/ (weights) beside tokenizer/
    make_model("t5")[1].save_pretrained(tmp_path / "pipe" / "text_encoder")
    make_tokenizer().save_pretrained(tmp_path / "pipe" / "tokenizer")
    pipe = load_text_encoder(tmp_path / "pipe", overrides=["max_length=16"])
    torch.testing.assert_close(pipe.encode(PROMPTS), expected, rtol=0, atol=0)


def test_hf_needs_transformers(hf_folders, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install vidlatent\[text\]"):
        load_text_encoder(hf_folders / "t5")
