"""A training recipe as data: stages of ``vidlatent train`` runs and latent caches, read from yaml.

A recipe is a folder (the shipped ones: ``vidlatent/configs/recipes/<name>/``). Its ``recipe.yaml`` names the
stages in order and holds what is no training run: the world clips are cached from (``world``), the VAE run
that later caches encode with (``encoder``), and the shipped folder (``ship``: its ``pipeline.json``, and the
runs it takes before any stage with lanes has finished). Each stage is ``<stage>.yaml`` beside it, with any of:

  redraw_pipeline  a pipeline folder ``<out>/<folder>`` assembled first: the denoiser and text encoder of run
                   ``dit`` with the encoder run's VAE (a decoder run re-draws its clips with it)
  runs             training runs one after another, with every CPU thread, output to the terminal
  cache            then ``clips`` training clips of the world encoded by run ``vae``'s VAE into ``<out>/<into>``
                   (``vae: encoder``: the recipe's encoder run; ``world``: arguments over the recipe's world;
                   ``vae_overrides``: ``key=value`` fields over that VAE's config)
  lanes            then lanes at once, ``threads`` CPU threads each, each lane's runs in order
  device           where the stage's runs train and its cache encodes (unset: the trainer's choice, CPU cache)
  ship             false: the stage's lanes are never shipped (measured and not good enough; later stages may
                   still start from its runs)
  experts          {low: RUN, boundary: B}: the stage's dit lane trains a high-noise expert (Wan 2.2's split); a
                   folder shipping it holds run RUN's denoiser as the low-noise one (dit_2/) and hands over at
                   ``boundary`` B (pipeline.json), both reading the dit lane's text encoder

A run is a train preset (``vidlatent/configs/train/``) and ``train``, ``TrainConfig`` fields over it. ``${out}``
is the working folder and ``${out}/<run>/final`` an earlier run's export: that is how a stage takes from the ones
before. Every run writes to ``<out>/<run>`` and resumes where an interrupted one stopped (``resume=auto``).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from ..config import PRESET_DIR, load_yaml
from ..train.trainer import TrainConfig, load_train_config

RECIPE_DIR = PRESET_DIR / "recipes"
INDEX = "recipe.yaml"
STAGE_KEYS = ("redraw_pipeline", "runs", "cache", "lanes", "threads", "device", "ship", "experts")
ENCODER = "encoder"  # a cache's ``vae`` naming the recipe's encoder run


@dataclass(frozen=True)
class Run:
    """One ``vidlatent train`` run: a train preset, ``TrainConfig`` fields over it, and where it writes."""

    name: str
    preset: str
    train: dict = field(default_factory=dict)
    output: str = ""

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides of the preset that ``vidlatent train`` takes for this run, resuming."""
        return [
            *(f"{k}={dotlist_value(v)}" for k, v in self.train.items()),
            f"output={self.output}",
            "resume=auto",
        ]

    def command(self) -> str:
        """``vidlatent train PRESET key=value ...`` as a person reads it and a shell takes it (without output and
        resume; an override the shell would change, a mapping's, in quotes)."""
        args = (shlex.quote(a) for a in self.overrides()[:-2])
        return " ".join(["vidlatent train", self.preset, *args])

    def config(self, *extra: str) -> TrainConfig:
        """The run's ``TrainConfig`` (``extra``: further ``key=value`` overrides, as the runner passes them)."""
        return load_train_config(self.preset, overrides=[*self.overrides(), *extra])


