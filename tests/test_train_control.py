"""``task: control``: a control branch learns beside a frozen pipeline (the tiny one here) on shapes-world
clips with their silhouettes, or on a folder of videos with a ``controls/`` folder beside them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from media import pattern
from safetensors.torch import load_file

from vidlatent import VideoPipeline
from vidlatent.data.io import write_video
from vidlatent.models.control import ControlBranch
from vidlatent.pipelines.control import control_latents
from vidlatent.train import Trainer, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["progress=false", "device=cpu", "sample_every=0"]


def config(output, *overrides):
    return load_train_config("control-tiny", overrides=[f"output={output}", *FAST, *overrides])


def test_only_the_branch_trains_and_final_is_a_pipeline_with_its_control(tmp_path):
    trainer = Trainer(config(tmp_path, "steps=2", "checkpoint_every=2"))
    assert set(trainer.params) == {f"control.{k}" for k, _ in trainer.branch.named_parameters()}
    frozen = {
        name: {k: v.clone() for k, v in getattr(trainer.task.pipe, name).state_dict().items()}
        for name in ("dit", "text_encoder", "vae")
    }
    fresh = ControlBranch(trainer.branch.config)
    fresh.load_state_dict(trainer.branch.state_dict())
    losses = trainer.train()
    assert len(losses) == 2
    for name, state in frozen.items():  # the frozen pipeline: bitwise as loaded
        now = getattr(trainer.task.pipe, name).state_dict()
        assert all(torch.equal(now[k], v) for k, v in state.items()), name
    changed = [k for k, v in trainer.branch.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert any("proj_out" in k for k in changed)  # the zero hint projections have moved
    ckpt = load_file(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(k.startswith("control.") for k in ckpt)
    final = tmp_path / "final"
    assert {"dit", "vae", "text_encoder", "control"} <= {p.name for p in final.iterdir()}
    meta = json.loads((final / "control" / "config.json").read_text())
    assert meta["_vidlatent_kind"] == "control" and meta["layers"] == [0]
    pipe = VideoPipeline.from_pretrained(final)  # the frozen pipeline, as it was, with the trained branch
    assert torch.equal(pipe.dit.blocks[0].mlp.fc1.weight, trainer.dit.blocks[0].mlp.fc1.weight)
    ema = trainer.ema.weights["control.blocks.0.proj_out.weight"]
    assert torch.equal(pipe.control_branch.blocks[0].proj_out.weight, ema)  # the export holds the EMA weights


def test_control_latents_of_a_batch_equal_control_latents(tmp_path):
    task = Trainer(config(tmp_path)).task
    reads = [task.world.read(i) for i in range(3)]
    z, control = task._encode([r[0] for r in reads], [r[1] for r in reads])
    assert torch.equal(control, control_latents(task.vae, torch.stack([r[1] for r in reads])))
    assert z.shape[1] == task.vae.config.latent_channels and control.shape[2:] == z.shape[2:]


@pytest.mark.slow  # 20 steps: measured 30 s on 2 busy CPU cores
def test_loss_falls_when_overfitting_and_copy_init_starts_as_the_denoiser(tmp_path):
    over = ["data_options={height: 32, width: 32, frames: 5, length: 2}", "caption_dropout=0", "lr=3e-3"]
    trainer = Trainer(config(tmp_path, *over, "steps=20", "control_init=copy", "checkpoint_every=100"))
    block = trainer.branch.blocks[0]
    assert torch.equal(block.block.mlp.fc1.weight, trainer.dit.blocks[0].mlp.fc1.weight)
    assert not block.proj_out.weight.any()
    before = trainer.evaluate()
    losses = trainer.train()
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert trainer.evaluate() < before
    assert len(trainer.task.encoded) == 2  # a world of 2 clips is encoded once


RESUME = ["steps=3", "caption_dropout=0.5", "ema_decay=0.9", "checkpoint_every=1"]


@pytest.mark.slow  # three runs' set-up and 6 steps: measured 19-33 s on 2 busy CPU cores
def test_resume_continues_exactly(tmp_path):
    expected = Trainer(config(tmp_path / "whole", *RESUME)).train()
    head = Trainer(config(tmp_path / "split", *RESUME)).train(until=1)
    second = Trainer(config(tmp_path / "split", *RESUME, "resume=auto"))
    tail = second.train()
    assert second.step == 3 and head + tail == expected  # bitwise on the CPU
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "whole" / "checkpoints" / "step-0000003" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step-0000003" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two torchrun processes: ~30 s on 2 busy CPU cores
def test_ddp_two_ranks_match_one_process(tmp_path):
    run = ["steps=2", "caption_dropout=0.5", "ema_decay=0.9", "checkpoint_every=2", *FAST]
    expected = Trainer(config(tmp_path / "one", *run, "batch_size=2")).train()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vidlatent.cli", "train", "control-tiny", f"output={tmp_path / 'ddp'}", "batch_size=1", *run]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    got = [json.loads(r)["loss"] for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step-0000002" / name)
        b = load_file(tmp_path / "ddp" / "checkpoints" / "step-0000002" / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "ddp" / "final" / "control" / "model.safetensors").is_file()


def test_a_video_folder_with_controls_trains_and_clips_without_one_are_skipped(tmp_path, caplog):
    clips = tmp_path / "clips"
    (clips / "controls").mkdir(parents=True)
    for i in range(3):
        write_video(clips / f"c{i}.mp4", pattern(7, phase=float(i)), fps=8)
        (clips / f"c{i}.txt").write_text(f"clip {i}\n")
        if i < 2:  # c2 has no control
            write_video(clips / "controls" / f"c{i}.mp4", pattern(7, phase=float(i)).sign(), fps=8)
    folder = ["task=control", "pipeline=tiny", f"data={clips}", "data_options={frames: 5, size: [32, 32]}"]
    folder += ["batch_size=2", "lr=1e-3", "ema_decay=0.9", *FAST]

    def config(output, *overrides):  # the folder's own data_options, not the preset's world
        return load_train_config(overrides=[f"output={output}", *folder, *overrides])

    with caplog.at_level("WARNING"):
        trainer = Trainer(config(tmp_path / "run", "steps=2", "checkpoint_every=2"))
    data = trainer.task.folder
    assert sorted(p.name for p in (it.path for it in data.clips.items)) == ["c0.mp4", "c1.mp4"]
    assert [Path(p).name for p, _ in data.skipped] == ["c2.mp4"] and "c2.mp4" in caplog.text
    assert [it.path.parent.name for it in data.controls.items] == ["controls", "controls"]
    losses = trainer.train()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    head = Trainer(config(tmp_path / "split", "steps=2", "checkpoint_every=1")).train(until=1)
    tail = Trainer(config(tmp_path / "split", "steps=2", "checkpoint_every=1", "resume=auto")).train()
    assert head + tail == losses
    for c in ("c0", "c1"):
        (clips / "controls" / f"{c}.mp4").unlink()
    with pytest.raises(ValueError, match="no clip in .* has a control video in its controls/ folder"):
        Trainer(config(tmp_path / "none"))


def test_bad_settings_name_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="unknown control transform 'depth'; accepted: silhouette, edges"):
        config(tmp_path, "control_transform=depth")
    with pytest.raises(
        ValueError,
        match="unknown control_init .ones.; accepted: zero, copy or the folder of a trained branch",
    ):
        config(tmp_path, "control_init=ones")
    with pytest.raises(ValueError, match="set pipeline=<folder>"):
        load_train_config(overrides=["task=control", "data=shapes"])
    with pytest.raises(ValueError, match="lora_rank: not for task=control"):
        config(tmp_path, "lora_rank=4")
    with pytest.raises(ValueError, match="this denoiser has 2 blocks"):
        Trainer(config(tmp_path, "control_layers=[0, 5]"))


def test_control_init_from_a_folder_carries_a_trained_branch_on(tmp_path):
    """``control_init: FOLDER`` starts from that branch (a pipeline folder's control/ here) bitwise, and a branch
    whose hints sit elsewhere is refused with what differs."""
    Trainer(config(tmp_path / "a", "steps=2", "checkpoint_every=2")).train()
    trained = ControlBranch.from_pretrained(tmp_path / "a" / "final" / "control")
    carried = Trainer(config(tmp_path / "b", "steps=2", f"control_init={tmp_path / 'a' / 'final'}"))
    start = carried.branch.state_dict()
    assert all(torch.equal(start[k], v) for k, v in trained.state_dict().items())
    assert any(v.abs().max() > 0 for k, v in start.items() if "proj_out" in k)  # not the zero init
    with pytest.raises(
        ValueError, match=r"does not fit this denoiser and control_layers: layers: \[0\] \(want \[1\]\)"
    ):
        Trainer(config(tmp_path / "c", "control_layers=[1]", f"control_init={tmp_path / 'a' / 'final'}"))
