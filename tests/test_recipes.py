"""The default model's recipe is data (vidlatent/configs/recipes/default/): every stage loads, every run builds
its TrainConfig, each stage takes only from runs before it, and shipping writes the shipped pipeline.json."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from vidlatent.checkpoint import shipped_model
from vidlatent.recipes import RECIPE_DIR, adopt_ship, load_recipe, load_stage, run_stage, ship, shipped_runs
from vidlatent.recipes.runner import RUNS_FILE, TIMINGS_FILE, missing_inputs, timed, train_command
from vidlatent.train.trainer import TrainConfig

DEFAULT_MODEL = shipped_model("default")  # the shipped model's pipeline folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return load_recipe("default", tmp_path_factory.mktemp("out"))


def test_every_recipe_yaml_loads_and_every_run_builds_its_train_config(recipe):
    files = {p.stem for p in (RECIPE_DIR / "default").glob("*.yaml")}
    assert files == {"recipe", *recipe.stages}
    configs = recipe.train_configs()
    assert len(configs) == 55 and all(isinstance(c, TrainConfig) for c in configs.values())
    assert configs["control"].task == "control" and configs["control"].control_transform == "silhouette"
    assert configs["control"].data_options["length"] == 6000 and recipe.stages["wide"].ship is False
    assert configs["dit-wide"].text_new_words is True and recipe.stages["wide"].cache.world["wide"] is True
    assert recipe.stages["wide"].cache.world["shape_weights"] == {"square": 2}
    assert configs["dit-fine3"].batch_size == 512 and configs["dit-fine3"].device == "cuda"
    assert configs["vae-refine"].lr == 3e-4 and configs["vae-refine"].output == str(recipe.out / "vae-refine")
    assert configs["vae-redraw"].redraw_strength == [0.05, 0.4] and configs["dit-cpu"].data_in_memory is True
    assert configs["dit-first"].first_frame_weight == 4 and recipe.stages["first"].ship is False
    assert configs["dit-still4"].content_weight == 4 and configs["dit-still5"].lr == 3e-5
    assert configs["dit-wide3"].device == "cuda" and configs["dit-wide3"].text_new_words is True
    assert configs["vae-wide"].vae_train == "decoder" and configs["vae-wide"].data_options["wide"] is True
    assert recipe.stages["wide-gpu"].ship is False and recipe.stages["wide-vae"].ship is False
    assert recipe.stages["wide-counts"].ship is False
    assert configs["vae-wide-redraw"].redraw_pipeline == str(recipe.out / "pipeline-wide4")
    assert (
        configs["dit-wide-high"].sigma_range == [0.5, 1.0]
        and configs["dit-wide-high"].train_text_encoder is False
    )
    assert recipe.stages["wide-redraw"].ship is False and recipe.stages["wide-high"].ship is False
    assert recipe.stages["wide-high"].experts == {"low": "dit-wide4", "boundary": 0.5}
    assert (
        recipe.stages["high"].experts == {"low": "dit-cpu", "boundary": 0.5}
        and recipe.stages["high"].ship is False
    )
    assert configs["dit-high"].sigma_range == [0.5, 1.0] and configs["dit-high"].train_text_encoder is False
    assert configs["dit-content"].content_weight == 4 and recipe.stages["content"].ship is False
    assert configs["vae-noise"].latent_noise == 0.3 and configs["vae-noise"].vae_train == "decoder"
    assert (
        configs["vae-still"].vae_overrides == ["first_frame=still"] and recipe.stages["still"].ship is False
    )


def test_each_stage_takes_only_from_runs_before_it(recipe):
    """In the order a stage runs its parts (pipeline, runs, cache, lanes), every export a run starts from and every
    latent folder it trains on was made before it."""
    out = re.escape(str(recipe.out))
    done, caches = set(), set()

    def check(lane):
        seen = set(done)
        for run in lane:
            text = " ".join(run.overrides()[:-2])
            assert set(re.findall(rf"{out}/([\w-]+)/final", text)) <= seen, run.name
            assert set(re.findall(rf"data={out}/([\w-]+)", text)) <= caches, run.name
            seen.add(run.name)
        return seen

    for stage in recipe.stages.values():
        if stage.redraw_pipeline:
            assert stage.redraw_pipeline["dit"] in done, stage.name
        done |= check(stage.runs)
        if stage.cache:
            assert stage.cache.vae in done | {"encoder"}, stage.name
            caches.add(stage.cache.into)
        done |= set().union(*(check(lane) for lane in stage.lanes.values()))
        if stage.experts:
            assert stage.experts["low"] in done, stage.name
    assert recipe.encoder in done


def test_a_stage_with_an_unknown_section_fails_naming_it(tmp_path):
    (tmp_path / "bad.yaml").write_text("lane:\n  vae: {}\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown lane; accepted: redraw_pipeline, runs, cache, "):
        load_stage(tmp_path / "bad.yaml", tmp_path)
    for run, named in (("{train: {}}", "missing preset"), ("{preset: p, trian: {}}", "unknown trian"),
                       ("dit-tiny", "expected a mapping of preset, train; got 'dit-tiny'")):  # fmt: skip
        (tmp_path / "bad.yaml").write_text(f"lanes:\n  dit:\n    r1: {run}\n")
        with pytest.raises(ValueError, match=f"bad.yaml: run r1: {named}"):
            load_stage(tmp_path / "bad.yaml", tmp_path)


def test_a_cache_codes_with_its_vae_overrides_and_a_bad_cache_section_names_what_is_accepted(tmp_path):
    """Stage 27's cache encodes with the shipped VAE's weights under ``first_frame=still``: its clips' later latent
    frames are the plain code's, latent frame 0 is the still code's (not the plain one); a cache section with an
    unknown key or without ``into`` fails naming the accepted keys."""
    from vidlatent.data.latents import load_latents
    from vidlatent.data.shapes import ShapesWorld, to_tensor
    from vidlatent.models.vae import CausalVAE
    from vidlatent.recipes.runner import cache_latents, encoder_run

    recipe = load_recipe("default", tmp_path / "out")
    adopt_ship(recipe, DEFAULT_MODEL)
    stage = recipe.stages["still-dit"]
    assert stage.cache.vae_overrides == ("first_frame=still",)
    cache_latents(recipe, stage, clips=2)
    world = ShapesWorld(**recipe.world)
    video = to_tensor(world.render(world.scene(1)))[None]
    vae_dir = recipe.out / encoder_run(recipe) / "final" / "vae"
    plain = CausalVAE.from_pretrained(vae_dir).eval()
    still = CausalVAE.from_pretrained(vae_dir, first_frame="still").eval()
    with torch.no_grad():
        z_plain, z_still = (vae.normalize(vae.encode(video).mode())[0] for vae in (plain, still))
    z, meta = load_latents(recipe.out / stage.cache.into / "clip-0000001.safetensors", raw=False)
    assert meta["vae"]["config"]["first_frame"] == "still"
    assert torch.allclose(z, z_still, atol=1e-4)
    assert torch.allclose(z[:, 1:], z_plain[:, 1:], atol=1e-4)
    assert (z[:, 0] - z_plain[:, 0]).abs().max() > 0.1
    for keys, named in (
        ("{clips: 1, vae: encoder, into: x, bogus: 1}", "unknown bogus"),
        ("{clips: 1, vae: v}", "missing into"),
    ):
        (tmp_path / "bad.yaml").write_text(f"cache: {keys}\n")
        with pytest.raises(ValueError, match=f"{named}.*accepted: clips, into, vae, vae_overrides, world"):
            load_stage(tmp_path / "bad.yaml", tmp_path)
    (tmp_path / "one.yaml").write_text(
        "cache: {clips: 1, vae: v, into: x, vae_overrides: first_frame=still}\n"
    )
    assert load_stage(tmp_path / "one.yaml", tmp_path).cache.vae_overrides == ("first_frame=still",)


def test_a_folder_named_like_a_shipped_recipe_that_holds_none_does_not_hide_it(tmp_path, monkeypatch):
    """Run beside its working folder (``./default``, no recipe.yaml in it), ``default`` is still the shipped recipe;
    a folder that holds a recipe.yaml is read as one; a folder that holds none and no shipped name fail, naming
    what is accepted."""
    (tmp_path / "default").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_recipe("default").folder == RECIPE_DIR / "default"
    shutil.copytree(RECIPE_DIR / "default", tmp_path / "mine")
    assert load_recipe("mine").folder == Path("mine")
    with pytest.raises(
        ValueError, match=r"no recipe 'elsewhere': expected a folder with recipe.yaml, or one of"
    ):
        (tmp_path / "elsewhere").mkdir()
        load_recipe("elsewhere")


def test_train_command_is_the_preset_the_overrides_then_extra(recipe):
    run = recipe.run("vae-finetune")
    cmd = train_command(run, ["steps=2"])
    assert cmd[-5:] == ["default-vae-finetune", f"vae={recipe.out}/vae/final/vae", f"output={recipe.out}/vae-finetune",
                        "resume=auto", "steps=2"]  # fmt: skip
    assert run.config("steps=2").steps == 2


def test_override_values_read_back_as_written_and_the_command_line_quotes_a_mapping(recipe):
    """Each value of a recipe's train section goes through ``key=value`` and comes back the same (a mapping as a
    YAML flow mapping, not Python's repr); the printed command keeps a mapping in one shell word."""
    import shlex

    from omegaconf import OmegaConf

    from vidlatent.recipes.recipe import dotlist_value

    values = {"mapping": {"height": 64, "split": "train", "sizes": {"small": 0.3}, "lr": 3e-4, "on": True},
              "list": [0, 2.5, "a", "no", "a: b", ""], "none": None, "small": 3e-4, "flag": False, "word": "copy",
              "yes": "off", "colon": "a: b", "brackets": "[x]", "dash": "- a", "hash": "#c", "empty": "",
              "star": "*x", "path": "/runs/a b/c"}  # fmt: skip
    for key, value in values.items():
        assert OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={dotlist_value(value)}"]))[key] == value
    control = recipe.run("control")
    words = shlex.split(control.command())
    assert control.config().data_options == {"height": 64, "width": 64, "frames": 17, "split": "train",
                                              "seed": 1, "length": 6000}  # fmt: skip
    assert "data_options={height: 64, width: 64, frames: 17, split: train, seed: 1, length: 6000}" in words


