"""The docs stay true: every shell command in README.md and docs/*.md is checked here.

What counts as a command: each line of a fenced ```bash (or ```console, without its ``$ ``) block, with ``\\``
continuations joined and ``&&`` chains split; and each inline ```vidlatent ...``` in the "command" column of
a table (the galleries). How each is checked:

* ``vidlatent ...`` runs in-process (``vidlatent.cli.main``) in a temporary folder per page, in page order.
* ``python scripts/NAME.py ...`` runs as a subprocess in that folder.
* A command whose comment says ``not run by the doc check: WHY (parsed only)`` is parsed, not run: by the
  CLI's parser, or by the script's own argparse (stopped right after parsing). ``torchrun`` and
  ``--device cuda`` must carry such a comment.
* ``pip install ...`` and ``python -m pytest ...`` (the README's two commands) are what ``.ci/run`` does: each
  must be a line of it (CI runs the README's test command); they are not run here.
* Anything else fails: a new kind of command needs a rule here.

The fast set parses every command (and compiles every ```python block, and checks every relative link); the
slow set (``-m slow``) runs them. Stand-ins, so that the commands run on a CPU in a clean folder:

* the sample inputs of ``docs/`` (``input.gif``, ``mask.png``, ``still.png``, ``first.png``, ``last.png``,
  ``a.png``, ``b.png``, ``control.gif``) are copied in; ``clips/`` holds two of them with ``.txt`` captions, ``clip.gif`` one;
* a Wan 2.1 folder name the page uses (``Wan2.1-T2V-1.3B-Diffusers`` ...) is a tiny random folder of the same
  layout (tests/wan_folders.py, ``Wan2.1-Fun-1.3B-Control-Diffusers`` too; ``Wan2.1-VACE-1.3B-diffusers``:
  tests/vace_folders.py), and every job with a
  ``--model`` other than the shipped ``default`` and ``tiny`` gets ``--frames 5 --height 32 --width 32 --steps 2`` (encode: ``--frames 5 --size 32 32``) added;
* every ``vidlatent train`` gets ``steps=2`` added;
* ``style.safetensors`` / ``distill.safetensors`` are random LoRAs for the default model,
  ``wan_style.safetensors`` one for the Wan stand-in;
* a ```yaml block whose first line is ``# NAME.yaml`` is written to ``NAME.yaml`` when the page reaches it.
The pages say so where it matters (docs/wan.md, docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PARSED_ONLY = "not run by the doc check"
SAMPLES = ["input.gif", "mask.png", "still.png", "first.png", "last.png", "a.png", "b.png", "control.gif"]
CAPTIONS = {"input.gif": "an orange triangle goes downward", "generate.gif": "a red circle moving right"}
SHIPPED_MODELS = {"default", "tiny"}
JOBS = {"generate", "edit", "inpaint", "animate", "morph", "control"}
SMALL = {job: ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2"] for job in JOBS}
SMALL["encode"] = ["--frames", "5", "--size", "32", "32"]


@dataclass
class Command:
    """One shell command of a page: its words, whether it is only parsed, where it is."""

    argv: list[str]
    parsed_only: bool
    where: str


@dataclass
class File:
    """A yaml block to write before the commands after it."""

    name: str
    text: str
    where: str


def page_items(page: str) -> list[Command | File]:
    """The commands (and files) of one page, in page order."""
    items: list[Command | File] = []
    lines = (ROOT / page).read_text().splitlines()
    fence, block, start, column = None, [], 0, None
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            if fence is None:
                fence, block, start = line[3:].strip().split(" ")[0], [], i
                continue
            items.extend(block_items(fence, block, f"{page}:{start}"))
            fence = None
        elif fence is not None:
            block.append(line)
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not lines[i - 2].startswith("|"):  # a header row: which column holds commands
                column = cells.index("command") if "command" in cells else None
            elif column is not None and column < len(cells):
                for code in re.findall(r"`(vidlatent [^`]+)`", cells[column]):
                    items.append(Command(shlex.split(code), False, f"{page}:{i}"))
    return items


def block_items(fence: str, block: list[str], where: str) -> list[Command | File]:
    if fence == "yaml" and block and re.fullmatch(r"# [\w.-]+\.yaml", block[0]):
        return [File(block[0][2:], "\n".join(block[1:]) + "\n", where)]
    if fence not in ("bash", "console", "shell", "sh"):
        return []
    items = []
    text = "\n".join(line.removeprefix("$ ") for line in block).replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        parsed_only = PARSED_ONLY in line
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            items.append(Command(words[:cut], parsed_only, where))
            words = words[cut + 1 :]
    return items


def commands(page: str) -> list[Command]:
    return [x for x in page_items(page) if isinstance(x, Command)]


def with_stand_in_sizes(argv: list[str]) -> list[str]:
    """``argv`` with what the doc check adds: small sizes for jobs on stand-in models, ``steps=2`` to train."""
    argv = list(argv)
    if argv[:2] == ["vidlatent", "train"]:
        return [*argv, "steps=2"]
    if argv[0] == "vidlatent" and len(argv) > 1 and argv[1] in SMALL and "--model" in argv:
        if argv[argv.index("--model") + 1] not in SHIPPED_MODELS:
            return [*argv, *SMALL[argv[1]]]
    return argv


# ------------------------------------------------------------------ parsing without running


class Parsed(Exception):
    """Raised by the patched ``ArgumentParser.parse_args`` once a script's arguments parsed."""


