"""Fine-tuning: what training makes is a pipeline folder every job takes (encode -> train -> generate from the
CLI), and a pipeline folder (a tiny random diffusers Wan root) fine-tunes on captioned clips through a disk
cache of latents and text embeddings, with neither its VAE nor its text encoder in memory while it trains; the
LoRA it makes gives diffusers' WanPipeline the same transformer output as ours."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from media import pattern
from wan_folders import wan_t2v_root

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.data.io import write_video
from vidlatent.data.latents import read_latent_metadata, vae_fingerprint
from vidlatent.models.dit import VideoDiT
from vidlatent.models.text import TextEncoder
from vidlatent.models.vae import CausalVAE
from vidlatent.train import Trainer, load_train_config
from vidlatent.train.cache import CACHE_FILE, TextStore

CAPTIONS = ["a red wave drifts", "blue stripes turn", "a green glow pulses", "an orange ripple"]


def make_clips(folder: Path, frames=(9, 9, 9, 9), size=32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (n, caption) in enumerate(zip(frames, CAPTIONS)):
        write_video(folder / f"c{i}.mp4", pattern(n, size, size, phase=1.3 * i), fps=8)
        (folder / f"c{i}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers"
    wan_t2v_root(root)
    return root


def finetune(wan, clips, output, *overrides):
    args = [f"pipeline={wan}", f"data={clips}", f"output={output}", "data_options={frames: 5}", "lr=5e-3",
            "ema_decay=0", "caption_dropout=0.2", "checkpoint_every=2", "progress=false", "steps=4", *overrides]  # fmt: skip
    return load_train_config(overrides=args)


# ------------------------------------------------------------------------------ point 0: final/ runs


@pytest.mark.slow
def test_cli_encode_train_generate(tmp_path, clips, capsys):
    lat, run = tmp_path / "latents", tmp_path / "run"
    assert (
        main(["encode", str(clips), "-o", str(lat), "--model", "tiny", "--frames", "9", "--workers", "0"])
        == 0
    )
    train = ["train", "tiny", f"data={lat}", f"output={run}", "steps=2", "progress=false"]
    assert main([*train, "export_checkpoints=true", "checkpoint_every=1"]) == 0
    final = run / "final"
    assert {"dit", "vae", "text_encoder", "pipeline.json"} <= {p.name for p in final.iterdir()}
    record = read_latent_metadata(next(lat.glob("*.safetensors")))["vae"]
    assert vae_fingerprint(CausalVAE.from_pretrained(final / "vae")) == record["fingerprint"]
    config = json.loads((final / "pipeline.json").read_text())
    assert (config["frames"], config["height"], config["width"]) == (9, 32, 32)  # the training clips' size
    out = tmp_path / "gen.mp4"
    args = ["generate", CAPTIONS[0], "--model", str(final), "-o", str(out), "--steps", "2", "--seed", "1"]
    assert main(args) == 0 and out.is_file()
    step1 = run / "checkpoints" / "step-0000001" / "pipeline"  # on request, each checkpoint is one too
    args = ["generate", CAPTIONS[0], "--model", str(step1), "-o", str(out), "--steps", "2", "--seed", "1"]
    assert main(args) == 0


def test_lora_run_final_names_its_base_and_loads_with_the_lora(tmp_path, clips, tiny_vae):
    from vidlatent.pipelines.batch import encode_clips

    encode_clips([clips], tmp_path / "lat", tiny_vae, vae_src="preset:tiny", progress=False, num_workers=0)
    cfg = load_train_config("tiny", overrides=[f"data={tmp_path / 'lat'}", f"output={tmp_path / 'run'}",
                                               "lora_rank=4", "train_text_encoder=false", "lr=5e-2", "steps=3",
                                               "ema_decay=0", "progress=false"])  # fmt: skip
    trainer = Trainer(cfg)
    with torch.no_grad():  # a fresh preset's zero head passes no adapter a gradient: give it weights
        for p in trainer.dit.parameters():
            if not p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trainer.train()
    final = tmp_path / "run" / "final"
    base = json.loads((final / "base.json").read_text())
    assert base["dit"] == "dit" and base["loras"][0]["path"] == "lora.safetensors"
    pipe = VideoPipeline.from_pretrained(final)
    assert pipe.loras  # applied on load
    z = trainer.dataset[0][0][None]
    context, mask = trainer.text_encoder.encode([CAPTIONS[1]])
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        trainer.dit.eval()
        want = trainer.dit(z, sigma, context, mask)
        got = pipe.dit(z, sigma, context, mask)
        base = VideoDiT.from_pretrained(final / "dit")(z, sigma, context, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the LoRA moved it


# ------------------------------------------------------------- point 1: a pipeline folder on clips


def _loaded_encoders() -> dict[int, str]:
    """{id: class name} of the VAE / text encoder objects alive now (ours, transformers', diffusers')."""
    from diffusers import AutoencoderKLWan
    from transformers import PreTrainedModel

    kinds = (CausalVAE, TextEncoder, PreTrainedModel, AutoencoderKLWan)
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some module-level proxies warns
        return {id(o): type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds)}


@pytest.mark.slow
def test_finetune_wan_folder_caches_trains_without_encoders_and_resumes_exactly(
    tmp_path, wan, clips, monkeypatch
):
    cache = tmp_path / "cache"
    earlier = _loaded_encoders()  # other tests' shared fixtures
    trainer = Trainer(finetune(wan, clips, tmp_path / "whole", f"cache={cache}", "lora_rank=4"))
    assert trainer.text_encoder is None
    assert json.loads((cache / CACHE_FILE).read_text())["vae"]["src"] == str((wan / "vae").resolve())
    assert len(list((cache / "latents").glob("*.safetensors"))) == 4
    assert (
        len(list((cache / "text").glob("*.safetensors"))) == 4 + 2
    )  # the captions, "" and the sample prompt
    assert not list(cache.rglob(".*tmp*"))  # nothing half-written
    seen = []
    loss = trainer.task.loss

    def spy(*args, **kwargs):
        seen.extend(name for i, name in _loaded_encoders().items() if i not in earlier)
        return loss(*args, **kwargs)

    monkeypatch.setattr(trainer.task, "loss", spy)
    expected = trainer.train()
    assert seen == []  # neither the VAE nor the text encoder was in memory during the steps
    monkeypatch.undo()
    assert len(expected) == 4

    # an interrupted cache (one clip, one caption missing) is completed, the rest is not redone; then a rerun
    # finds everything cached: the VAE and the text encoder are not even loaded
    from safetensors.torch import load_file

    import vidlatent.models.text as text_module

    lost = [next((cache / "latents").iterdir()), next((cache / "text").iterdir())]
    kept = [load_file(f) for f in lost]
    for f in lost:
        f.unlink()
    loads, real_vae, real_text = [], CausalVAE.from_pretrained, text_module.load_text_encoder
    monkeypatch.setattr(
        CausalVAE, "from_pretrained", lambda *a, **k: loads.append("vae") or real_vae(*a, **k)
    )
    monkeypatch.setattr(
        text_module, "load_text_encoder", lambda *a, **k: loads.append("text") or real_text(*a, **k)
    )
    first = Trainer(finetune(wan, clips, tmp_path / "split", f"cache={cache}", "lora_rank=4"))
    assert loads == ["vae", "text"]  # once each, for what was missing
    for f, tensors in zip(lost, kept):
        assert all(torch.equal(load_file(f)[k], v) for k, v in tensors.items())
    head = first.train(until=2)
    loads.clear()
    second = Trainer(finetune(wan, clips, tmp_path / "split", f"cache={cache}", "lora_rank=4", "resume=auto"))
    monkeypatch.undo()
    tail = second.train()
    assert loads == []
    assert head + tail == pytest.approx(expected, abs=1e-6)  # exact resume


@pytest.mark.slow
def test_overfitting_run_lowers_the_loss(tmp_path, wan, clips):
    cfg = finetune(wan, clips, tmp_path / "run", f"cache={tmp_path / 'cache'}", "steps=30", "lr=2e-3",
                   "caption_dropout=0", "checkpoint_every=100")  # fmt: skip
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"fixed-noise flow loss before {before:.4f}, after 30 steps {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_text_store_pads_as_the_pipeline(tmp_path, wan, clips):
    """Wan's denoiser reads all 512 padded tokens with no mask: the cache gives that, equal to the encoder."""
    from vidlatent.models.text import load_text_encoder

    Trainer(finetune(wan, clips, tmp_path / "run", "steps=1", "checkpoint_every=1")).train(until=0)
    store = TextStore(tmp_path / "run" / "cache" / "text", masked=False)
    context, mask = store.encode(CAPTIONS[:2])
    encoder = load_text_encoder(wan / "text_encoder", overrides=["clean=wan"])
    want, _ = encoder.encode(CAPTIONS[:2])
    assert mask is None and context.shape == want.shape
    torch.testing.assert_close(context, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ point 2: usable elsewhere


def _inputs(trainer, seed: int = 0):
    """(x, sigma, context) as Wan's transformer reads them: a clip's latents noised, all 512 text tokens."""
    g = torch.Generator().manual_seed(seed)
    z = trainer.dataset[0][0][None]
    sigma = torch.tensor([0.6])
    x = (1 - sigma) * z + sigma * torch.randn(z.shape, generator=g)
    context, mask = trainer.encode_text([CAPTIONS[0]])
    assert mask is None
    return x, sigma, context


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.std()).item()