def test_shipping_the_adopted_runs_writes_the_shipped_folder(tmp_path):
    """The shipped folder's parts adopted as the runs its runs.json names, then shipped again: the runs picked are
    those (the latest stages whose lanes all finished) and every file comes out the same, pipeline.json too."""
    recipe = load_recipe("default", tmp_path / "out")
    assert shipped_runs(recipe) == {
        "vae": "vae-finetune",
        "dit": "dit",
    }  # nothing trained yet: the recipe's fallback
    adopt_ship(recipe, DEFAULT_MODEL)
    runs = json.loads((DEFAULT_MODEL / RUNS_FILE).read_text())
    assert shipped_runs(recipe) == runs  # the control branch too, when the shipped model has one
    folder = ship(recipe, tmp_path / "ship")
    for name in (
        "pipeline.json",
        RUNS_FILE,
        "vae/model.safetensors",
        "dit/config.json",
        "text_encoder/config.json",
    ):
        assert (folder / name).read_bytes() == (DEFAULT_MODEL / name).read_bytes(), name


def test_ship_passes_over_stages_marked_not_shipped_and_picks_a_finished_control(tmp_path):
    """A finished lane of a ``ship: false`` stage (the wide denoiser) is not shipped; a finished control lane is,
    beside the denoiser it was trained for, and its branch lands in the shipped folder's control/."""
    from vidlatent.config.control import control_config_for
    from vidlatent.models.control import ControlBranch
    from vidlatent.models.dit import VideoDiT

    recipe = load_recipe("default", tmp_path / "out")
    shipped = json.loads((DEFAULT_MODEL / RUNS_FILE).read_text())
    (recipe.out / "dit-wide" / "final").mkdir(parents=True)  # stage 15 finished; it is marked ship: false
    assert shipped_runs(recipe) == {"vae": "vae-finetune", "dit": "dit"}  # the fallback, not dit-wide
    adopt_ship(recipe, DEFAULT_MODEL)
    branch = recipe.out / "control" / "final" / "control"
    if "control" not in shipped:  # a finished control lane, as the control stage exports it
        config = control_config_for(VideoDiT.from_pretrained("default").config, [0, 2], in_channels=96)
        ControlBranch(config).save_pretrained(branch)
    assert shipped_runs(recipe) == {"vae": shipped["vae"], "dit": shipped["dit"], "control": "control"}
    folder = ship(recipe, tmp_path / "ship")
    assert json.loads((folder / RUNS_FILE).read_text())["control"] == "control"
    assert (folder / "control" / "config.json").read_bytes() == (branch / "config.json").read_bytes()


