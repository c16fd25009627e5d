"""Clips to latent files and back (vidlatent.pipelines.batch, data.latents, data.paths): contents, metadata, resume, sharding, stats,
decoding, PSNR / SSIM. The tiny VAE with seeded random weights; clips written by write_video (ffmpeg).

Shapes: c channels, t frames, h height, w width.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from media import pattern
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vidlatent import CausalVAE, __version__
from vidlatent.data.io import read_video, write_video
from vidlatent.data.latents import latent_name, load_latents, read_latent_metadata, vae_fingerprint
from vidlatent.data.paths import expand_paths, shard
from vidlatent.metrics import psnr
from vidlatent.pipelines.batch import (
    ChannelStats,
    decode_latents,
    encode_clips,
    first_frame_stats,
    latent_stats,
    load_vae,
    reconstruct,
    write_stats,
)
from vidlatent.pipelines.encode import ssim  # the float form (the reports' SSIM as it was)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clips")
    (d / "sub").mkdir()
    f = {
        "a": d / "a.mp4",  # 9 frames 16x32 at 8 fps (decord needs widths in multiples of 32)
        "a2": d / "sub" / "a.mp4",  # same name, other folder, same shape (batched with "a")
        "b": d / "b.mp4",  # 5 frames 24x32: a shape of its own
        "img": d / "img.png",  # an image 16x16: a one-frame clip
        "bad": d / "bad.mp4",  # not a video
    }
    write_video(f["a"], pattern(9, 16, 32), fps=8)
    write_video(f["a2"], pattern(9, 16, 32, phase=1.0), fps=8)
    write_video(f["b"], pattern(5, 24, 32), fps=8)
    write_video(f["img"], pattern(1, 16, 16))
    f["bad"].write_bytes(np.random.default_rng(0).bytes(3000))
    f["missing"] = d / "missing.mp4"
    f["dir"] = d
    return f


@pytest.fixture(scope="module")
def vae(tiny_vae) -> CausalVAE:
    return tiny_vae


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, media, vae):
    """Every clip encoded once (batch of 2 for the two same-shape clips); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("latents")
    clips = [media[k] for k in ("a", "a2", "b", "img", "bad", "missing")]
    report = encode_clips(clips, out, vae, batch_size=2, num_workers=1, vae_src="preset:tiny", progress=False)
    return report, out


def output_of(report, path) -> str:
    return dict(report.done + report.skipped)[str(path)]


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------ encoding


def test_outputs_names_and_failures(encoded, media):
    report, out = encoded
    assert sorted(src for src, _ in report.done) == sorted(str(media[k]) for k in ("a", "a2", "b", "img"))
    assert report.skipped == []
    reasons = dict(report.failed)
    assert set(reasons) == {str(media["bad"]), str(media["missing"])}
    assert "VideoReadError" in reasons[str(media["bad"])] and "bad.mp4" in reasons[str(media["bad"])]
    assert reasons[str(media["missing"])].startswith("FileNotFoundError")
    assert "4 done, 0 skipped (already done), 2 failed" in report.summary()

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(os.path.basename(o) for _, o in report.done)  # nothing else, no temporaries
    # same stem in two folders -> two names; the name does not depend on how the path is spelled
    assert latent_name(media["a"]) != latent_name(media["a2"])
    assert latent_name(media["a"]).startswith("a-") and latent_name(media["a2"]).startswith("a-")
    assert latent_name(os.path.relpath(media["a"])) == latent_name(media["a"])
    assert latent_name(media["dir"] / "sub" / ".." / "a.mp4") == latent_name(media["a"])


def test_latents_and_metadata(encoded, media, vae):
    report, _ = encoded
    video, info = read_video(media["a"])
    with torch.no_grad():
        mean = vae.encode(video[None]).mean[0]
    z, meta = load_latents(output_of(report, media["a"]), raw=False)
    assert z.shape == (4, 3, 2, 4) and z.dtype == torch.float32
    torch.testing.assert_close(z, vae.normalize(mean[None])[0], atol=1e-5, rtol=1e-5)  # batched == alone
    torch.testing.assert_close(load_latents(output_of(report, media["a"]))[0], mean, atol=1e-5, rtol=1e-5)

    assert meta["format"] == "vidlatent.latents" and meta["vidlatent_version"] == __version__
    assert meta["source"] == str(media["a"].resolve())
    assert meta["source_info"]["frame_indices"] == list(range(9)) == info["frame_indices"]
    assert meta["source_info"]["fps"] == 8 and meta["source_info"]["size"] == [16, 32]
    assert meta["source_info"]["frame_policy"] == "trim" and meta["source_info"]["frames_trimmed"] == 0
    assert meta["normalized"] is True and meta["latent"] == "mode"
    assert meta["latents_mean"] == vae.config.latents_mean and meta["latents_std"] == vae.config.latents_std
    assert meta["vae"]["fingerprint"] == vae_fingerprint(vae) and meta["vae"]["src"] == "preset:tiny"
    assert meta["vae"]["config"]["latent_channels"] == 4
    assert meta["settings"]["vae"] == vae_fingerprint(vae)

    assert load_latents(output_of(report, media["b"]))[0].shape == (4, 2, 3, 4)  # 5 frames, 24x32
    assert load_latents(output_of(report, media["img"]))[0].shape == (4, 1, 2, 2)


