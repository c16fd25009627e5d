"""Reproduce the shipped default model from nothing: the shapes world, our trainer, our configs.

    python scripts/train_default.py [--out runs/default] [--stages vae cache dit refine joint polish joint2 polish3
                                                            i2v gpu redraw redraw2 carry gpu2 redraw3 ship eval]
                                                           [--adopt-ship]

Stages (each resumes where an interrupted run stopped; rerunning a finished stage is a no-op):
  vae    vidlatent train default-vae            (configs: vidlatent/configs/train/default-vae.yaml), then
         vidlatent train default-vae-finetune   (whole clips, from the first run's export)
  cache  encode --clips training clips of the world (17 frames, 64x64) with the trained VAE into latent files
  dit    vidlatent train default-dit            (configs: vidlatent/configs/train/default-dit.yaml)
  refine both parts trained on side by side, one CPU thread each (``REFINE``: the same configs from the
         previous exports with a fresh schedule); the decoder alone learns, so the cached latents stay valid
  joint  the whole VAE, encoder included (``JOINT_VAE``), --joint-clips clips cached again with it, then its
         decoder and the denoiser on the new latents side by side (``JOINT``)
  polish both stage-4 lanes carried on side by side, twice, with fresh, lower schedules (``POLISH``)
  joint2 stage 4 again from stage 5's exports (``JOINT2_VAE``, ``JOINT2``); the denoiser also learns one-frame
         clips (``image_fraction``)
  polish3 both stage-6 lanes carried on (``POLISH3``); the denoiser with uniform sigmas (low-sigma detail)
  i2v    the denoiser alone learns image-to-video conditioning (``I2V``: ``first_frame_dropout``)
  gpu    on a CUDA GPU: --gpu-clips clips cached, then three denoiser runs sharing it for a wall-clock budget
         (``GPU``: two with one token per latent pixel, and the stage-8 denoiser carried on); the larger patch-1
         run then carries on
  redraw the stage-7 decoder carried on with the stage-9 denoiser re-drawing half of its clips (``REDRAW``)
  redraw2 the stage-10 decoder carried on the same way with a fresh schedule and both CPU threads (``REDRAW2``)
  carry  the stage-9 denoiser carried on on the CPU (``CARRY``), on clips cached afresh
  gpu2   on a CUDA GPU: --gpu2-clips clips cached, then the stage-12 denoiser carried on alone (``GPU2``; not yet
         run: see the note above ``GPU2``)
  redraw3 the stage-11 decoder carried on with the stage-13 denoiser re-drawing half of its clips (``REDRAW3``;
         not yet run)
  ship   assemble the pipeline folder (vae/, dit/, text_encoder/, pipeline.json) at --ship
  eval   scripts/eval_default.py on it, then write MODEL_CARD.md beside the weights

``--adopt-ship`` starts from the shipped model where the working folder lacks the runs it came from (a fresh
machine): its parts are copied to ``<out>/<run>/final`` as its ``runs.json`` names them. On a GPU machine with this
repository and nothing else, ``python scripts/train_default.py --adopt-ship --stages gpu2`` is stage 13 whole.

Extra ``key=value`` arguments after ``--vae-args`` / ``--dit-args`` go to the two ``vidlatent train`` runs.
Wall times of the stages are kept in ``<out>/timings.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from vidlatent.checkpoint import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SHIP = ROOT / "vidlatent" / "weights" / "default"
PIPELINE = {  # sampling defaults of the shipped model (chosen with scripts/eval_default.py)
    "sampler": "unipc",
    "steps": 20,
    "guidance": 5.0,
    "shift": 3.0,
    "frames": 17,
    "height": 64,
    "width": 64,
    "fps": 8.0,
    "negative_prompt": "",
    "seed": None,
}


def vae_from(run: str, *overrides: str) -> list[str]:
    """A ``default-vae-finetune`` run starting from ``run``'s exported VAE (``{out}`` is --out)."""
    return ["default-vae-finetune", f"vae={{out}}/{run}/final/vae", *overrides]


def dit_run(dit: str, text_from: str, latents: str, *overrides: str) -> list[str]:
    """A ``default-dit`` run of denoiser ``dit`` (a preset, or an export) with ``text_from``'s exported text
    encoder, on the latent clips cached in ``latents`` (with their captions)."""
    return ["default-dit", f"dit={dit}", f"text_encoder={{out}}/{text_from}/final/text_encoder",
            f"data={{out}}/{latents}", f"captions={{out}}/{latents}/metadata.jsonl", *overrides]  # fmt: skip


def dit_from(run: str, latents: str, *overrides: str) -> list[str]:
    """A ``default-dit`` run starting from ``run``'s exported denoiser and text encoder, on ``latents``."""
    return dit_run(f"{{out}}/{run}/final/dit", run, latents, *overrides)


# Stage 3 ("refine"): two lanes side by side, one CPU thread each (the denoiser's small kernels do not gain from a
# second thread, so this trains faster here than two threads in turn). Each lane is a list of runs, in order:
# run name -> train config and overrides ({out} is --out). The decoder alone learns, so the latents stay valid.
# The denoiser's second run trains with sigma shift 3 (more of its steps at high noise, where a clip's layout and
# motion are decided) and the pipeline samples with the same shift.
REFINE = {
    "vae": {
        "vae-refine": vae_from("vae-finetune", "steps=2000", "lr=3e-4", "warmup_steps=30", "seed=2"),
        "vae-refine2": vae_from("vae-refine", "steps=1300", "lr=2e-4", "warmup_steps=20", "seed=3"),
    },
    "dit": {
        "dit-refine": dit_from("dit", "latents", "steps=4000", "lr=3e-4", "warmup_steps=50", "seed=2"),
        "dit-refine2": dit_from(
            "dit-refine", "latents", "steps=7000", "lr=3e-4", "warmup_steps=50", "seed=3", "shift=3"
        ),
    },
}