def test_the_model_card_lists_the_runs_as_the_shipped_card_does(tmp_path):
    """Every ``vidlatent train`` line of the shipped MODEL_CARD.md's recipe part comes out of the recipe as it was
    written there: stages 3-11, and the later stages the shipped model has run (12, carry; 16, control), which the
    card lists once their runs exist."""
    from vidlatent.eval.card import model_card

    without = model_card(load_recipe("default", tmp_path), DEFAULT_MODEL, {"job": {}})
    for run in ("dit-cpu", "control"):
        (tmp_path / run / "final").mkdir(parents=True)
    card = model_card(load_recipe("default", tmp_path), DEFAULT_MODEL, {"job": {}})
    shipped = (DEFAULT_MODEL / "MODEL_CARD.md").read_text().split("## How it actually ran")[0]

    def runs(text):
        return [line for line in text.splitlines() if line.startswith("- ") and "vidlatent train" in line]

    assert len(runs(shipped)) >= 18 and len(runs(card)) == len(runs(without)) + 2
    assert runs(shipped) == runs(card)


def test_a_stage_whose_starting_models_are_missing_fails_before_it_caches(tmp_path):
    """Stage 20 starts from stage 18's export (a GPU stage): without it the stage stops at once, naming the
    folders, instead of after minutes of caching; the models a stage's own runs write, and those there, pass."""
    recipe = load_recipe("default", tmp_path / "out")
    out = recipe.out
    wanted = [str(out / "dit-wide3/final/dit"), str(out / "dit-wide3/final/text_encoder")]
    assert missing_inputs(recipe, "wide-counts") == wanted
    with pytest.raises(FileNotFoundError, match=re.escape(f"not there: {', '.join(wanted)}; run the stages")):
        run_stage(recipe, "wide-counts")
    assert not (out / "latents-wide4").exists() and not (out / "timings.json").exists()
    assert missing_inputs(recipe, "vae") == []  # the VAE's lanes chain their own runs
    adopt_ship(recipe, DEFAULT_MODEL)
    assert missing_inputs(recipe, "wide") == [] and missing_inputs(recipe, "wide-counts") == wanted
    for path in wanted:
        (out / path).mkdir(parents=True)
    assert missing_inputs(recipe, "wide-counts") == []