def test_raw_files_and_the_normalized_flag_round_trip(tmp_path, encoded, media, vae):
    report, _ = encoded
    raw_report = encode_clips([media["img"]], tmp_path, vae, normalized=False, progress=False)
    raw, raw_meta = load_latents(raw_report.done[0][1], raw=False)
    norm_file = output_of(report, media["img"])
    assert raw_meta["normalized"] is False and read_latent_metadata(norm_file)["normalized"] is True
    torch.testing.assert_close(load_latents(norm_file, raw=True)[0], raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_latents(norm_file, raw=False)[0], vae.normalize(raw[None])[0])


def test_files_of_a_vae_with_first_frame_statistics_round_trip(tmp_path, media, vae, first_stats_vae):
    from vidlatent.train import LatentDataset

    own = first_stats_vae(vae)
    raw_file = encode_clips([media["img"]], tmp_path / "raw", own, normalized=False, progress=False).done[0][
        1
    ]
    norm_file = encode_clips([media["img"]], tmp_path / "norm", own, progress=False).done[0][1]
    raw, meta = load_latents(raw_file, raw=False)
    assert meta["first_latents_std"] == own.config.first_latents_std
    expected = own.normalize(raw[None])[0]
    assert not torch.allclose(expected, vae.normalize(raw[None])[0])  # the first frame's own statistics count
    torch.testing.assert_close(load_latents(norm_file, raw=False)[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_latents(norm_file, raw=True)[0], raw, atol=1e-5, rtol=1e-5)
    for folder in ("raw", "norm"):  # a denoiser's dataset sees the same normalized latents from either file
        torch.testing.assert_close(LatentDataset(tmp_path / folder)[0][0], expected, atol=1e-5, rtol=1e-5)


def test_sampled_latents_are_seeded_per_clip_not_per_batch(tmp_path, media, vae):
    both = encode_clips([media["a"], media["a2"]], tmp_path / "b2", vae, sample=True, seed=3, progress=False)
    one = encode_clips(
        [media["a"]],
        tmp_path / "b1",
        vae,
        sample=True,
        seed=3,
        batch_size=1,
        save_logvar=True,
        progress=False,
    )
    z2, meta = load_latents(output_of(both, media["a"]))
    z1 = load_latents(one.done[0][1])[0]
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)  # alone or in a batch of two: same noise
    assert meta["latent"] == "sample" and meta["settings"]["seed"] == 3
    logvar = load_file(one.done[0][1])["logvar"]
    with torch.no_grad():
        post = vae.encode(read_video(media["a"])[0][None])
    torch.testing.assert_close(logvar, post.logvar[0], atol=1e-5, rtol=1e-5)
    eps = (z1 - post.mean[0]) / post.std[0]  # the noise drawn: standard normal
    assert eps.abs().max() > 0.1 and 0.5 < eps.std() < 1.5


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_resume_skips_done_redoes_missing_and_cleans_temporaries(tmp_path, encoded, media, vae):
    report, src = encoded
    out = tmp_path / "latents"
    shutil.copytree(src, out)
    clips = [media[k] for k in ("a", "a2", "b", "img", "bad", "missing")]

    again = encode_clips(clips, out, vae, progress=False)
    assert again.done == [] and len(again.skipped) == 4 and len(again.failed) == 2

    # a run killed mid-write leaves a temporary; its output is missing
    img_out = out / latent_name(media["img"])
    img_out.unlink()
    stale = out / f".{img_out.name}.k3j2x9.tmp.safetensors"
    stale.write_bytes(b"partial")
    foreign = out / ".someone-else.safetensors.a1b2c3.tmp.safetensors"  # not one of our outputs: kept
    foreign.write_bytes(b"partial")
    # atomic_write's temporary folders beside a done output: a killed writer's goes, a live one's stays
    done_out = out / latent_name(media["a"])
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    killed = out / f".{done_out.name}.{int(gone.stdout)}-x1y2z3.tmp.safetensors"
    live = out / f".{done_out.name}.{os.getppid()}-x1y2z3.tmp.safetensors"  # pytest's parent: running
    for d in (killed, live):
        d.mkdir()
        (d / done_out.name).write_bytes(b"partial")
    before = mtimes(out)
    redo = encode_clips(clips, out, vae, progress=False)
    assert [src for src, _ in redo.done] == [str(media["img"])] and len(redo.skipped) == 3
    assert img_out.is_file() and not stale.exists() and foreign.exists()
    assert not killed.exists() and (live / done_out.name).is_file()
    after = mtimes(out)
    assert all(after[n] == t for n, t in before.items() if n not in (stale.name, img_out.name, killed.name))

    # other settings into the same folder: refused, nothing touched; overwrite re-encodes
    changed = encode_clips([media["img"]], out, vae, normalized=False, progress=False)
    assert changed.done == [] and "normalized: True -> False" in changed.failed[0][1]
    assert read_latent_metadata(img_out)["normalized"] is True
    forced = encode_clips([media["img"]], out, vae, normalized=False, overwrite=True, progress=False)
    assert len(forced.done) == 1 and read_latent_metadata(img_out)["normalized"] is False