# Stage 4 ("joint"): the encoder learns too. Through the stage-3 VAE the oracle found the right colour in only 20
# of 32 held-out clips, and a linear probe from its latents to the objects' colours missed badly: the frozen encoder
# had not learnt colour, and no decoder or denoiser can add it back. So the whole VAE trains (both threads, alone),
# the training clips are encoded again with it, and then its decoder alone and the stage-3 denoiser (adapting to
# the new latents) train side by side as in stage 3.
JOINT_VAE = vae_from("vae-refine2", "vae_train=all", "steps=2400", "lr=4e-4", "warmup_steps=30",
                     "seed=4", "checkpoint_every=100")  # fmt: skip
JOINT = {
    "vae": {
        "vae-joint-dec": vae_from("vae-joint", "steps=1700", "lr=2e-4", "warmup_steps=20", "seed=5"),
    },
    "dit": {
        "dit-joint": dit_from(
            "dit-refine2", "latents-joint", "steps=6000", "lr=3e-4", "warmup_steps=50", "seed=5", "shift=3"
        ),
    },
}
# Stage 5 ("polish"): both stage-4 lanes carried on from their exports with a fresh, lower schedule (the latents stay
# valid: only the decoder learns). When stage 4 stopped, the denoiser's loss was still falling (mean over its last
# 750 steps 0.215, against 0.237 at its middle) and motion, which the VAE keeps (98% through the VAE), was the
# furthest short of its target; the decoder had gained 0.3 dB over its last 800 steps. The first pair took held-out
# motion from 76% to 89% and the VAE from 29.8 to 30.6 dB, both still gaining, so each lane runs a second, shorter
# schedule from its first run's export.
POLISH = {
    "vae": {
        "vae-polish": vae_from("vae-joint-dec", "steps=2400", "lr=1.5e-4", "warmup_steps=20", "seed=6"),
        "vae-polish2": vae_from("vae-polish", "steps=1600", "lr=1e-4", "warmup_steps=20", "seed=7"),
    },
    "dit": {
        "dit-polish": dit_from(
            "dit-joint", "latents-joint", "steps=7500", "lr=2e-4", "warmup_steps=50", "seed=6", "shift=3"
        ),
        "dit-polish2": dit_from(
            "dit-polish", "latents-joint", "steps=5000", "lr=1.5e-4", "warmup_steps=50", "seed=7", "shift=3"
        ),
    },
}
# Stage 6 ("joint2"): stage 4 again from stage 5's exports. The decoder alone had flattened out (+0.7, then +0.27
# dB) and shape, which the oracle misreads in 20% of true clips after the VAE round trip, was capped by the VAE: so
# the whole VAE trains again (lower rate than stage 4: it starts from a trained pair), the clips are cached again,
# and its decoder and the stage-5 denoiser (adapting to the new latents) train side by side. The denoiser now also
# learns one-frame generation (text to image; the morph and animate inputs): ``image_fraction`` of its batches keep
# only each clip's first latent frame, which the causal VAE encodes exactly as it encodes that frame alone.
JOINT2_VAE = vae_from("vae-polish2", "vae_train=all", "steps=2600", "lr=2e-4", "warmup_steps=30",
                      "seed=8", "checkpoint_every=100")  # fmt: skip