def test_a_stage_with_experts_assembles_a_two_expert_folder_that_loads_and_adopts_back(tmp_path):
    """Stage 23's denoiser is a high-noise expert over the shipped one: assembled from it (``prefer``, though the
    stage is not shipped) the folder holds the shipped denoiser as dit_2/, the boundary in pipeline.json and the
    low expert's run in runs.json; it loads as two experts, and adopting it seeds both runs again."""
    from vidlatent import VideoPipeline

    recipe = load_recipe("default", tmp_path / "out")
    adopt_ship(recipe, DEFAULT_MODEL)
    shipped = json.loads((DEFAULT_MODEL / RUNS_FILE).read_text())
    assert shipped["dit"] == "dit-cpu"  # the stage's low expert is the shipped denoiser's run
    with pytest.raises(
        FileNotFoundError, match=r"stage high has no finished lanes to take: .*dit-high/final"
    ):
        shipped_runs(recipe, ["high"])
    with pytest.raises(ValueError, match="no stage 'hgih' in the recipe"):
        shipped_runs(recipe, ["hgih"])
    shutil.copytree(recipe.out / "dit-cpu" / "final", recipe.out / "dit-high" / "final")  # as if trained
    assert shipped_runs(recipe)["dit"] == "dit-cpu"  # ship: false, so not picked unless preferred
    assert shipped_runs(recipe, ["high"])["dit"] == "dit-high"
    folder = ship(recipe, tmp_path / "candidate", ["high"])
    assert json.loads((folder / RUNS_FILE).read_text())["dit_2"] == "dit-cpu"
    settings = json.loads((folder / "pipeline.json").read_text())
    assert settings["boundary"] == 0.5 and settings["first_frame"] == "clean"
    for part in ("dit", "dit_2"):
        assert (folder / part / "model.safetensors").read_bytes() == (
            DEFAULT_MODEL / "dit/model.safetensors"
        ).read_bytes()
    pipe = VideoPipeline.from_pretrained(folder)
    assert pipe.dit_2 is not None and pipe.config.boundary == 0.5
    again = load_recipe("default", tmp_path / "again")
    adopt_ship(again, folder)
    assert (again.out / "dit-high/final/dit").is_dir() and (again.out / "dit-cpu/final/dit").is_dir()
    assert "boundary" not in json.loads(ship(again, tmp_path / "plain").joinpath("pipeline.json").read_text())