def parse_cli(args: list[str], where: str) -> None:
    """Parse ``vidlatent ARGS`` as ``vidlatent.cli.main`` does (key=value overrides may trail), run nothing."""
    from vidlatent.cli import build_parser

    ns, extra = build_parser().parse_known_args(args)
    stray = [x for x in extra if not re.match(r"^[A-Za-z_][\w.]*=", x)]
    assert not stray and (not extra or isinstance(getattr(ns, "overrides", None), list)), (where, extra)
    assert callable(getattr(ns, "func", None)), where


def parse_script(script: Path, args: list[str], monkeypatch) -> None:
    """Run ``script`` until its ``parse_args`` has parsed ``args`` (an argparse error fails the test)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "argv", [str(script), *args])
        with pytest.raises(Parsed):
            runpy.run_path(str(script), run_name="__main__")


def check_with_ci(cmd: Command) -> None:
    """``pip install ...`` and ``python -m pytest ...`` are what .ci/run does: each must be one of its lines."""
    ci = [shlex.split(line, comments=True) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    if cmd.argv[:2] == ["pip", "install"]:
        wanted = [w for w in cmd.argv[2:] if w != "-q"]
        installs = [[w for w in c[c.index("install") + 1 :] if w != "-q"] for c in ci if "install" in c]
        assert wanted in installs, f"{cmd.where}: .ci/run installs none of {cmd.argv}"
    else:
        assert cmd.argv in ci, f"{cmd.where}: .ci/run does not run {shlex.join(cmd.argv)}"


def kind(cmd: Command) -> str:
    argv = cmd.argv
    if argv[0] == "vidlatent":
        return "cli"
    if argv[0] == "torchrun":
        return "torchrun"
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("scripts/"):
        return "script"
    if argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]:
        return "ci"
    raise AssertionError(f"{cmd.where}: the doc check has no rule for {shlex.join(argv)}")


def parse(cmd: Command, monkeypatch) -> None:
    """Check a command without running it: its arguments parse (or, for CI's commands, CI runs them)."""
    argv = with_stand_in_sizes(cmd.argv)
    what = kind(cmd)
    if what == "cli":
        parse_cli(argv[1:], cmd.where)
    elif what == "torchrun":
        assert cmd.parsed_only, f"{cmd.where}: torchrun commands say that they are not run"
        parse_cli(argv[argv.index("vidlatent.cli") + 1 :], cmd.where)
    elif what == "script":
        parse_script(ROOT / argv[1], argv[2:], monkeypatch)
    else:
        check_with_ci(cmd)
    if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda"):
        assert cmd.parsed_only, f"{cmd.where}: a --device cuda command says that it is not run"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_parses(page, monkeypatch):
    for cmd in commands(page):
        parse(cmd, monkeypatch)


def test_readme_commands_are_cis():
    """The README's setup and test commands are the ones .ci/run runs."""
    ci = [c for c in commands("README.md") if kind(c) == "ci"]
    assert [c.argv[:3] for c in ci] == [
        ["pip", "install", "torch==2.13.0"],
        ["pip", "install", "-e"],
        ["python", "-m", "pytest"],
    ]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_compile(page):
    text = (ROOT / page).read_text()
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
        compile(code, f"{page} python block {i}", "exec")


@pytest.mark.parametrize("page", PAGES)
def test_links_and_images_exist(page):
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text) + re.findall(r'<img src="([^"]+)"', text)
    folder = (ROOT / page).parent
    missing = [t for t in targets if "://" not in t and not (folder / t).exists()]
    assert not missing, f"{page}: broken links {missing}"