JOINT2 = {
    "vae": {
        "vae-joint2-dec": vae_from("vae-joint2", "steps=1600", "lr=1.5e-4", "warmup_steps=20", "seed=9"),
    },
    "dit": {
        "dit-joint2": dit_from(
            "dit-polish2",
            "latents-joint2",
            "steps=5500",
            "lr=2e-4",
            "warmup_steps=50",
            "seed=9",
            "shift=3",
            "image_fraction=0.25",
        ),
    },
}
# Stage 7 ("polish3"): both stage-6 lanes carried on. The generated squares were blobs the oracle read as circles (0
# of 21 held-out square prompts right) although the VAE keeps true squares (13 of 16 held-out square clips), and
# an edit at strength 0.2 (only sigmas below ~0.43 re-run) already turned every square into a blob: the denoiser
# was imprecise at low sigma, where corners are drawn. Logit-normal sigmas shifted by 3 (stages 3-6) put only
# 0.7% of training draws below sigma 0.2 and 24% in 0.2-0.6; uniform sigmas put 20% and 40% there and still 15%
# above 0.85, where the motion is chosen. The decoder alone carries on for PSNR (the latents stay valid). Outcome: the
# VAE passed 32 dB and one-frame images gained, but squares stayed blobs (0 of 21; HISTORY in the model card).
POLISH3 = {
    "vae": {
        "vae-polish3": vae_from("vae-joint2-dec", "steps=3000", "lr=1.5e-4", "warmup_steps=20", "seed=10"),
    },
    "dit": {
        "dit-polish3": dit_from(
            "dit-joint2",
            "latents-joint2",
            "steps=9000",
            "lr=2e-4",
            "warmup_steps=50",
            "seed=10",
            "timestep_sampling=uniform",
            "shift=1",
            "image_fraction=0.25",
        ),
    },
}
# Stage 8 ("i2v"): the denoiser alone carries on with the clean first latent frame given in half of its clip batches
# (``first_frame_dropout``), so that animate can hand it the still as it is (``first_frame: clean``). Until then
# animate pasted the still noised to each step's sigma into a denoiser that had only ever made whole clips.
I2V = {
    "dit": {
        "dit-i2v": dit_from(
            "dit-polish3",
            "latents-joint2",
            "steps=4500",
            "lr=1.5e-4",
            "warmup_steps=50",
            "seed=11",
            "timestep_sampling=uniform",
            "shift=1",
            "image_fraction=0.25",
            "first_frame_dropout=0.5",
        ),
    },
}
# Stage 9 ("gpu"): on one GPU (an NVIDIA H200), three denoiser runs sharing it, each stopped by a wall-clock budget
# (``max_minutes``; the cosine runs to it), on --gpu-clips training clips cached with the stage-7 VAE (the same
# encoder as stage 6's). After stage 8 the generated squares were still blobs (1 of 21 held-out square prompts) with
# every sampler setting tried: the 2x2-patch denoiser sees one token per 16x16 pixels. Two runs start afresh with
# one token per latent pixel (``default``, ``default-fine-small``; the text encoder from stage 8); the third
# carries the stage-8 denoiser on with the same data and budget, to tell the architecture from the extra training.
# Then the larger patch-1 run carries on alone (``dit-fine2``; it ran on a second machine with the first 12000 of
# the clips cached afresh). The budgets are those the runs had; steps reached on the H200 are in the model card.
GPU_ARGS = ("batch_size=128", "data_in_memory=true", "mixed_precision=bf16", "timestep_sampling=uniform", "shift=1",
            "image_fraction=0.25", "first_frame_dropout=0.5", "steps=1000000", "checkpoint_every=2500",
            "log_every=50")  # fmt: skip
SHARED = "max_minutes=6.31"  # the three runs at once
GPU_CLIPS, GPU_NAME = 24000, "NVIDIA H200"
CLIPS, JOINT_CLIPS = 5000, 8000  # training clips cached for stage 2, and again in stages 4 and 6


GPU = {
    "dit": {
        "dit-fine": dit_run("default", "dit-i2v", "latents-gpu", *GPU_ARGS, SHARED, "lr=6e-4",
                            "warmup_steps=300", "seed=12"),
        "dit-fine2": dit_from("dit-fine", "latents-gpu", *GPU_ARGS, "max_minutes=2.53", "lr=3e-4",
                              "warmup_steps=100", "seed=15"),
    },
    "dit-small": {
        "dit-fine-small": dit_run("default-fine-small", "dit-i2v", "latents-gpu", *GPU_ARGS, SHARED, "lr=6e-4",
                                  "warmup_steps=300", "seed=13"),
    },
    "dit-cont": {
        "dit-gpu-cont": dit_from("dit-i2v", "latents-gpu", *GPU_ARGS, SHARED, "lr=2e-4", "warmup_steps=100",
                                 "seed=14"),
    },
}  # fmt: skip
# Stage 10 ("redraw"): the decoder alone carries on, with half of its clips first re-drawn by the stage-9 denoiser
# from their captions (``redraw_pipeline``: SDEdit at strength U(0.05, 0.4), the shipped sampler settings). After
# stage 9 the generated squares were still rounded (4 of 21 held-out square prompts) and an edit at strength 0.2 kept
# only 6 of 16 true squares: the denoiser's last, small-sigma steps leave latents that this decoder, trained only
# on the encoder's latents, draws round. Here it learns to draw the true clip from what the denoiser leaves too.
RUNS_FILE = "runs.json"  # in a shipped folder: the runs its vae and dit (with the text encoder) come from
REDRAW_PIPELINE = "pipeline-gpu"  # the stage-7 VAE with the stage-9 denoiser, assembled by the stage


def redraw_from(run: str, minutes: int, seed: int, pipeline: str = REDRAW_PIPELINE) -> list[str]:
    """A decoder run from ``run``'s export for ``minutes`` of steps (cosine to them), half of its clips re-drawn by
    the denoiser of ``{out}/<pipeline>`` at strengths U(0.05, 0.4)."""
    return vae_from(run, f"redraw_pipeline={{out}}/{pipeline}", "redraw_fraction=0.5",
                    "redraw_strength=[0.05,0.4]", "steps=100000", f"max_minutes={minutes}", "lr=1e-4",
                    "warmup_steps=20", f"seed={seed}")  # fmt: skip