def test_shards_cover_every_clip_once(tmp_path, media, vae, monkeypatch):
    assert shard(list(range(7)), rank=1, world_size=3)[0] == [1, 4]
    with pytest.raises(ValueError, match="rank"):
        shard([1], rank=2, world_size=2)
    clips = [media[k] for k in ("img", "bad", "missing", "b")]
    reports = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        reports.append(encode_clips(clips, tmp_path, vae, progress=False))
    shares = [{src for src, _ in r.done + r.failed} for r in reports]
    assert shares[0] | shares[1] == {str(c) for c in clips} and not shares[0] & shares[1]
    assert len(shares[0]) == len(shares[1]) == 2
    assert (reports[1].rank, reports[1].world_size) == (1, 2) and "rank 1 of 2" in reports[1].summary()
    written = {os.path.basename(out) for r in reports for _, out in r.done}
    assert (
        {p.name for p in tmp_path.iterdir()}
        == written
        == {latent_name(media["img"]), latent_name(media["b"])}
    )


def test_expand_paths_finds_media_in_folders(tmp_path, media):
    link = tmp_path / "link.mp4"
    link.symlink_to(media["a"])
    found = expand_paths([media["dir"], media["a"], link, media["missing"]])
    names = [p.relative_to(media["dir"]).as_posix() for p in found]
    assert names == ["a.mp4", "b.mp4", "bad.mp4", "img.png", "sub/a.mp4", "missing.mp4"]  # no repeats
    assert latent_name(link) == latent_name(media["a"])


# ---------------------------------------------------------------------------------------------- stats