# ------------------------------------------------------------------ running


def stand_ins(page: str, folder: Path) -> None:
    """Write what the page's commands read (see the module docstring) into ``folder``."""
    used = [" ".join(x.argv) if isinstance(x, Command) else x.text for x in page_items(page)]
    text = "\n".join(used)  # stand-ins for what the commands name, not for names in the prose
    for name in SAMPLES:
        shutil.copy(ROOT / "docs" / name, folder / name)
    (folder / "clips").mkdir()
    for name, caption in CAPTIONS.items():
        shutil.copy(ROOT / "docs" / name, folder / "clips" / name)
        (folder / "clips" / name).with_suffix(".txt").write_text(caption + "\n")
    shutil.copy(ROOT / "docs" / "input.gif", folder / "clip.gif")

    def uses(name: str) -> bool:
        return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text) is not None

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from wan_folders import wan_i2v_root, wan_t2v_parts, wan_t2v_root

        if uses("Wan2.1-T2V-1.3B-Diffusers"):
            wan_t2v_root(folder / "Wan2.1-T2V-1.3B-Diffusers")
        if uses("Wan2.1-I2V-14B-480P-Diffusers"):
            wan_i2v_root(folder / "Wan2.1-I2V-14B-480P-Diffusers")
        if uses("Wan2.1-FLF2V-14B-720P-diffusers"):
            wan_i2v_root(folder / "Wan2.1-FLF2V-14B-720P-diffusers", flf=True)
        if uses("Wan2.1-VACE-1.3B-diffusers"):
            from vace_folders import wan_vace_root

            wan_vace_root(folder / "Wan2.1-VACE-1.3B-diffusers")
        if uses("Wan2.1-Fun-1.3B-Control-Diffusers"):
            from wan_folders import wan_fun_control_root

            wan_fun_control_root(folder / "Wan2.1-Fun-1.3B-Control-Diffusers")
        if uses("Wan2.1-T2V-1.3B"):
            from test_wan_original import write_wan_release

            (folder / "release-parts").mkdir()
            write_wan_release(folder / "Wan2.1-T2V-1.3B", wan_t2v_parts(), folder / "release-parts")
        loras = {"style.safetensors": "default", "distill.safetensors": "default"}
        loras["wan_style.safetensors"] = str(folder / "Wan2.1-T2V-1.3B-Diffusers")
        for name, model in loras.items():
            if uses(name):
                write_lora(folder / name, model, seed=len(name))
    finally:
        sys.path.remove(str(ROOT / "tests"))


def write_lora(path: Path, model: str, seed: int) -> None:
    """A random Kohya-layout LoRA on every block linear of ``model``'s denoiser."""
    from safetensors.torch import save_file
    from test_lora_inference import block_modules, factors, kohya_keys

    from vidlatent import VideoDiT

    dit = VideoDiT.from_pretrained(model if model != "default" else default_dit())
    save_file(kohya_keys(factors(dit, block_modules(dit.config), seed=seed)), str(path))


def default_dit() -> str:
    import vidlatent

    return str(Path(vidlatent.__file__).parent / "weights" / "default" / "dit")


def run(cmd: Command, folder: Path, monkeypatch) -> None:
    """Run one command in ``folder`` (commands marked parsed-only are parsed)."""
    if cmd.parsed_only or kind(cmd) in ("ci", "torchrun"):
        parse(cmd, monkeypatch)
        return
    argv = with_stand_in_sizes(cmd.argv)
    if kind(cmd) == "cli":
        from vidlatent.cli import main

        assert main(argv[1:]) == 0, f"{cmd.where}: {shlex.join(argv)} failed"
    else:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, str(ROOT / argv[1]), *argv[2:]],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{cmd.where}: {shlex.join(argv)} failed:\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_command_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stand_ins(page, tmp_path)
    for item in page_items(page):
        if isinstance(item, File):
            (tmp_path / item.name).write_text(item.text)
        else:
            run(item, tmp_path, monkeypatch)