@dataclass(frozen=True)
class Cache:
    """``clips`` training clips of the world encoded by run ``vae``'s VAE into the latent folder ``into``;
    ``world``: ShapesWorld arguments over the recipe's (e.g. ``{wide: true}``); ``vae_overrides``: ``key=value``
    VAE config fields over that run's (e.g. ``[first_frame=still]``: the same weights coding frame 0 otherwise)."""

    clips: int
    vae: str
    into: str
    world: dict = field(default_factory=dict)
    vae_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe (see the module's docstring for what each part does, and in which order)."""

    name: str
    redraw_pipeline: dict | None = None  # folder, dit
    runs: tuple[Run, ...] = ()
    cache: Cache | None = None
    lanes: dict[str, tuple[Run, ...]] = field(default_factory=dict)
    threads: int = 1
    device: str | None = None
    ship: bool = True  # whether its lanes' runs may ship
    # low (the low-noise expert's run) and boundary: the dit lane is the high-noise expert
    experts: dict | None = None

    def all_runs(self) -> list[Run]:
        """Every run of the stage: ``runs``, then each lane's."""
        return [*self.runs, *(run for lane in self.lanes.values() for run in lane)]


@dataclass(frozen=True)
class Recipe:
    """A whole recipe, its ``${out}`` resolved to one working folder."""

    folder: Path
    out: Path
    stages: dict[str, Stage]
    world: dict  # ShapesWorld arguments (height, width, frames, split, seed) of the clips caches encode
    encoder: str  # the VAE run later caches encode with (every VAE after it trains its decoder alone)
    pipeline: dict  # the shipped folder's pipeline.json, but first_frame (from its denoiser's training)
    ship_fallback: dict  # part -> run shipped while no stage with a lane of that part has finished
    notes: dict = field(default_factory=dict)  # facts the model card states (hardware of GPU stages)

    def run(self, name: str) -> Run | None:
        """The run called ``name``, if the recipe has one."""
        return next((r for stage in self.stages.values() for r in stage.all_runs() if r.name == name), None)

    def train_configs(self) -> dict[str, TrainConfig]:
        """Every run's ``TrainConfig`` by run name (a stage's ``device`` included, as the runner passes it)."""
        return {
            run.name: run.config(*([f"device={stage.device}"] if stage.device else []))
            for stage in self.stages.values()
            for run in stage.all_runs()
        }


# words YAML 1.1 (and so omegaconf) reads as booleans or null, and what a plain string in a flow list or mapping
# cannot hold: such strings are written quoted
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
_FLOW_SPECIAL = set(":,[]{}#&*!|>'\"%@`")


def dotlist_value(value, nested: bool = False) -> str:
    """``value`` as the right side of a ``key=value`` override that omegaconf reads back as the same value: lists
    and mappings in YAML's flow style, a string quoted where YAML would read it otherwise (``nested``: inside one
    of those)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dotlist_value(v, True) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{dotlist_value(k, True)}: {dotlist_value(v, True)}" for k, v in value.items())
            + "}"
        )
    if value is None:
        return "null"
    if isinstance(value, float) and value and abs(value) < 1e-3:  # 3e-4, as a person writes it
        mantissa, exponent = f"{value:.12e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, str) and (
        value.lower() in _YAML_WORDS
        or (nested and (not value.strip() or _FLOW_SPECIAL & set(value)))
        or (not nested and _reads_as_no_string(value))
    ):
        return json.dumps(value)
    return str(value)


def _reads_as_no_string(value: str) -> bool:
    """Whether omegaconf reads ``key=value`` as a mapping, a list or nothing ("a: b", "[x]", "- a", "#c", "") or
    fails on it ("*x", "!x"); a number stays as written (the config's field converts it)."""
    from omegaconf import OmegaConf

    try:
        read = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    except Exception:  # noqa: BLE001 - whatever omegaconf's YAML reader rejects
        return True
    return read is None or isinstance(read, (dict, list))


def _check_keys(where: str, spec, accepted, required=()) -> None:
    """ValueError naming what is wrong when the mapping ``spec`` (a section of a stage file, at ``where``) has keys
    outside ``accepted`` or lacks one of ``required``, and the keys accepted."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping of {', '.join(accepted)}; got {spec!r}")
    unknown = sorted(map(str, set(spec) - set(accepted)))
    missing = [k for k in required if k not in spec]
    said = [
        f"{what} {', '.join(keys)}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys
    ]
    if said:
        raise ValueError(f"{where}: {', '.join(said)}; accepted: {', '.join(accepted)}")


def _runs(path: Path, data, out: Path) -> tuple[Run, ...]:
    runs = []
    for name, spec in (data or {}).items():
        _check_keys(f"{path}: run {name}", spec, ("preset", "train"), required=("preset",))
        runs.append(Run(str(name), spec["preset"], dict(spec.get("train") or {}), str(out / str(name))))
    return tuple(runs)


def load_stage(path: str | os.PathLike, out: str | os.PathLike) -> Stage:
    """One stage file, its ``${out}`` resolved to ``out``; unknown sections fail, naming the accepted ones."""
    path, out = Path(path), Path(out)
    node = load_yaml(path)
    node.out = str(out)
    data = OmegaConf.to_container(node, resolve=True)
    del data["out"]
    _check_keys(str(path), data, STAGE_KEYS)
    cache = data.get("cache")
    experts = _experts(path, data.get("experts"), data.get("lanes") or {})
    return Stage(
        name=path.stem,
        redraw_pipeline=data.get("redraw_pipeline"),
        runs=_runs(path, data.get("runs"), out),
        cache=_cache(path, cache) if cache else None,
        lanes={lane: _runs(path, runs, out) for lane, runs in (data.get("lanes") or {}).items()},
        threads=int(data.get("threads", 1)),
        device=data.get("device"),
        ship=bool(data.get("ship", True)),
        experts=experts,
    )


def _cache(path: Path, spec: dict) -> Cache:
    """A stage's ``cache`` section; unknown or missing keys fail, naming the accepted ones."""
    _check_keys(
        f"{path}: cache", spec, sorted(f.name for f in fields(Cache)), required=("clips", "vae", "into")
    )
    overrides = spec.get("vae_overrides") or ()
    overrides = [overrides] if isinstance(overrides, str) else overrides  # one key=value, or a list of them
    return Cache(**{**spec, "vae_overrides": tuple(str(o) for o in overrides)})


def _experts(path: Path, spec, lanes: dict) -> dict | None:
    """A stage's ``experts`` section checked: ``low`` a run name, ``boundary`` in (0, 1), and a ``dit`` lane (the
    high-noise expert); ValueError naming what is wrong."""
    if spec is None:
        return None
    accepted = "experts: {low: RUN, boundary: B} with B in (0, 1), beside a dit lane (the high-noise expert)"
    ok = isinstance(spec, dict) and set(spec) == {"low", "boundary"} and isinstance(spec["low"], str)
    boundary = spec.get("boundary") if isinstance(spec, dict) else None
    if not ok or isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary < 1:
        raise ValueError(f"{path}: {accepted}; got {spec!r}")
    if "dit" not in lanes:
        raise ValueError(f"{path}: experts needs a dit lane to train the high-noise expert ({accepted})")
    return {"low": spec["low"], "boundary": float(boundary)}


def load_recipe(src: str | os.PathLike = "default", out: str | os.PathLike = "runs/default") -> Recipe:
    """A recipe from a shipped name (``vidlatent/configs/recipes/<name>``) or a folder, for working folder
    ``out``. A folder wins over a shipped name only when it holds a recipe (``runs/default``, the working folder
    itself, may sit in the current folder as ``default``)."""
    folder = Path(src) if (Path(src) / INDEX).is_file() else RECIPE_DIR / str(src)
    if not (folder / INDEX).is_file():
        shipped = sorted(p.name for p in RECIPE_DIR.iterdir() if (p / INDEX).is_file())
        raise ValueError(
            f"no recipe {str(src)!r}: expected a folder with {INDEX}, or one of {', '.join(shipped)}"
        )
    index = OmegaConf.to_container(load_yaml(folder / INDEX), resolve=True)
    stages = {name: load_stage(folder / f"{name}.yaml", out) for name in index["stages"]}
    return Recipe(
        folder=folder,
        out=Path(out),
        stages=stages,
        world=index["world"],
        encoder=index["encoder"],
        pipeline=index["ship"]["pipeline"],
        ship_fallback=index["ship"]["fallback"],
        notes=index.get("notes", {}),
    )


__all__ = ["Cache", "Recipe", "Run", "Stage", "dotlist_value", "load_recipe", "load_stage", "RECIPE_DIR"]
