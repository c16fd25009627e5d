"""The `vidlatent encode / decode / reconstruct / convert` commands: subprocess runs on ffmpeg-made clips,
one-line errors on bad input, examples in --help, and conversion of diffusers folders."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from vidlatent import CausalVAE, VideoDiT
from vidlatent.cli import main
from vidlatent.config import DiTConfig, load_config
from vidlatent.data.io import read_video, write_video
from vidlatent.data.latents import load_latents
from vidlatent.models.dit import to_diffusers_config
from vidlatent.models.vae import vae_config_to_diffusers
from vidlatent.pipelines.batch import first_frame_stats, latent_stats, load_vae, reconstruct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args) -> subprocess.Popen:
    """Start ``python -m vidlatent.cli ARGS`` (runs alongside the test; ``finish`` collects it)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    cmd = [sys.executable, "-m", "vidlatent.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def pattern(frames: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.8 * torch.stack(
        [torch.stack([torch.sin(3 * xx + 0.3 * i), torch.cos(2 * yy), xx * yy]) for i in range(frames)], 1
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_video(d / "a.mp4", pattern(9, 16, 32), fps=8)
    write_video(d / "still.png", pattern(1, 16, 16))
    (d / "bad.mp4").write_bytes(np.random.default_rng(1).bytes(2000))
    (d / "notes.txt").write_text("not media: not picked up from the folder")
    return d


def one_line_error(capsys, argv, match: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_encode_stats_decode_reconstruct(tmp_path, clips, capsys):
    vae, _ = load_vae("tiny")
    vae.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder: --model uses its vae/
    lat, stats_file, out = tmp_path / "lat", tmp_path / "stats.json", tmp_path / "recon.mp4"
    encoding = cli("encode", clips, "batch_size=2", "-o", lat, "--model", tmp_path / "pipe", "--stats",
                   "--first-frame-stats", "--stats-out", stats_file, "--device", "cpu")  # fmt: skip
    reconstructing = cli("reconstruct", clips / "a.mp4", "-o", out, "--model", "tiny", "--frames", "5")
    run = finish(encoding)
    assert run.returncode == 1, run.stderr  # one clip is bad: reported, the others encoded
    assert "2 done, 0 skipped (already done), 1 failed" in run.stdout
    assert re.search(r"failed: .*bad\.mp4: VideoReadError", run.stdout)
    assert "encode: 100%" in run.stderr  # the progress bar
    files = sorted(lat.iterdir())
    assert [f.name.split("-")[0] for f in files] == ["a", "still"]
    # with --first-frame-stats, latents_mean / _std are the later frames' (the still has none), as VAE export
    # calibrates a VAE with first-frame statistics
    mean, std = latent_stats(lat, frames="later")
    assert not torch.allclose(mean, latent_stats(lat)[0], atol=1e-4)
    written = json.loads(stats_file.read_text())
    np.testing.assert_allclose(written["latents_mean"], mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(written["latents_std"], std.numpy(), atol=1e-6)
    printed = re.search(r"^latents_std: \[(.*)\]", run.stdout, re.M).group(1)
    np.testing.assert_allclose([float(v) for v in printed.split(",")], std.numpy(), atol=1e-6)
    # the first latent frame's own: over frame 0 of each file alone
    first = torch.cat([load_latents(f)[0][:, 0].flatten(1) for f in files], dim=1).double()
    np.testing.assert_allclose(written["first_latents_mean"], first.mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(written["first_latents_std"], first.std(1, correction=0).numpy(), atol=1e-5)
    assert not np.allclose(written["first_latents_std"], written["latents_std"], atol=1e-3)
    printed = re.search(r"^first_latents_std: \[(.*)\]", run.stdout, re.M).group(1)
    np.testing.assert_allclose(
        [float(v) for v in printed.split(",")], written["first_latents_std"], atol=1e-5
    )

    # decode in this process (subprocess startup is slow): the seeded preset gives the weights the other
    # process saved, so no VAE mismatch note
    videos = tmp_path / "videos"
    assert main(["decode", str(lat), "-o", str(videos), "--model", "tiny", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "decode: 2 done" in stdout and "note" not in stdout
    video, info = read_video(videos / (files[0].stem + ".mp4"))
    assert video.shape == (3, 9, 16, 32) and info["fps"] == 8

    run = finish(reconstructing)
    assert run.returncode == 0, run.stderr
    got = re.search(r"PSNR ([\d.]+) dB  SSIM ([\d.]+)", run.stdout)
    expected = reconstruct(clips / "a.mp4", vae, frames=5)
    assert float(got.group(1)) == pytest.approx(expected.psnr, abs=0.006)
    assert float(got.group(2)) == pytest.approx(expected.ssim, abs=6e-5)
    assert read_video(out)[0].shape == (3, 5, 16, 32)


def test_bad_input_exits_2_with_one_line(tmp_path, clips, capsys, monkeypatch):
    monkeypatch.setattr("vidlatent.checkpoint.WEIGHTS_DIR", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    one_line_error(
        capsys, ["encode", tmp_path / "empty", "-o", tmp_path / "o", "--model", "tiny"], "no video or image"
    )
    one_line_error(
        capsys, ["encode", clips / "a.mp4", "-o", tmp_path / "o"], "default model is not installed"
    )
    one_line_error(capsys, ["encode", clips / "a.mp4", "bogus=1", "-o", tmp_path / "o", "--model", "tiny"],
                   "unknown option 'bogus'")  # fmt: skip
    one_line_error(capsys, ["reconstruct", clips / "gone.mp4", "-o", tmp_path / "r.mp4", "--model", "tiny"],
                   "no such file")  # fmt: skip
    one_line_error(capsys, ["reconstruct", clips / "bad.mp4", "-o", tmp_path / "r.mp4", "--model", "tiny"],
                   "cannot read .*bad.mp4")  # fmt: skip
    one_line_error(
        capsys, ["decode", tmp_path / "empty", "-o", tmp_path / "v", "--model", "tiny"], "no latent files"
    )
    one_line_error(capsys, ["convert", tmp_path / "nothing", "-o", tmp_path / "c"], "nothing to convert")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.mp4").exists()


@pytest.mark.parametrize("command", ["encode", "decode", "reconstruct", "convert"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"vidlatent {command} " in capsys.readouterr().out.split("example")[1]


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(max(1, p[0].numel())))
    return model.eval()


def test_convert_diffusers_pipeline_root_and_vae_folder(tmp_path, capsys):
    vae_cfg = load_vae("tiny")[0].config
    root = tmp_path / "diffusers"
    diffusers_vae = randomize(AutoencoderKLWan(**vae_config_to_diffusers(vae_cfg)), 0)
    diffusers_vae.save_pretrained(root / "vae")
    dit_cfg = load_config(DiTConfig, "dit", "tiny")
    randomize(WanTransformer3DModel(**to_diffusers_config(dit_cfg)), 1).save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))

    assert main(["convert", str(root), "-o", str(tmp_path / "both")]) == 0
    assert "wrote vae" in capsys.readouterr().out
    converted = CausalVAE.from_pretrained(tmp_path / "both" / "vae")
    assert json.loads((tmp_path / "both" / "vae" / "config.json").read_text())["_vidlatent_kind"] == "vae"
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours, direct = converted.encode(x), CausalVAE.from_pretrained(root / "vae").encode(x)
        theirs = diffusers_vae.encode(x).latent_dist
        assert torch.equal(ours.mean, direct.mean) and torch.equal(ours.logvar, direct.logvar)
        torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-4, rtol=1e-4)
        assert torch.equal(
            converted.decode(ours.mean), CausalVAE.from_pretrained(root / "vae").decode(ours.mean)
        )
    dit = VideoDiT.from_pretrained(tmp_path / "both" / "dit")
    reference = VideoDiT.from_pretrained(root / "transformer").state_dict()
    assert dit.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in dit.state_dict().items())

    # one part by name goes into the output folder itself; a part the source does not hold is refused
    assert main(["convert", str(root), "-o", str(tmp_path / "vae_only"), "--kind", "vae"]) == 0
    assert (tmp_path / "vae_only" / "model.safetensors").is_file()
    assert not (tmp_path / "vae_only" / "dit").exists()
    one_line_error(
        capsys, ["convert", root / "vae", "-o", tmp_path / "x", "--kind", "dit"], "holds a vae, not a dit"
    )


def torchrun_encode(folder, lat, stats_file, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidlatent.cli", "encode", folder, "-o", lat, "--model", "tiny", "--stats", "--stats-out",
           stats_file, "--device", "cpu", *flags]  # fmt: skip
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_shards_clips_and_merges_stats_across_ranks(tmp_path, clips):
    lat, stats_file = tmp_path / "lat", tmp_path / "stats.json"
    run = torchrun_encode(clips, lat, stats_file)
    assert run.returncode != 0  # bad.mp4 fails on its rank, which exits 1
    # sorted clips a.mp4, bad.mp4, still.png: rank 0 encodes two, rank 1 has only the bad one (and no
    # statistics of its own to contribute, which the merge must survive)
    assert "encode (rank 0 of 2): 2 done" in run.stdout, run.stdout + run.stderr
    assert "encode (rank 1 of 2): 0 done, 0 skipped (already done), 1 failed" in run.stdout
    assert len(list(lat.iterdir())) == 2
    written = json.loads(stats_file.read_text())
    mean, std = latent_stats(lat)
    np.testing.assert_allclose(written["latents_mean"], mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(written["latents_std"], std.numpy(), atol=1e-6)


@pytest.mark.slow
def test_torchrun_merges_first_frame_stats_from_every_rank(tmp_path):
    # a.mp4 and c.mp4 on rank 0, b.mp4 and still.png on rank 1: both ranks hold first and later frames
    folder, lat, stats_file = tmp_path / "clips", tmp_path / "lat", tmp_path / "stats.json"
    folder.mkdir()
    write_video(folder / "a.mp4", pattern(9, 16, 32), fps=8)
    write_video(folder / "b.mp4", -pattern(5, 16, 16), fps=8)
    write_video(folder / "c.mp4", pattern(13, 16, 16).flip(-1), fps=8)
    write_video(folder / "still.png", pattern(1, 16, 16))
    run = torchrun_encode(folder, lat, stats_file, "--first-frame-stats")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "encode (rank 0 of 2): 2 done" in run.stdout and "encode (rank 1 of 2): 2 done" in run.stdout
    written = json.loads(stats_file.read_text())
    (first_mean, first_std), (mean, std) = first_frame_stats(lat)  # one process over all four files
    for key, want in [("first_latents_mean", first_mean), ("first_latents_std", first_std),
                      ("latents_mean", mean), ("latents_std", std)]:  # fmt: skip
        np.testing.assert_allclose(written[key], want.numpy(), atol=1e-6, err_msg=key)
    assert not np.allclose(written["first_latents_mean"], written["latents_mean"], atol=1e-3)