REDRAW = {"vae": {"vae-redraw": redraw_from("vae-polish3", 60, seed=20)}}
# Stage 11 ("redraw2"): stage 10 carried on from its export with a fresh schedule, both CPU threads on the one lane.
# Stage 10 had taken held-out shape from 75.0 to 78.2% (already 78.2% at its step 900) and its VAE PSNR was back to
# 32.01 dB after a dip (31.80 at step 900); the same re-drawing pipeline (the denoiser is all it uses of it: the
# trained VAE takes the place of its VAE) with the same settings, for 55 minutes of steps.
REDRAW2 = {"vae": {"vae-redraw2": redraw_from("vae-redraw", 55, seed=21)}}
# Stage 12 ("carry"), on this CPU with both threads: dit-fine2 carried on for 50 minutes of steps on whole clips,
# CARRY_CLIPS training clips cached afresh (world seed 1, its first clips, by the encoder every VAE since stage 6
# shares), under bf16 autocast (about 1.3x faster than fp32 here: this AMD EPYC has avx512_bf16). Why: held-out
# shape stood at 78.2% over three sampling seeds with the decoder-side lever spent and no GPU lent; an earlier
# CPU carry-on of 42 minutes, mostly on first latent frames (image_fraction 0.75), had shown no gain.
CARRY_CLIPS = 6000
CARRY = {"dit": {"dit-cpu": dit_from("dit-fine2", "latents-carry", "batch_size=32", "data_in_memory=true",
                                     "mixed_precision=bf16", "timestep_sampling=uniform", "shift=1",
                                     "image_fraction=0.25", "first_frame_dropout=0.5", "steps=100000",
                                     "max_minutes=50", "lr=1e-4", "warmup_steps=20", "seed=25",
                                     "checkpoint_every=200", "log_every=10")}}  # fmt: skip
# Stage 13 ("gpu2"), prepared and tried on the CPU but not yet run on a GPU: the stage-12 denoiser (dit-cpu) carried
# on on a GPU for longer than stage 9's 2.5 minutes, on GPU2_CLIPS cached clips (the first 24000 are stage 9's:
# every VAE since stage 6 trains its decoder alone, so its encoder, and the latents, are stage 6's). Why: the 2.5
# minutes of dit-fine2 had added about 7 points of held-out shape (72 prompts), and 50 CPU minutes (stage 12: 55700
# clips shown, 30% of what dit-fine2's 2.5 GPU minutes showed) about 3 more on seen prompts; the generated squares
# are still what the model gets wrong most. A redraw pass of the decoder against the new denoiser (stage 14) comes
# after it.
GPU2_CLIPS = 36000
# Stage 9's runs went at 8.5-10.9 steps a second whatever their size, bound by per-step overhead: here the batch is
# 512 (4x), about 47 MiB of activations kept for backward per clip under bf16 (measured on the CPU), ~24 GiB.
GPU2 = {"dit": {"dit-fine3": dit_from("dit-cpu", "latents-gpu", *GPU_ARGS, "batch_size=512", "max_minutes=6",
                                      "lr=3e-4", "warmup_steps=100", "seed=23")}}  # fmt: skip
# Stage 14 ("redraw3"), not yet run (it needs stage 13's denoiser): the stage-11 decoder carried on as in stage 11,
# its clips re-drawn by the stage-13 denoiser, which a decoder has not seen yet.
REDRAW3 = {"vae": {"vae-redraw-fine3": redraw_from("vae-redraw2", 55, seed=24, pipeline="pipeline-gpu2")}}
# Each re-drawing stage's pipeline folder and the denoiser run it holds (only the denoiser and its text encoder are
# used; the VAE beside them is the stage-7 one, or the latest there is).
REDRAWN_BY = {"redraw": (REDRAW_PIPELINE, list(GPU["dit"])[-1]), "redraw2": (REDRAW_PIPELINE, list(GPU["dit"])[-1]),
              "redraw3": ("pipeline-gpu2", list(GPU2["dit"])[-1])}  # fmt: skip
# CPU threads of each lane where a stage's lanes do not run with one each (stages 11, 12, 14: one lane, both threads).
LANE_THREADS = {"redraw2": 2, "carry": 2, "redraw3": 2}
# Stages that retrain the whole VAE before their lanes: that run. Stage S names it vae-S, its latents latents-S.
JOINT_STAGES = {"joint": JOINT_VAE, "joint2": JOINT2_VAE}
# Later stages first: ship takes each part from the latest stage that trains it and whose lanes all finished.
STAGE_LANES = {
    "redraw3": REDRAW3,
    "gpu2": GPU2,
    "carry": CARRY,
    "redraw2": REDRAW2,
    "redraw": REDRAW,
    "gpu": GPU,
    "i2v": I2V,
    "polish3": POLISH3,
    "joint2": JOINT2,
    "polish": POLISH,
    "joint": JOINT,
    "refine": REFINE,
}


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (an interrupted run leaves the old file or none)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def timed(out: Path, stage: str, fn) -> None:
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    t0 = time.perf_counter()
    fn()
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
    write_text(timings_file, json.dumps(timings, indent=2))


def stage_cache(clips: int, vae_dir: Path, dest: Path, device: str = "cpu", workers: int = 0) -> None:
    """Encode ``clips`` training clips of the world with the VAE at ``vae_dir`` into ``dest`` (resumes)."""
    from vidlatent.data.shapes import ShapesWorld
    from vidlatent.models.vae import CausalVAE
    from vidlatent.train.data import cache_world_latents

    vae = CausalVAE.from_pretrained(vae_dir, device=device).eval()
    world = ShapesWorld(64, 64, 17, split="train", seed=1)
    batch = 16 if device == "cpu" else 128
    cache_world_latents(world, vae, clips, dest, batch_size=batch, vae_src=str(vae_dir), workers=workers)


def train_cmd(out: Path, config: str, overrides: list[str], name: str, extra: list[str]) -> list[str]:
    """``python -m vidlatent.cli train`` of one run (``{out}`` in the overrides is ``out``), resuming."""
    return [sys.executable, "-m", "vidlatent.cli", "train", config, *(o.format(out=out) for o in overrides),
            f"output={out / name}", "resume=auto", *extra]  # fmt: skip


