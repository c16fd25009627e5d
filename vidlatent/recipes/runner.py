"""Running a recipe's stages: ``vidlatent train`` processes, latent caches of the world, pipeline folders.

``run_stage`` does one stage in the order its parts run (``recipe.py``): the re-drawing pipeline, the runs one
after another, the cache, then the lanes at once. Every run resumes (``resume=auto``), every cache keeps the
clips already written, so a stage interrupted anywhere is rerun whole and a finished one costs next to nothing.
Wall times add up in ``<out>/timings.json``: a stage of runs alone under each run's name, any other stage under
its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..pipelines.assemble import assemble_pipeline, copy_into_place, write_json
from ..pipelines.finetuned import BASE_FILE, fuse_base
from .recipe import ENCODER, Recipe, Run, Stage

# in a shipped folder: the runs its vae, dit (with the text encoder) and control branch come from
RUNS_FILE = "runs.json"
TIMINGS_FILE = "timings.json"


def train_command(run: Run, extra: list[str] = ()) -> list[str]:
    """``python -m vidlatent.cli train`` of ``run``, resuming, with ``extra`` ``key=value`` overrides last."""
    return [sys.executable, "-m", "vidlatent.cli", "train", run.preset, *run.overrides(), *extra]


def run_command(cmd: list[str], env: dict | None = None) -> None:
    """Run ``cmd`` with its output on this terminal; a failure raises ``CalledProcessError``."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def timed(out: Path, key: str, fn) -> None:
    """Call ``fn`` and add its wall time under ``key`` in ``<out>/timings.json`` (read after ``fn``, so stages run
    side by side in two processes keep each other's times)."""
    timings_file = out / TIMINGS_FILE
    t0 = time.perf_counter()
    fn()
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    write_json(timings_file, timings)


def run_lanes(out: Path, lanes: dict[str, tuple[Run, ...]], extra: list[str] = (), threads: int = 1) -> None:
    """``lanes`` at once, ``threads`` CPU threads each, each lane's runs in order; logs go to ``<out>/<run>.log``.
    A lane stops at its first failing run; the others finish theirs, then ``RuntimeError`` names the failures."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    failed = []

    def lane(runs: tuple[Run, ...]) -> None:
        for run in runs:
            cmd = train_command(run, extra)
            print("+", " ".join(cmd), flush=True)
            with open(out / f"{run.name}.log", "a") as log:
                code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                failed.append(f"{run.name} (exit {code}, see {out / (run.name + '.log')})")
                return

    workers = [threading.Thread(target=lane, args=(runs,)) for runs in lanes.values()]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if failed:
        raise RuntimeError("lanes failed: " + ", ".join(failed))


def cache_latents(
    recipe: Recipe, stage: Stage, clips: int | None = None, device: str = "cpu", workers: int = 0
) -> None:
    """The stage's cache: ``clips`` (default: the stage's) training clips of the recipe's world encoded by its
    VAE run into its folder on ``device``, resuming; ``workers`` processes render the clips."""
    from ..data.shapes import ShapesWorld
    from ..models.vae import CausalVAE
    from ..train.data import cache_world_latents

    cache = stage.cache
    vae_run = encoder_run(recipe) if cache.vae == ENCODER else cache.vae
    vae_dir = recipe.out / vae_run / "final" / "vae"
    vae = CausalVAE.from_pretrained(vae_dir, device=device, overrides=list(cache.vae_overrides)).eval()
    world = ShapesWorld(**{**recipe.world, **cache.world})
    batch = 16 if device == "cpu" else 128
    count = cache.clips if clips is None else clips
    dest = recipe.out / cache.into
    cache_world_latents(world, vae, count, dest, batch_size=batch, vae_src=str(vae_dir), workers=workers)


def shipped_runs(recipe: Recipe, prefer: Sequence[str] = ()) -> dict[str, str]:
    """The runs to ship, by part: ``vae`` and ``dit`` (with its text encoder) each from the latest stage with a
    lane of its name whose lanes all finished (the last run of that lane), else the recipe's fallback runs;
    ``control`` likewise when a stage with a control lane has finished (the shipped model has none otherwise).
    Stages marked ``ship: false`` are passed over. ``prefer``: stages whose lanes are taken first, in that order,
    ``ship: false`` or not (to assemble a candidate and score it); each must have finished (FileNotFoundError
    naming the exports that are missing). A denoiser from a stage with ``experts`` brings its low-noise expert:
    ``assemble`` adds it."""
    picked = {}
    for name in prefer:
        if name not in recipe.stages:
            raise ValueError(f"no stage {name!r} in the recipe; its stages: {', '.join(recipe.stages)}")
        last, unfinished = _lane_ends(recipe, recipe.stages[name])
        if not last or unfinished:
            raise FileNotFoundError(
                f"stage {name} has no finished lanes to take: {', '.join(unfinished) or 'it has no lanes'}; run it first"
            )
        for lane, run in last.items():
            picked.setdefault(lane, run)
    for stage in reversed(recipe.stages.values()):
        last, unfinished = _lane_ends(recipe, stage)
        if stage.ship and last and not unfinished:
            for lane, name in last.items():
                picked.setdefault(lane, name)
    runs = {part: picked.get(part, recipe.ship_fallback[part]) for part in ("vae", "dit")}
    if "control" in picked:
        runs["control"] = picked["control"]
    return runs


def _lane_ends(recipe: Recipe, stage: Stage) -> tuple[dict[str, str], list[str]]:
    """A stage's last run of each lane ({lane: run}) and the exports of those that have not finished."""
    last = {lane: runs[-1].name for lane, runs in stage.lanes.items()}
    final = [recipe.out / run / "final" for run in last.values()]
    return last, [str(path) for path in final if not path.is_dir()]