@pytest.mark.slow
def test_trained_lora_gives_diffusers_the_same_output(tmp_path, wan, clips):
    from diffusers import WanPipeline

    trainer = Trainer(finetune(wan, clips, tmp_path / "run", "lora_rank=4", "lr=3e-2", "steps=3"))
    trainer.train()
    final = tmp_path / "run" / "final"
    x, sigma, context = _inputs(trainer)
    pipe = WanPipeline.from_pretrained(str(wan))
    with torch.no_grad():
        base = pipe.transformer(x, 1000 * sigma, context).sample
        pipe.load_lora_weights(str(final / "lora.safetensors"))
        expected = pipe.transformer(x, 1000 * sigma, context).sample
        ours = VideoPipeline.from_pretrained(final).dit(x, sigma, context)  # base.json: Wan's + the LoRA
        flag = VideoPipeline.from_pretrained(wan)
        flag.load_lora(final / "lora.safetensors")  # what --lora does
        with_flag = flag.dit(x, sigma, context)
        trainer.dit.eval()
        trained = trainer.dit(x, sigma, context)
    print(f"LoRA moved the output {_rel(expected, base):.3f}; ours vs diffusers {_rel(ours, expected):.2e}")
    assert _rel(expected, base) > 1e-2  # the LoRA changes the output
    assert _rel(ours, expected) <= 1e-4
    assert _rel(with_flag, expected) <= 1e-4
    assert _rel(trained, expected) <= 1e-4