def run_lanes(out: Path, lanes: dict, extra: list[str], threads: int = 1) -> None:
    """``lanes`` at once, ``threads`` CPU threads each, each lane's runs in order; logs go to ``<out>/<run>.log``."""
    import threading

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    failed = []

    def lane(runs: dict) -> None:
        for name, (config, *overrides) in runs.items():
            cmd = train_cmd(out, config, overrides, name, extra)
            print("+", " ".join(cmd), flush=True)
            with open(out / f"{name}.log", "a") as log:
                code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                failed.append(f"{name} (exit {code}, see {out / (name + '.log')})")
                return

    threads = [threading.Thread(target=lane, args=(runs,)) for runs in lanes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit("lanes failed: " + ", ".join(failed))


def stage_joint(out: Path, stage: str, clips: int, extra: list[str]) -> None:
    """Stages 4 and 6: the whole VAE (both threads), its latents cached afresh, then the stage's lanes."""
    config, *overrides = JOINT_STAGES[stage]
    run(train_cmd(out, config, overrides, f"vae-{stage}", extra))
    stage_cache(clips, out / f"vae-{stage}" / "final" / "vae", out / f"latents-{stage}")
    run_lanes(out, STAGE_LANES[stage], extra)


def stage_gpu(out: Path, stage: str, clips: int, extra: list[str], device: str = "cuda") -> None:
    """Stages 9 and 13: ``clips`` training clips cached on the GPU (rendered by all but two CPU cores) with the
    ``encoder_run``'s VAE, then the stage's runs at once, sharing it. (``device="cpu"`` only to try a stage out.)"""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"stage {stage} trains on a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
        )
    workers = max(1, (os.cpu_count() or 4) - 2)
    stage_cache(clips, out / encoder_run(out) / "final" / "vae", out / "latents-gpu", device, workers)
    run_lanes(out, STAGE_LANES[stage], [f"device={device}", *extra])


def stage_carry(out: Path, extra: list[str]) -> None:
    """Stage 12: ``CARRY_CLIPS`` training clips cached with the ``encoder_run``'s VAE, then the ``CARRY`` run with both CPU
    threads."""
    stage_cache(CARRY_CLIPS, out / encoder_run(out) / "final" / "vae", out / "latents-carry")
    run_lanes(out, CARRY, extra, threads=LANE_THREADS["carry"])


def shipped_runs(out: Path) -> tuple[str, str]:
    """The (VAE run, denoiser run) to ship: each from the latest stage that trains it and whose lanes all finished
    (the last run of its lane), else from stages 1b and 2."""
    picked = {}
    for lanes in STAGE_LANES.values():
        last = {lane: list(runs)[-1] for lane, runs in lanes.items()}
        if all((out / name / "final").is_dir() for name in last.values()):
            for lane, name in last.items():
                picked.setdefault(lane, name)
    return picked.get("vae", "vae-finetune"), picked.get("dit", "dit")


def encoder_run(out: Path) -> str:
    """The VAE run whose encoder later stages cache latents with: stage 7's, else (a working folder seeded by
    --adopt-ship) the latest there is. Every VAE since stage 6 trains its decoder alone, so all of them encode
    alike."""
    return "vae-polish3" if (out / "vae-polish3" / "final").is_dir() else shipped_runs(out)[0]


def stage_redraw(out: Path, stage: str, extra: list[str]) -> None:
    """Stages 10, 11 and 14: the pipeline the decoder's clips are re-drawn with (``REDRAWN_BY``; only its denoiser
    and text encoder are used), then the stage's lane with its ``LANE_THREADS``."""
    folder, dit_run = REDRAWN_BY[stage]
    assemble(out, out / folder, encoder_run(out), dit_run)
    run_lanes(out, STAGE_LANES[stage], extra, threads=LANE_THREADS.get(stage, 1))


def stage_ship(out: Path, ship: Path) -> None:
    assemble(out, ship, *shipped_runs(out))