def test_a_lora_run_ships_as_its_base_with_the_adapter_fused_in(tmp_path):
    """Stage 33 adapts the shipped denoiser through LoRA: its export is ``base.json`` and the adapter, no ``dit/``.
    Shipped (preferred), the folder holds a plain ``dit/`` equal to the training side's own merge of that
    adapter (peft's), and no ``base.json``: it loads without the working folder's base or the adapter file."""
    from vidlatent import VideoPipeline
    from vidlatent.models.dit import VideoDiT
    from vidlatent.pipelines.finetuned import BASE_FILE, write_base
    from vidlatent.train.lora import add_lora, lora_parameters, remove_lora, save_lora

    recipe = load_recipe("default", tmp_path / "out")
    adopt_ship(recipe, DEFAULT_MODEL)
    base, final = recipe.out / "dit-cpu" / "final", recipe.out / "dit-lora" / "final"
    shutil.copytree(base / "text_encoder", final / "text_encoder")
    dit = add_lora(VideoDiT.from_pretrained(base / "dit"), rank=4, alpha=8)
    torch.manual_seed(0)
    for p in lora_parameters(dit):
        p.data.normal_(0, 0.05)
    save_lora(dit, final / "lora.safetensors")
    merged = remove_lora(dit, merge=True).state_dict()

    before = VideoDiT.from_pretrained(base / "dit").state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], before[k])]
    assert len(moved) >= 8 * 6  # every block's adapted linears changed

    # the base where the run started (absolute), then a preset's base, which the export writes as final/dit
    for n, base_dit in enumerate([base / "dit", "dit"]):
        if base_dit == "dit":
            shutil.copytree(base / "dit", final / "dit")
        write_base(final, base_dit, [("lora.safetensors", 1.0)])
        folder = ship(recipe, tmp_path / f"candidate{n}", ["still-lora"])
        assert json.loads((folder / RUNS_FILE).read_text())["dit"] == "dit-lora"
        assert not (folder / BASE_FILE).exists() and not list(recipe.out.glob(".fused-*"))
        shipped = VideoDiT.from_pretrained(folder / "dit").state_dict()
        assert shipped.keys() == merged.keys()
        for key, value in merged.items():
            torch.testing.assert_close(shipped[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert VideoPipeline.from_pretrained(folder).loras == {}


def test_an_experts_section_that_does_not_fit_fails_naming_what_is_accepted(tmp_path):
    lane = "lanes:\n  dit:\n    a: {preset: default-dit}\n"
    for bad in ("experts: {low: a}\n" + lane, "experts: {low: a, boundary: 1.5}\n" + lane,
                "experts: {low: a, boundary: 0.5}\n"):  # fmt: skip
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ValueError, match=r"experts: \{low: RUN, boundary: B\}"):
            load_stage(tmp_path / "bad.yaml", tmp_path)


def test_missing_inputs_names_the_caches_and_experts_a_stage_takes_from_earlier_ones(tmp_path):
    """Stage 22 trains on stage 20's cache and keeps stage 20's denoiser as its low expert; stage 21 re-draws with
    stage 20's denoiser: each is named when missing. A stage's own cache passes."""
    recipe = load_recipe("default", tmp_path / "out")
    out = recipe.out
    assert missing_inputs(recipe, "wide-high") == [
        str(out / "dit-wide4/final/dit"), str(out / "dit-wide4/final/text_encoder"), str(out / "latents-wide4")
    ]  # fmt: skip
    assert str(out / "dit-wide4/final") in missing_inputs(recipe, "wide-redraw")
    adopt_ship(recipe, DEFAULT_MODEL)
    assert missing_inputs(recipe, "high") == [] and missing_inputs(recipe, "carry") == [str(out / "dit-fine2/final/dit"),
        str(out / "dit-fine2/final/text_encoder")]  # fmt: skip


def test_a_stage_timed_keeps_the_times_another_process_wrote_while_it_ran(tmp_path):
    """Two stages run side by side in two processes (stages 31 and 32) share timings.json: each adds its own."""
    (tmp_path / TIMINGS_FILE).write_text(json.dumps({"a": 1.0}))

    def other_process_finishes_meanwhile():
        (tmp_path / TIMINGS_FILE).write_text(json.dumps({"a": 1.0, "b": 5.0}))

    timed(tmp_path, "c", other_process_finishes_meanwhile)
    timings = json.loads((tmp_path / TIMINGS_FILE).read_text())
    assert timings["a"] == 1.0 and timings["b"] == 5.0 and 0 <= timings["c"] < 60