def test_channel_stats_are_exact_and_stable_under_a_large_offset():
    gen = torch.Generator().manual_seed(0)
    chunks = [1e6 + torch.randn(3, n, generator=gen, dtype=torch.float64) * (1 + torch.arange(3.0))[:, None]
              for n in (1, 7, 300, 2, 1000)]  # fmt: skip
    stats = ChannelStats()
    for c in chunks:
        stats.update(c)
    flat = torch.cat(chunks, 1)
    torch.testing.assert_close(stats.mean, flat.mean(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(stats.std, flat.std(1, correction=0), rtol=1e-10, atol=0)
    halves = ChannelStats().update(flat[:, :500]).merge(ChannelStats().update(flat[:, 500:]))
    torch.testing.assert_close(halves.std, stats.std, rtol=1e-10, atol=0)


def test_latent_stats_over_files_match_torch_on_the_concatenation(tmp_path, encoded, vae):
    _, out = encoded
    raws = [load_latents(f)[0] for f in sorted(out.iterdir())]  # clips of different sizes
    flat = torch.cat([z.double().flatten(1) for z in raws], 1)
    mean, std = latent_stats(out)
    torch.testing.assert_close(mean, flat.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(std, flat.std(1, correction=0), rtol=0, atol=1e-12)
    assert torch.equal(latent_stats(sorted(out.iterdir()))[0], mean)

    # written as VAE config fields: a VAE configured with them normalizes these latents to mean 0, std 1
    for name in ("stats.yaml", "stats.json"):
        cfg = OmegaConf.to_container(OmegaConf.load(write_stats(tmp_path / name, mean, std)))
        assert set(cfg) == {"latents_mean", "latents_std"} and len(cfg["latents_mean"]) == 4
        fitted = CausalVAE.from_pretrained("tiny", **cfg)
        z = torch.cat([fitted.normalize(r[None]).flatten(2) for r in raws], 2).double()
        torch.testing.assert_close(z.mean((0, 2)), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            z.std((0, 2), correction=0), torch.ones(4, dtype=torch.float64), rtol=1e-4, atol=0
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no latent files"):
        latent_stats(tmp_path / "empty")


def test_latent_stats_of_first_and_later_frames(tmp_path, encoded):
    _, out = encoded
    files = sorted(out.iterdir())
    raws = [load_latents(f)[0] for f in files]
    assert any(z.shape[1] == 1 for z in raws) and any(z.shape[1] > 1 for z in raws)  # the image and clips
    for frames, part in (("first", slice(0, 1)), ("later", slice(1, None))):
        flat = torch.cat([z[:, part].double().flatten(1) for z in raws], 1)
        mean, std = latent_stats(out, frames=frames)
        torch.testing.assert_close(mean, flat.mean(1), rtol=0, atol=1e-12)
        torch.testing.assert_close(std, flat.std(1, correction=0), rtol=0, atol=1e-12)
    # both in one pass, as a VAE with first-frame statistics holds them
    (first_mean, first_std), (mean, std) = first_frame_stats(out)
    assert torch.equal(first_mean, latent_stats(out, frames="first")[0])
    assert torch.equal(first_std, latent_stats(out, frames="first")[1])
    assert torch.equal(mean, latent_stats(out, frames="later")[0])
    assert torch.equal(std, latent_stats(out, frames="later")[1])
    assert not torch.allclose(mean, latent_stats(out)[0], atol=1e-4)
    # images only: no later frame; first_frame_stats then gives frame 0's for both, as VAE calibration does
    images = tmp_path / "images"
    images.mkdir()
    for f, z in zip(files, raws):
        if z.shape[1] == 1:
            shutil.copy(f, images / f.name)
    with pytest.raises(ValueError, match="no latent file has a frame after the first"):
        latent_stats(images, frames="later")
    first, later = first_frame_stats(images)
    assert all(torch.equal(a, b) for a, b in zip(first, later))
    with pytest.raises(ValueError, match="frames must be one of all, first, later; got 'middle'"):
        latent_stats(out, frames="middle")


# --------------------------------------------------------------------------------------------- decode


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_decode_latents_back_to_videos(tmp_path, encoded, media, vae):
    report, out = encoded
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    stranger = tmp_path / "stranger.safetensors"  # a valid safetensors file, but not one of ours
    save_file({"x": torch.zeros(1)}, str(stranger))
    videos = tmp_path / "videos"
    files = [output_of(report, media["b"]), output_of(report, media["img"]), junk, stranger]
    result = decode_latents(files, videos, vae, progress=False)
    assert len(result.done) == 2 and {src for src, _ in result.failed} == {str(junk), str(stranger)}
    assert "not a vidlatent latent file" in dict(result.failed)[str(stranger)]
    assert result.notes == []

    b_video = videos / (latent_name(media["b"])[: -len(".safetensors")] + ".mp4")
    back, info = read_video(b_video)
    assert back.shape == (3, 5, 24, 32) and info["fps"] == 8

    # lossless check on the image, through png
    img_latents = output_of(report, media["img"])
    png = decode_latents([img_latents], tmp_path / "png", vae, fmt="png", progress=False)
    with torch.no_grad():
        expected = vae.decode(load_latents(img_latents)[0][None])[0]
    got = read_video(png.done[0][1])[0]
    assert (got - expected).abs().max() <= 1 / 127.5 + 1e-6

    again = decode_latents(files[:2], videos, vae, progress=False)  # resumes: everything is there
    assert again.done == [] and len(again.skipped) == 2
    (tmp_path / "copy").mkdir()
    twin = shutil.copy(files[1], tmp_path / "copy")  # same file name from another folder: not overwritten
    clash = decode_latents([files[1], twin], tmp_path / "clash", vae, fmt="png", progress=False)
    assert len(clash.done) == 1 and "already in this run" in clash.failed[0][1]
    stranger_vae = CausalVAE.from_pretrained("tiny")  # unseeded: other weights
    noted = decode_latents([img_latents], tmp_path / "other", stranger_vae, fmt="png", progress=False)
    assert len(noted.done) == 1 and "encoded by VAE" in noted.notes[0]
    with pytest.raises(ValueError, match="unknown format"):
        decode_latents([img_latents], tmp_path, vae, fmt="avi")


# -------------------------------------------------------------------------------------------- metrics


def brute_force_ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two 2D arrays straight from Wang et al.'s formula, one window position at a time."""
    g = np.exp(-((np.arange(window) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            a, b = x[i : i + window, j : j + window], y[i : i + window, j : j + window]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_known_values():
    a = torch.zeros(3, 2, 16, 16)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    assert psnr(a, a + 0.2, data_range=2.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:, :1])


def test_ssim_known_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 20, 24, generator=gen)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)

    # constant frames: sigmas are zero, SSIM is the luminance term alone
    c1, a, b = 0.01**2, 0.25, 0.625  # exact in binary
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(torch.full((3, 16, 16), a), torch.full((3, 16, 16), b)) == pytest.approx(expected, rel=1e-12)

    # random frames against the formula evaluated window by window
    y = (x + 0.2 * torch.rand(x.shape, generator=gen)).clamp(0, 1)
    ref = np.mean([brute_force_ssim(x[c, t].numpy(), y[c, t].numpy()) for c in range(3) for t in range(2)])
    assert ssim(x, y) == pytest.approx(ref, rel=1e-10)
    assert ssim(x, y) < 0.99

    # a clip is the mean over frames; luma is SSIM of BT.601 Y
    same_then_other = torch.stack([x[:, 0], x[:, 0]], 1), torch.stack([x[:, 0], y[:, 0]], 1)
    assert ssim(*same_then_other) == pytest.approx((1 + ssim(x[:, 0], y[:, 0])) / 2, rel=1e-12)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)
    yx, yy = (x.double() * luma).sum(0), (y.double() * luma).sum(0)
    ref_luma = np.mean([brute_force_ssim(yx[t].numpy(), yy[t].numpy()) for t in range(2)])
    assert ssim(x, y, channels="luma") == pytest.approx(ref_luma, rel=1e-10)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_reconstruct_returns_both_clips_and_their_metrics(media, vae):
    video, recon, quality_psnr, quality_ssim = reconstruct(media["a"], vae, frames=5)
    assert video.shape == recon.shape == (3, 5, 16, 32)
    assert recon.min() >= -1 and recon.max() <= 1
    assert quality_psnr == pytest.approx(psnr((video + 1) / 2, (recon + 1) / 2))
    assert quality_ssim == pytest.approx(ssim((video + 1) / 2, (recon + 1) / 2))
    assert math.isfinite(quality_psnr) and -1 < quality_ssim < 1


# ---------------------------------------------------------------------------------------------- models


def test_load_vae_sources(tmp_path, vae, monkeypatch):
    again, src = load_vae("tiny")
    assert src == "preset:tiny" and vae_fingerprint(again) == vae_fingerprint(vae)  # seeded presets
    vae.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder: its vae/ is used
    from_folder, folder_src = load_vae(tmp_path / "pipe")
    assert folder_src == str((tmp_path / "pipe" / "vae").resolve())
    assert vae_fingerprint(from_folder) == vae_fingerprint(vae)
    assert vae_fingerprint(CausalVAE.from_pretrained("tiny", latents_std=[1.0] * 4)) != vae_fingerprint(vae)
    monkeypatch.setattr("vidlatent.checkpoint.WEIGHTS_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="default model is not installed"):
        load_vae("default")
    with pytest.raises(FileNotFoundError, match="no model at 'nope'"):
        load_vae("nope")


def test_a_resumed_job_encodes_a_changed_source_again(tmp_path, vae):
    """A clip re-rendered since its latents were written is encoded again (with a note); the rest are skipped."""
    kept, changed = tmp_path / "kept.png", tmp_path / "changed.png"
    write_video(kept, pattern(1, 16, 16))
    write_video(changed, pattern(1, 16, 16))
    out = tmp_path / "latents"
    first = encode_clips([kept, changed], out, vae, progress=False)
    assert len(first.done) == 2
    old = load_latents(output_of(first, changed))[0]
    write_video(changed, -pattern(1, 16, 16))  # the user replaces the clip
    os.utime(changed, ns=(1, 1))  # whatever its new time: a different stamp
    again = encode_clips([kept, changed], out, vae, progress=False)
    assert [src for src, _ in again.done] == [str(changed)]
    assert [src for src, _ in again.skipped] == [str(kept)]
    assert any("changed since" in note for note in again.notes)
    fresh = load_latents(output_of(again, changed))[0]
    assert not torch.allclose(fresh, old)
    alone = encode_clips([changed], tmp_path / "alone", vae, progress=False)
    torch.testing.assert_close(fresh, load_latents(alone.done[0][1])[0])
    third = encode_clips([kept, changed], out, vae, progress=False)  # now both are up to date
    assert third.done == [] and len(third.skipped) == 2