def copy_into_place(src: Path, dest: Path) -> None:
    """Copy folder ``src`` to ``dest`` whole beside it first, then swap it in (an interrupted copy leaves the old
    folder or none, never half a one)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def assemble(out: Path, ship: Path, vae_run: str, dit_run: str) -> None:
    """A pipeline folder at ``ship`` from the exports of ``vae_run`` (vae) and ``dit_run`` (dit, text encoder)."""
    parts = (("vae", out / vae_run / "final" / "vae"), ("dit", out / dit_run / "final" / "dit"),
             ("text_encoder", out / dit_run / "final" / "text_encoder"))  # fmt: skip
    missing = [str(src) for _, src in parts if not src.is_dir()]
    if missing:
        raise SystemExit(f"{ship}: no trained model at {', '.join(missing)}; run the earlier stages first")
    print(f"assembling {ship}: {vae_run} (vae) and {dit_run} (dit, text_encoder) from {out}", flush=True)
    ship.mkdir(parents=True, exist_ok=True)
    for name, src in parts:
        copy_into_place(src, ship / name)
    # animate hands the still over as it is to a denoiser that learnt it (first_frame_dropout: stage 8)
    i2v = any(arg.startswith("first_frame_dropout=") for lanes in STAGE_LANES.values()
              for arg in lanes.get("dit", {}).get(dit_run, []))  # fmt: skip
    pipeline = {**PIPELINE, "first_frame": "clean" if i2v else "noised"}
    write_text(ship / "pipeline.json", json.dumps(pipeline, indent=2) + "\n")
    write_text(ship / RUNS_FILE, json.dumps({"vae": vae_run, "dit": dit_run}, indent=2) + "\n")
    size = sum(f.stat().st_size for f in ship.rglob("*.safetensors"))
    print(f"assembled {ship}: {size / 2**20:.1f} MiB of weights")


def adopt_ship(out: Path, ship: Path) -> None:
    """Seed a working folder from a shipped one (say on a fresh machine, the earlier runs gone): each part of
    ``ship`` is copied to ``<out>/<run>/final/<part>``, ``run`` from its ``runs.json``, where that is missing, so
    that the stages after the shipped runs can start from them."""
    if not (ship / RUNS_FILE).is_file():
        raise SystemExit(f"{ship}: no {RUNS_FILE} saying which runs its parts come from; cannot adopt it")
    runs = json.loads((ship / RUNS_FILE).read_text())
    for part, run_name in (("vae", runs["vae"]), ("dit", runs["dit"]), ("text_encoder", runs["dit"])):
        dest = out / run_name / "final" / part
        if not dest.is_dir():
            print(f"adopting {ship / part} as {dest}", flush=True)
            copy_into_place(ship / part, dest)


def lane_lines(lanes: dict) -> list[str]:
    """Markdown list items, one per run of ``lanes``, with its ``vidlatent train`` arguments."""
    return [
        f"- {lane}: `vidlatent train {' '.join(args)}`"
        for lane, runs in lanes.items()
        for args in runs.values()
    ]


def dit_preset(folder: Path) -> str:
    """The name of the dit preset whose layout the denoiser at ``folder`` has (else "custom")."""
    from vidlatent.config import DiTConfig, list_presets, load_config

    shipped = json.loads((folder / "config.json").read_text())
    for name in list_presets("dit"):
        preset = dataclasses.asdict(load_config(DiTConfig, "dit", name))
        if all(shipped.get(k) == v for k, v in preset.items() if k != "gradient_checkpointing"):
            return name
    return "custom"


def model_card(out: Path, ship: Path, results: dict) -> str:
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    vae_cfg = (ROOT / "vidlatent" / "configs" / "train" / "default-vae.yaml").read_text()
    vae_ft_cfg = (ROOT / "vidlatent" / "configs" / "train" / "default-vae-finetune.yaml").read_text()
    dit_cfg = (ROOT / "vidlatent" / "configs" / "train" / "default-dit.yaml").read_text()
    from safetensors.torch import load_file

    params = {
        n: sum(t.numel() for t in load_file(ship / n / "model.safetensors").values())
        for n in ("vae", "dit", "text_encoder")
    }
    size = sum(f.stat().st_size for f in ship.rglob("*.safetensors"))
    # clips cached by each stage, counted where the latents are still kept, else the script's defaults
    clips, joint_clips, joint2_clips, gpu_clips = (
        len(list((out / folder).glob("clip-*.safetensors"))) or default
        for folder, default in (("latents", CLIPS), ("latents-joint", JOINT_CLIPS),
                                ("latents-joint2", JOINT_CLIPS), ("latents-gpu", GPU_CLIPS))
    )  # fmt: skip
    later = {  # stages 12 to 14, listed once they have run
        "carry": f"Stage 12 (carry), on this CPU: {CARRY_CLIPS} training clips cached afresh, then the stage-9 "
                 "denoiser carried on with both threads:",
        "gpu2": f"Stage 13 (gpu2), on one GPU: {GPU2_CLIPS} training clips cached (the first {GPU_CLIPS} are stage "
                "9's), then the stage-12 denoiser carried on alone:",
        "redraw3": "Stage 14 (redraw3), stage 11 carried on with its clips re-drawn by the stage-13 denoiser "
                   "instead, with both CPU threads:",
    }  # fmt: skip
    ran = [(head, STAGE_LANES[stage]) for stage, head in later.items()
           if all((out / list(runs)[-1] / "final").is_dir() for runs in STAGE_LANES[stage].values())]  # fmt: skip
    later_lines = [line for head, lanes in ran for line in (head, "", *lane_lines(lanes), "")]
    history_file = out / "HISTORY.md"  # the runs as they actually went, written by hand
    history = (
        ["## How it actually ran", "", history_file.read_text().strip(), ""] if history_file.is_file() else []
    )
    lines = [
        "# vidlatent default model (shapes world)",
        "",
        "A small text-to-video model trained from scratch by `scripts/train_default.py` on the procedural shapes",
        "world (`vidlatent.data.shapes`): one to three flat shapes (circle, square, triangle; red, orange, yellow,",
        "green, blue, purple) moving left/right/up/down/diagonally or bouncing over desaturated backgrounds.",
        "It knows nothing else. 17 frames at 64x64 (5 latent frames of 8x8x16).",
        "",
        "| part | preset | parameters |",
        "|---|---|---|",
        f"| VAE (Wan 2.1 layout, 4x8x8, 16 channels) | vae/default | {params['vae'] / 1e6:.2f}M |",
        f"| denoiser (Wan 2.1 T2V layout) | dit/{dit_preset(ship / 'dit')} | {params['dit'] / 1e6:.2f}M |",
        f"| text encoder (built-in, word level) | text/default | {params['text_encoder'] / 1e6:.3f}M |",
        "",
        f"Weights: {size / 2**20:.1f} MiB of safetensors (fp32).",
        "",
        "## Training",
        "",
        f"Hardware: stages 1-8 and 10-12 on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no "
        f"GPU, torch {torch.__version__}; stage 9 on one {GPU_NAME} (torch 2.11).",
        "",
        "| stage | wall time |",
        "|---|---|",
        *[f"| {k}{f' ({GPU_NAME})' if k == 'gpu' else ''} | {v / 60:.1f} min |" for k, v in timings.items()],
        "",
        "Stage 1a, `vidlatent train default-vae`:",
        "```yaml",
        vae_cfg.strip(),
        "```",
        "Stage 1b, `vidlatent train default-vae-finetune`:",
        "```yaml",
        vae_ft_cfg.strip(),
        "```",
        f"Stage 2, `vidlatent train default-dit` on {clips} cached latent clips of the training split "
        "(world seed 1):",
        "```yaml",
        dit_cfg.strip(),
        "```",
        "",
        "Stage 3 (refine), the two lanes at once with one CPU thread each, each lane's runs in order (the encoder",
        "stays frozen, so the stage-2 latents stay valid):",
        "",
        *lane_lines(REFINE),
        "",
        "Stage 4 (joint): the whole VAE, encoder included, with both CPU threads, "
        f"`vidlatent train {' '.join(JOINT_VAE)}`; {joint_clips} training clips encoded with it; then, as in",
        "stage 3, two lanes at once:",
        "",
        *lane_lines(JOINT),
        "",
        "Stage 5 (polish): both stage-4 lanes carried on from their exports, twice, with fresh, lower schedules, at once:",
        "",
        *lane_lines(POLISH),
        "",
        "Stage 6 (joint2): stage 4 again from the stage-5 exports, the whole VAE with both CPU threads, "
        f"`vidlatent train {' '.join(JOINT2_VAE)}`; {joint2_clips} training clips encoded with it; then two lanes",
        "at once (the denoiser also learns one-frame generation: `image_fraction`):",
        "",
        *lane_lines(JOINT2),
        "",
        "Stage 7 (polish3): both stage-6 lanes carried on at once, the denoiser with uniform sigmas:",
        "",
        *lane_lines(POLISH3),
        "",
        "Stage 8 (i2v): the denoiser alone, learning image-to-video conditioning:",
        "",
        *lane_lines(I2V),
        "",
        f"Stage 9 (gpu), on one {GPU_NAME}: {gpu_clips} training clips cached with the stage-7 VAE, then three",
        "runs sharing the GPU, each for a wall-clock budget (`max_minutes`); the dit lane's second run alone after:",
        "",
        *lane_lines(GPU),
        "",
        "Stage 10 (redraw), the decoder alone (one CPU thread), with half of its clips re-drawn first by the stage-9",
        f"denoiser (the stage-7 VAE with it, assembled at `{{out}}/{REDRAW_PIPELINE}`):",
        "",
        *lane_lines(REDRAW),
        "",
        "Stage 11 (redraw2), stage 10 carried on the same way from its export, with both CPU threads:",
        "",
        *lane_lines(REDRAW2),
        "",
        *later_lines,
        *history,
        "## Evaluation (`scripts/eval_default.py`)",
        "",
        "The oracle reads each generated clip; a prompt counts when the largest object found has the asked",
        "colour / shape / motion. Held-out prompts use (colour, shape, motion) combinations no training clip has.",
        "",
        "| prompts | n | colour | shape | motion | all three | nothing found |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, label in (("heldout", "held-out combinations"), ("train", "combinations seen in training"),
                         ("image", "held-out prompts as one frame (text to image; all = colour and shape)"),
                         ("animate", "first frames of held-out clips animated with their captions (image to video)")):  # fmt: skip
        if split in results:
            r = results[split]
            motion = f"{r['motion']:.1%}" if "motion" in r else "-"
            n = f"{r['prompts']} x {len(r['seeds'])} seeds" if "seeds" in r else r["prompts"]
            lines.append(f"| {label} | {n} | {r['colour']:.1%} | {r['shape']:.1%} | {motion} "
                         f"| {r['all']:.1%} | {r['nothing']:.1%} |")  # fmt: skip
    edits = {
        "edit-shape": "held-out clips edited to the next shape",
        "edit-colour": "held-out clips recoloured",
    }
    for key, r in results.items():  # edit splits, maybe several runs ("edit-colour", "edit-colour-0.7", ...)
        if key.startswith("edit-") and isinstance(r, dict):
            what = next(label for split, label in edits.items() if key.startswith(split))
            flow = r.get("flow_edit")
            how = "SDEdit" if flow is None else f"FlowEdit with source guidance {flow['source_guidance']}"
            lines.append(f"| {what}, strength {r['strength']}, {how}, guidance {r['guidance']} | {r['prompts']} "
                         f"| {r['colour']:.1%} | {r['shape']:.1%} | {r['motion']:.1%} | {r['all']:.1%} "
                         f"| {r['nothing']:.1%} |")  # fmt: skip
    seeded = [(split, r) for split, r in results.items() if isinstance(r, dict) and "per_seed" in r]
    if seeded:
        lines += ["", "Rows with several seeds pool the same prompts sampled with each seed; each seed alone "
                      "(colour / shape / motion):"]  # fmt: skip
    for split, r in seeded:
        each = "; ".join(f"seed {o['seed']} " + " / ".join(f"{o[k]:.1%}" for k in ("colour", "shape", "motion")
                                                           if k in o) for o in r["per_seed"])  # fmt: skip
        lines.append(f"- {split}: {each}")
    if "animate" in results:
        a = results["animate"]
        lines += ["", f"Image to video: the first output frame against the still, {a['first_psnr']:.2f} dB PSNR "
                      f"(animate with first_frame={results.get('job', {}).get('first_frame')})."]  # fmt: skip
    if "vae" in results:
        v = results["vae"]
        lines += ["", f"VAE on {v['clips']} held-out clips (17x64x64): PSNR {v['psnr_mean']:.2f} dB mean, "
                      f"{v['psnr_min']:.2f} dB worst. The oracle reads the clip's object right through the VAE "
                      f"(reconstruction of the true clip): colour {v['oracle_colour']:.1%}, shape "
                      f"{v['oracle_shape']:.1%}, motion {v['oracle_motion']:.1%}."]  # fmt: skip
    if "cli" in results:
        c = results["cli"]
        lines += ["", f"`vidlatent generate \"a red circle moving right\" -o out.mp4` in a fresh process: "
                      f"{c['best_s']:.1f}-{c['worst_s']:.1f} s over {c['runs']} runs (2 CPU threads)."]  # fmt: skip
    job = results.get("job", {})
    lines += ["", f"Sampling: {job.get('sampler')} sampler, {job.get('steps')} steps, guidance {job.get('guidance')}, "
                  f"shift {job.get('shift')}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/default", help="working folder (checkpoints, latents, logs)")
    ap.add_argument("--ship", default=str(SHIP), help="where the pipeline folder goes")
    stages = ["vae", "cache", "dit", *reversed(STAGE_LANES), "ship", "eval"]
    ap.add_argument("--stages", nargs="+", default=stages, choices=stages)
    ap.add_argument("--clips", type=int, default=CLIPS, help="training clips cached for the denoiser")
    ap.add_argument(
        "--joint-clips", type=int, default=JOINT_CLIPS, help="training clips cached again in stage 4"
    )
    ap.add_argument(
        "--gpu-clips", type=int, default=GPU_CLIPS, help="training clips cached for stage 9 (gpu)"
    )
    ap.add_argument(
        "--gpu2-clips", type=int, default=GPU2_CLIPS, help="training clips cached for stage 13 (gpu2)"
    )
    ap.add_argument(
        "--device", default="cuda", help="where stages gpu and gpu2 run (cpu only to try them out)"
    )
    ap.add_argument("--adopt-ship", action="store_true", help="start from the shipped model: copy the --ship "
                    "folder's parts to the runs its runs.json names, where the working folder lacks them")  # fmt: skip
    ap.add_argument("--vae-args", nargs="*", default=[])
    ap.add_argument("--dit-args", nargs="*", default=[])
    ap.add_argument(
        "--refine-args",
        nargs="*",
        default=[],
        help="key=value for every run of stages refine to redraw2",
    )
    ap.add_argument("--eval-args", nargs="*", default=[])
    args = ap.parse_args()
    out, ship = Path(args.out), Path(args.ship)
    out.mkdir(parents=True, exist_ok=True)
    if args.adopt_ship:
        adopt_ship(out, ship)
    if "vae" in args.stages:
        timed(out, "vae", lambda: run(train_cmd(out, "default-vae", [], "vae", args.vae_args)))
        cmd = train_cmd(
            out, "default-vae-finetune", ["vae={out}/vae/final/vae"], "vae-finetune", args.vae_args
        )
        timed(out, "vae-finetune", lambda: run(cmd))
    if "cache" in args.stages:
        vae_dir = out / "vae" / "final" / "vae"  # stage 1b trains only the decoder: these latents stay valid
        timed(out, "cache", lambda: stage_cache(args.clips, vae_dir, out / "latents"))
    if "dit" in args.stages:
        cmd = train_cmd(out, "default-dit", ["data={out}/latents", "captions={out}/latents/metadata.jsonl"], "dit",
                        args.dit_args)  # fmt: skip
        timed(out, "dit", lambda: run(cmd))
    # stages 3-11 in order; a stage in JOINT_STAGES trains its whole VAE and caches latents before its lanes
    for stage in reversed(STAGE_LANES):
        if stage in args.stages and stage in JOINT_STAGES:
            timed(out, stage, partial(stage_joint, out, stage, args.joint_clips, args.refine_args))
        elif stage in args.stages and stage in ("gpu", "gpu2"):
            clips = args.gpu_clips if stage == "gpu" else args.gpu2_clips
            timed(out, stage, partial(stage_gpu, out, stage, clips, args.refine_args, args.device))
        elif stage in args.stages and stage == "carry":
            timed(out, stage, partial(stage_carry, out, args.refine_args))
        elif stage in args.stages and stage in REDRAWN_BY:
            timed(out, stage, partial(stage_redraw, out, stage, args.refine_args))
        elif stage in args.stages:
            timed(out, stage, partial(run_lanes, out, STAGE_LANES[stage], args.refine_args))
    if "ship" in args.stages:
        stage_ship(out, ship)
    if "eval" in args.stages:
        results_file = out / "eval.json"
        cmd = [sys.executable, str(ROOT / "scripts" / "eval_default.py"), "--model", str(ship),
               "--json", str(results_file), *args.eval_args]  # fmt: skip
        run(cmd)
        card = model_card(out, ship, json.loads(results_file.read_text()))
        write_text(ship / "MODEL_CARD.md", card)
        print(card)


if __name__ == "__main__":
    main()
