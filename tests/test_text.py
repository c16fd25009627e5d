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
    assert split_words("A Red-ball,  moving LEFT!") == ["a", "red", "-", "ball", ",", "moving", "left", "!"]
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