def encoder_run(recipe: Recipe) -> str:
    """The VAE run later caches encode with: the recipe's ``encoder``, else (a working folder seeded by
    ``adopt_ship``) the latest VAE there is."""
    return recipe.encoder if (recipe.out / recipe.encoder / "final").is_dir() else shipped_runs(recipe)["vae"]


def pipeline_settings(recipe: Recipe, dit_run: str) -> dict:
    """The ``pipeline.json`` of a folder holding ``dit_run``'s denoiser: the recipe's sampling defaults, and
    ``first_frame: clean`` when that denoiser learnt image-to-video conditioning (``first_frame_dropout < 1``)
    so animate hands it the still as it is, else ``noised``; a high-noise expert's (its stage has ``experts``)
    also its ``boundary``."""
    run = recipe.run(dit_run)
    i2v = run is not None and float(run.train.get("first_frame_dropout", 1.0)) < 1
    settings = {**recipe.pipeline, "first_frame": "clean" if i2v else "noised"}
    experts = low_expert(recipe, dit_run)
    return settings if experts is None else {**settings, "boundary": experts["boundary"]}


def low_expert(recipe: Recipe, dit_run: str) -> dict | None:
    """The ``experts`` section ({low, boundary}) of the stage that trains ``dit_run`` as a high-noise expert, when it
    is one (a run of that stage's dit lane); else None."""
    return next(
        (
            s.experts
            for s in recipe.stages.values()
            if s.experts and any(r.name == dit_run for r in s.lanes.get("dit", ()))
        ),
        None,
    )


def assemble(
    recipe: Recipe, folder: Path, vae_run: str, dit_run: str, control_run: str | None = None
) -> Path:
    """A pipeline folder at ``folder`` from the exports of ``vae_run`` (vae) and ``dit_run`` (dit and text encoder),
    and of ``control_run`` (its control branch, ``control/``) when given, with its ``pipeline.json`` and a
    ``runs.json`` naming the runs. A high-noise expert ``dit_run`` (``low_expert``) brings its low-noise expert's
    denoiser as ``dit_2/`` and the boundary into ``pipeline.json``. A LoRA run's export (``base.json`` naming
    the base denoiser, and the adapter) goes in as that base with the adapter fused in (``fuse_base``)."""
    final = recipe.out / dit_run / "final"
    # with a base.json, a dit/ beside it is the base (a LoRA run from a preset writes it), not the result
    if not (final / BASE_FILE).is_file():
        return _assemble(recipe, folder, vae_run, dit_run, final / "dit", control_run)
    with tempfile.TemporaryDirectory(dir=recipe.out, prefix=".fused-") as tmp:
        print(f"fusing {dit_run}'s LoRA into its base denoiser", flush=True)
        dit = fuse_base(final, Path(tmp) / "dit")
        return _assemble(recipe, folder, vae_run, dit_run, dit, control_run)


def _assemble(
    recipe: Recipe, folder: Path, vae_run: str, dit_run: str, dit: Path, control_run: str | None
) -> Path:
    out = recipe.out
    parts = {"vae": out / vae_run / "final" / "vae", "dit": dit,
             "text_encoder": out / dit_run / "final" / "text_encoder"}  # fmt: skip
    runs = {"vae": vae_run, "dit": dit_run}
    experts = low_expert(recipe, dit_run)
    if experts is not None:
        parts["dit_2"], runs["dit_2"] = out / experts["low"] / "final" / "dit", experts["low"]
    if control_run is not None:
        parts["control"], runs["control"] = out / control_run / "final" / "control", control_run
    missing = [str(src) for src in parts.values() if not src.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no trained model at {', '.join(missing)}; run the earlier stages first"
        )
    named = ", ".join(f"{run} ({part})" for part, run in runs.items())
    print(f"assembling {folder}: {named} from {out}", flush=True)
    assemble_pipeline(folder, parts, pipeline_settings(recipe, dit_run), {RUNS_FILE: runs})
    size = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    print(f"assembled {folder}: {size / 2**20:.1f} MiB of weights")
    return Path(folder)