@pytest.mark.slow
def test_full_finetune_writes_a_diffusers_transformer(tmp_path, wan, clips):
    from diffusers import WanTransformer3DModel

    trainer = Trainer(finetune(wan, clips, tmp_path / "run", "lr=1e-2", "steps=2"))
    trainer.train()
    final = tmp_path / "run" / "final"
    x, sigma, context = _inputs(trainer, seed=1)
    ref = WanTransformer3DModel.from_pretrained(str(final / "transformer")).eval()
    original = WanTransformer3DModel.from_pretrained(str(wan / "transformer")).eval()
    with torch.no_grad():
        trainer.dit.eval()
        want = trainer.dit(x, sigma, context)
        got = ref(x, 1000 * sigma, context).sample
        before = original(x, 1000 * sigma, context).sample
    assert _rel(want, before) > 1e-3  # training moved the weights
    assert _rel(got, want) <= 1e-4
    pipe = VideoPipeline.from_pretrained(final)  # and the folder is a pipeline of ours
    pipe.progress = False
    video = pipe.generate(CAPTIONS[0], frames=5, height=32, width=32, steps=2, seed=0)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()


# ------------------------------------------------------------------------------------ bad input


def test_bad_clips_and_caption_rows_are_listed_and_skipped(tmp_path, wan, capsys):
    folder = make_clips(tmp_path / "clips", frames=(9, 3, 9, 9))  # c1 is shorter than the 5 frames asked
    for i in (2, 3):
        (folder / f"c{i}.txt").unlink()
    table = tmp_path / "captions.jsonl"  # names c2 and a clip that is not there; c3 has no caption at all
    rows = [{"path": "c2.mp4", "caption": "from the table"}, {"path": "ghost.mp4", "caption": "nobody"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(finetune(wan, folder, tmp_path / "run", f"captions={table}", "steps=1"))
    err = capsys.readouterr().err
    reasons = dict(trainer.plan.bad)
    assert set(reasons) == {str(folder / "c1.mp4"), str(folder / "c3.mp4"), str(table)}
    assert "3 frames, fewer than the 5 asked" in reasons[str(folder / "c1.mp4")]
    assert "no caption" in reasons[str(folder / "c3.mp4")] and "ghost.mp4" in reasons[str(table)]
    assert "skipped 3 item(s)" in err and all(p in err for p in reasons)
    assert sorted(trainer.dataset[i][1] for i in range(len(trainer.dataset))) == sorted(
        [CAPTIONS[0], "from the table"]
    )
    assert len(list((tmp_path / "run" / "cache" / "latents").iterdir())) == 2  # nothing written for the bad
    trainer.train()  # the run goes on with the good clips


def test_cache_of_another_vae_or_text_encoder_is_refused_naming_both(tmp_path, wan, clips):
    import shutil

    from wan_folders import tiny_umt5

    cache = tmp_path / "cache"
    Trainer(finetune(wan, clips, tmp_path / "a", f"cache={cache}", "steps=1"))
    manifest = (cache / CACHE_FILE).read_text()
    other = tmp_path / "other"
    wan_t2v_root(other, seed=7)
    with pytest.raises(ValueError, match="made with the VAE") as err:
        Trainer(finetune(other, clips, tmp_path / "b", f"cache={cache}", "steps=1"))
    assert str((wan / "vae").resolve()) in str(err.value) and str((other / "vae").resolve()) in str(err.value)
    text = tmp_path / "text"  # Wan's VAE, another text encoder
    shutil.copytree(wan, text)
    shutil.rmtree(text / "text_encoder")
    tiny_umt5(seed=11)[0].save_pretrained(str(text / "text_encoder"))
    with pytest.raises(ValueError, match="made with the text encoder") as err:
        Trainer(finetune(text, clips, tmp_path / "c", f"cache={cache}", "steps=1"))
    assert str(wan / "text_encoder") in str(err.value) and str(text / "text_encoder") in str(err.value)
    assert (cache / CACHE_FILE).read_text() == manifest  # left as it was
    with pytest.raises(ValueError, match="data_options"):
        Trainer(finetune(wan, clips, tmp_path / "d", f"cache={cache}", "steps=1", "data_options={frames: 9}"))


@pytest.mark.slow
def test_our_pipeline_folder_fine_tunes_too(tmp_path, tiny_pipe, clips):
    """A folder of ours (built-in text encoder, masked text): the cache keeps the mask; final/ generates."""
    tiny_pipe.save_pretrained(tmp_path / "ours")
    trainer = Trainer(finetune(tmp_path / "ours", clips, tmp_path / "run", "steps=2", "lora_rank=2"))
    context, mask = trainer.encode_text(CAPTIONS[:2])
    want, want_mask = tiny_pipe.text_encoder.encode(CAPTIONS[:2])
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(context, want, atol=1e-6, rtol=0)
    trainer.train()
    pipe = VideoPipeline.from_pretrained(tmp_path / "run" / "final")
    pipe.progress = False
    assert pipe.loras and pipe.generate(CAPTIONS[1], steps=2, seed=0).shape == (1, 3, 5, 32, 32)


# ------------------------------------------------------------------- point 3: image to video


@pytest.mark.slow
def test_i2v_fine_tunes_on_cached_first_frame_conditioning(tmp_path, clips):
    from safetensors.torch import load_file
    from wan_folders import wan_i2v_root

    from vidlatent.data.io import read_video

    root = tmp_path / "Wan2.1-I2V-tiny-Diffusers"
    wan_i2v_root(root)
    trainer = Trainer(finetune(root, clips, tmp_path / "run", "lora_rank=4", "lr=3e-2", "steps=2"))
    assert trainer.i2v and trainer.text_encoder is None
    item = trainer.dataset.items[0]
    cached = load_file(tmp_path / "run" / "cache" / "image" / item.path.name)
    pipe = VideoPipeline.from_pretrained(root)
    source = read_latent_metadata(item.path)["source"]
    video, _ = read_video(source, frames=5, temporal_factor=4, multiple=8)
    with torch.no_grad():  # what the pipeline gives the model when animating from this clip's first frame
        _, _, want = pipe._wan_image_condition(video[None, :, :1], None, (1, *item.shape))
    condition, image = trainer.task._image_condition([0])
    torch.testing.assert_close(condition, want["condition"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image, want["image"], atol=1e-5, rtol=1e-5)
    assert cached["image"].shape == want["image"].shape[1:]
    before = trainer.evaluate()
    losses = trainer.train()
    assert len(losses) == 2 and trainer.evaluate() != before
    final = VideoPipeline.from_pretrained(tmp_path / "run" / "final")  # image encoder, LoRA on Wan's I2V
    final.progress = False
    assert final.loras and final.image_encoder is not None
    out = final.animate(video[None, :, :1], CAPTIONS[0], frames=5, steps=2, seed=0)
    assert out.shape == (1, 3, 5, 32, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_two_ranks_share_the_cache_and_match_one_process(tmp_path, wan, clips):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["lora_rank=4", "steps=2", "caption_dropout=0.5", "device=cpu"]
    one = Trainer(finetune(wan, clips, tmp_path / "one", "batch_size=2", *args))
    expected = one.train()
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    overrides = [f"pipeline={wan}", f"data={clips}", f"output={tmp_path / 'ddp'}", "data_options={frames: 5}",
                 "lr=5e-3", "ema_decay=0", "checkpoint_every=2", "progress=false", "batch_size=1", *args]  # fmt: skip
    (tmp_path / "ft.yaml").write_text("\n".join(o.replace("=", ": ", 1) for o in overrides) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidlatent.cli", "train", str(tmp_path / "ft.yaml")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    got = [json.loads(r)["loss"] for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(expected, abs=1e-5)
    for name in ("latents", "text"):
        a, b = tmp_path / "one" / "cache" / name, tmp_path / "ddp" / "cache" / name
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for p in a.iterdir():
            x, y = load_file(p), load_file(b / p.name)
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_latents_coded_under_vae_overrides_export_the_vae_that_made_them(tmp_path, clips, tiny_vae):
    """Latents a VAE folder made with ``first_frame=still`` over its config (a recipe cache's ``vae_overrides``)
    export that VAE, the field included, and say nothing; the folder as it is would code frame 0 otherwise."""
    import warnings

    from vidlatent.data.latents import vae_fingerprint
    from vidlatent.models.vae import CausalVAE
    from vidlatent.pipelines.batch import encode_clips

    tiny_vae.save_pretrained(tmp_path / "vae")
    still = CausalVAE.from_pretrained(tmp_path / "vae", first_frame="still")
    encode_clips(
        [clips], tmp_path / "lat", still, vae_src=str(tmp_path / "vae"), progress=False, num_workers=0
    )
    cfg = load_train_config("tiny", overrides=[f"data={tmp_path / 'lat'}", f"output={tmp_path / 'run'}",
                                               "steps=1", "progress=false", "vae=tiny"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*made them")
        Trainer(cfg).train()
    exported = CausalVAE.from_pretrained(tmp_path / "run" / "final" / "vae")
    assert exported.config.first_frame == "still" and vae_fingerprint(exported) == vae_fingerprint(still)
    assert vae_fingerprint(tiny_vae) != vae_fingerprint(still)


def test_latents_without_a_vae_record_train_and_say_so(tmp_path, clips, tiny_vae):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vidlatent.pipelines.batch import encode_clips

    encode_clips([clips], tmp_path / "new", tiny_vae, progress=False, num_workers=0)
    (tmp_path / "old").mkdir()
    for f in (tmp_path / "new").glob("*.safetensors"):  # as an older vidlatent wrote them: no "vae" entry
        with safe_open(str(f), framework="pt") as fh:
            meta = {k: v for k, v in fh.metadata().items() if k != "vae"}
            save_file({"latents": fh.get_tensor("latents")}, str(tmp_path / "old" / f.name), metadata=meta)
    cfg = load_train_config("tiny", overrides=[f"data={tmp_path / 'old'}", f"output={tmp_path / 'run'}",
                                               "steps=1", "progress=false", "vae=tiny"])  # fmt: skip
    with pytest.warns(UserWarning, match="do not record their VAE.*final/vae is vae='tiny'"):
        Trainer(cfg).train()
    assert (tmp_path / "run" / "final" / "vae" / "config.json").is_file()
