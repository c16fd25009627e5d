"""Say what is not understood: the built-in text encoder names the words it never saw (a warning line, also in the
CLI), and punctuation and case never change what a prompt means to it."""

from __future__ import annotations

import re
import unicodedata
import warnings

import numpy as np
import pytest
import torch

from vidlatent.cli import main
from vidlatent.data.shapes import ShapesWorld, grammar_words
from vidlatent.models.text import UnknownWordsWarning, load_text_encoder, split_words

PROMPTS = [
    "a red circle moving right",
    "a purple triangle moving down",
    "an orange triangle goes downward",
    "a blue box slides up and to the left on a dark background",
    "a yellow disk bouncing up and down and a green square moves left",
]


def variants(prompt: str) -> list[str]:
    """The same prompt as a person might type it: capitals, a comma, a trailing period, more punctuation."""
    words = prompt.split()
    comma = " ".join(words[:3]) + ", " + " ".join(words[3:])
    return [
        prompt.upper(),
        prompt.capitalize() + ".",
        comma,
        f"  {comma.title()}!  ",
        prompt.replace(" ", " ; ") + "...",
        f'"{prompt}"',
    ]


@pytest.fixture(scope="module", params=["default", "tiny"])
def encoder(request):
    return load_text_encoder(request.param)


def test_punctuation_and_case_never_change_the_tokens(encoder):
    for prompt in PROMPTS:
        ids, grams, mask = encoder.tokenize(prompt)
        for variant in variants(prompt):
            v_ids, v_grams, v_mask = encoder.tokenize(variant)
            assert torch.equal(v_ids, ids) and torch.equal(v_grams, grams) and torch.equal(v_mask, mask), (
                variant
            )
    # and so the same numbers out (encode is the network on tokenize's output)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownWordsWarning)  # the tiny encoder lacks some of these words
        tokens, _ = encoder.encode(PROMPTS[3:])
        for variant in zip(*(variants(p)[1:4] for p in PROMPTS[3:])):
            torch.testing.assert_close(encoder.encode(list(variant))[0], tokens, rtol=0, atol=0)


def test_punctuation_alone_is_the_empty_prompt(encoder):
    with torch.no_grad():
        empty, _ = encoder.encode("")
        for text in (".", " , ", "!?"):
            torch.testing.assert_close(encoder.encode(text)[0], empty, rtol=0, atol=0)


def test_what_the_default_model_learnt_from_tokenizes_as_before():
    """The shipped model's captions (the shapes world's grammar) and the prompts of its docs and tests hold no
    punctuation and no capitals, so dropping punctuation changes none of their tokens: its outputs for them stay
    bit-identical. (The splitter before issue 26 kept each punctuation mark as a token.)"""
    before = re.compile(r"\w+|[^\w\s]")
    world = ShapesWorld(height=64, width=64, frames=17, split="train", seed=5)
    captions = [world.scene(i).caption for i in range(300)]
    for text in [*captions, *PROMPTS]:
        assert before.findall(unicodedata.normalize("NFKC", text).lower()) == split_words(text), text
    assert set(w for c in captions for w in split_words(c)) <= set(grammar_words())


def test_unknown_words_are_named_once(encoder):
    enc = load_text_encoder("default")  # a fresh encoder: what it reported is its own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.encode(["a red circle moving right", ""])
        assert caught == []
        enc.encode(["A crimson pyramid, moving right."])
        enc.encode(["a crimson pyramid moving right"])  # the same words again: nothing new to say
        enc.encode(["two crimson circles"])
    lines = [str(w.message) for w in caught]
    assert all(w.category is UnknownWordsWarning for w in caught)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "never seen 'crimson', 'pyramid'" in lines[0] and "A crimson pyramid, moving right." in lines[0]
    assert "never seen 'two', 'circles'" in lines[1] and "crimson" not in lines[1].split("(")[0]
    assert enc.unknown_words("Two big, BIG circles") == ["two", "big", "circles"]
    assert enc.unknown_words("a green square moving up") == []


def test_symbols_left_out_are_named_once_and_punctuation_is_not():
    enc = load_text_encoder("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.encode(["a red circle, moving right — “slowly”…"])  # punctuation only separates
        assert [str(w.message) for w in caught] == ["the text encoder has never seen 'slowly' (in the prompt "
                                                    "'a red circle, moving right — “slowly”…'): "
                                                    "it is read from the letters alone and may mean nothing to "
                                                    "the model; it knows 52 words"]  # fmt: skip
        enc.encode(["🔴 ➡️"])  # an emoji-only prompt: the model reads an empty one
        enc.encode(["a 🔴 ball"])  # named already
    assert len(caught) == 2 and caught[1].category is UnknownWordsWarning
    assert str(caught[1].message) == (
        "the text encoder reads words only and leaves out '🔴', '➡' (in the prompt '🔴 ➡️')"
    )


def test_the_cli_prints_one_line_per_prompt(tmp_path, capsys):
    prompt, unknown = "A crimson pyramid, moving right.", "'crimson', 'pyramid'"
    out = tmp_path / "out.png"
    args = ["generate", prompt, "-o", str(out), "--model", "tiny", "--frames", "1", "--height", "32",
            "--width", "32", "--steps", "2", "--seed", "0", "-q"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if "never seen" in line]
    assert len(named) == 1, err
    assert named[0].startswith("vidlatent generate: warning: the text encoder has never seen " + unknown)
    assert main([*args[:1], "a red circle moving right", *args[2:]]) == 0
    assert "warning" not in capsys.readouterr().err
    assert out.is_file() and np.isfinite(out.stat().st_size)