def ship(recipe: Recipe, folder: Path, prefer: Sequence[str] = ()) -> Path:
    """The shipped pipeline folder at ``folder``, from the runs ``shipped_runs`` picks (``prefer``: its stages
    taken first)."""
    runs = shipped_runs(recipe, prefer)
    return assemble(recipe, folder, runs["vae"], runs["dit"], runs.get("control"))


def adopt_ship(recipe: Recipe, folder: Path) -> None:
    """Seed the working folder from a shipped one (say on a fresh machine, the earlier runs gone): each part of
    ``folder`` is copied to ``<out>/<run>/final/<part>``, ``run`` from its ``runs.json``, where that is missing, so
    that the stages after the shipped runs can start from them. A two-expert folder's ``dit_2/`` goes to its run's
    ``dit``, with the folder's text encoder (both experts read one context)."""
    if not (folder / RUNS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: no {RUNS_FILE} saying which runs its parts come from; cannot adopt it"
        )
    runs = json.loads((folder / RUNS_FILE).read_text())
    parts = [
        ("vae", runs["vae"], "vae"),
        ("dit", runs["dit"], "dit"),
        ("text_encoder", runs["dit"], "text_encoder"),
    ]
    # a two-expert folder: its low-noise expert is that run's denoiser, reading the same text
    if "dit_2" in runs:
        parts += [("dit_2", runs["dit_2"], "dit"), ("text_encoder", runs["dit_2"], "text_encoder")]
    if "control" in runs:
        parts.append(("control", runs["control"], "control"))
    for part, run_name, as_part in parts:
        dest = recipe.out / run_name / "final" / as_part
        if not dest.is_dir():
            print(f"adopting {folder / part} as {dest}", flush=True)
            copy_into_place(folder / part, dest)


def missing_inputs(recipe: Recipe, name: str) -> list[str]:
    """What stage ``name`` starts from in the working folder and is neither there nor made by the stage itself:
    the model folders its runs start from (their ``dit``, ``text_encoder`` and ``vae``), the latent caches they
    train on (``data``; the stage's own cache passes), the export its re-drawing pipeline takes (``redraw_pipeline``'s
    ``dit`` run) and, with ``experts``, the low-noise expert's."""
    stage, out = recipe.stages[name], recipe.out
    runs = stage.all_runs()
    made = [Path(run.output) for run in runs] + ([out / stage.cache.into] if stage.cache else [])
    wanted = [
        src
        for run in runs
        for key in ("dit", "text_encoder", "vae", "data")
        if isinstance(src := run.train.get(key), str)
    ]
    if stage.redraw_pipeline:
        wanted.append(str(out / stage.redraw_pipeline["dit"] / "final"))
    if stage.experts:
        wanted.append(str(out / stage.experts["low"] / "final" / "dit"))
    missing = []
    for src in wanted:
        if not Path(src).is_relative_to(out) or Path(src).exists():
            continue
        if not any(Path(src).is_relative_to(folder) for folder in made) and src not in missing:
            missing.append(src)
    return missing


def run_stage(
    recipe: Recipe, name: str, extra: list[str] = (), clips: int | None = None, device: str | None = None
) -> None:
    """Stage ``name`` of ``recipe``, timed: its re-drawing pipeline, runs, cache and lanes, in that order.
    ``extra``: ``key=value`` overrides of every run; ``clips``: the cache's size (default: the stage's);
    ``device``: where a stage with a ``device`` trains and caches (default: the stage's own)."""
    stage, out = recipe.stages[name], recipe.out
    device = (device or stage.device) if stage.device else None
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"stage {name} trains on a CUDA GPU; none is visible (torch.cuda.is_available() is False)"
        )
    extra = [*([f"device={device}"] if device else []), *extra]
    missing = missing_inputs(recipe, name)
    if missing:  # before the stage caches clips for minutes, not after
        raise FileNotFoundError(
            f"stage {name} starts from models that are not there: {', '.join(missing)}; run the stages that "
            "train them first (or --adopt-ship for the shipped model's)"
        )

    if stage.runs and not (stage.cache or stage.lanes or stage.redraw_pipeline):
        for run in stage.runs:  # a stage of runs alone: each timed under its own name
            timed(out, run.name, lambda run=run: run_command(train_command(run, extra)))
        return

    def whole() -> None:
        if stage.redraw_pipeline:
            folder, dit_run = stage.redraw_pipeline["folder"], stage.redraw_pipeline["dit"]
            assemble(recipe, out / folder, encoder_run(recipe), dit_run)
        for run in stage.runs:
            run_command(train_command(run, extra))
        if stage.cache:
            # on a GPU the clips are rendered by all but two CPU cores (it encodes faster than one core draws)
            workers = max(1, (os.cpu_count() or 4) - 2) if device else 0
            cache_latents(recipe, stage, clips, device or "cpu", workers)
        if stage.lanes:
            run_lanes(out, stage.lanes, extra, stage.threads)

    timed(out, name, whole)
