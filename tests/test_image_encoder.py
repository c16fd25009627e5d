"""The CLIP image encoder of image-conditioned denoisers: what diffusers' Wan I2V pipeline computes, from local
folders only, and clear errors for folders that are not one."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vidlatent.data import read_image  # noqa: E402
from vidlatent.models.image import ImageEncoder, load_image_encoder  # noqa: E402


def tiny_clip(seed: int = 0):
    """A CLIP vision tower of 2 layers at 32 px (16 patches + the class token = 17 tokens of width 32)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = transformers.CLIPVisionModel(cfg).eval()
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, processor


def diffusers_image_embeds(model, processor, image: Image.Image) -> torch.Tensor:
    """What ``WanImageToVideoPipeline.encode_image`` does: the processor on the PIL image, the penultimate layer."""
    pixels = processor(images=image, return_tensors="pt")
    return model(**pixels, output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    """A diffusers-style root: image_encoder/ and image_processor/ side by side."""
    root = tmp_path_factory.mktemp("i2v-root")
    model, processor = tiny_clip()
    model.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_processor")
    return root, model, processor


def test_encode_matches_diffusers_encode_image_from_a_pipeline_root(clip_root, tmp_path):
    root, model, processor = clip_root
    enc = load_image_encoder(root)
    assert (enc.dim, enc.tokens) == (32, 17)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # not square: crop matters
    image.save(tmp_path / "still.png")
    with torch.no_grad():
        out = enc.encode(read_image(tmp_path / "still.png")[:, 0][None])  # as the pipeline reads it
        expected = diffusers_image_embeds(model, processor, Image.open(tmp_path / "still.png"))
    assert out.shape == (1, 17, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # the penultimate layer, not the last one (which is what model(...).last_hidden_state would give)
    assert (out - model(**processor(images=image, return_tensors="pt")).last_hidden_state).abs().max() > 1e-2


def test_save_pretrained_round_trip_and_batch(clip_root, tmp_path):
    root, _, _ = clip_root
    enc = load_image_encoder(root / "image_encoder")  # the encoder folder alone finds ../image_processor
    enc.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "preprocessor_config.json").is_file()
    again = load_image_encoder(tmp_path / "enc")
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    torch.testing.assert_close(again.encode(images), enc.encode(images), rtol=0, atol=0)
    torch.testing.assert_close(enc.encode(images[1:]), enc.encode(images)[1:], rtol=0, atol=1e-6)


def test_missing_or_wrong_folders_say_what_is_accepted(clip_root, tmp_path):
    root, model, _ = clip_root
    with pytest.raises(FileNotFoundError, match=r"no image encoder at .*CLIP vision folder.*image_encoder/"):
        load_image_encoder(tmp_path)
    model.save_pretrained(tmp_path / "lonely")
    with pytest.raises(FileNotFoundError, match=r"has no preprocessor_config.json"):
        load_image_encoder(tmp_path / "lonely")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "umt5"}))
    with pytest.raises(ValueError, match=r"holds a 'umt5' model, not a CLIP vision encoder"):
        load_image_encoder(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"images must be \(b, 3, h, w\)"):
        ImageEncoder(*tiny_clip()).encode(torch.zeros(3, 32, 32))


def test_from_pretrained_is_the_loaders_common_signature(clip_root):
    root = clip_root[0]
    enc = ImageEncoder.from_pretrained(root, device="cpu", dtype=torch.float32)
    images = torch.rand(1, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        # two loads: not bitwise (weights at other memory alignments round differently on some CPUs)
        torch.testing.assert_close(
            enc.encode(images), load_image_encoder(root).encode(images), rtol=0, atol=1e-5
        )
    with pytest.raises(ValueError, match="no config overrides"):
        ImageEncoder.from_pretrained(root, overrides=["hidden_size=8"])
