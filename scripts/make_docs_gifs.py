"""Make the README's gifs under docs/ with the shipped default model, through the same CLI commands the
README shows (printed as they run).

    python scripts/make_docs_gifs.py [--model default] [--out docs]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vidlatent.data.io import write_video
from vidlatent.data.shapes import ShapesWorld, coverage, to_tensor


def vidlatent(*args: str, model: str) -> None:
    cmd = ["vidlatent", *args] + (["--model", model] if model != "default" else [])
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "vidlatent.cli", *cmd[1:]], check=True)


def arc_silhouette(frames: int = 17, size: int = 64, radius: float = 0.13) -> np.ndarray:
    """A control video no caption of the world can say: a white disc on black going along an arc from the lower
    left, over the top, to the lower right, uint8 (frames, size, size, 3), drawn as the world draws a circle
    (``radius``: a fraction of the side)."""
    angle = np.linspace(np.pi * 0.9, np.pi * 0.1, frames)
    xs, ys = size / 2 + size * 0.3 * np.cos(angle), size * 0.72 - size * 0.4 * np.sin(angle)
    cov = coverage("circle", radius * size, xs, ys, size, size)[..., None]
    return np.clip(np.round(255.0 * np.repeat(cov, 3, axis=-1)), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = args.model

    # inputs: a clip and a still of the shapes world (held-out split: never trained on), a square mask
    world = ShapesWorld(64, 64, 17, split="heldout", seed=7)
    video = world.render(world.scene(4))
    write_video(out / "input.gif", to_tensor(video), fps=8)
    Image.fromarray(video[0]).save(out / "first.png")  # the clip's first and last frames, for animate --last
    Image.fromarray(video[-1]).save(out / "last.png")
    still = world.scene(6).objects[0]
    Image.fromarray(world.render(world.scene(6))[0]).save(out / "still.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(out / "mask.png")
    print(f"inputs: {out}/input.gif ({world.scene(4).caption}), {out}/still.png ({world.scene(6).caption})")

    vidlatent("generate", "a red circle moving right", "-o", f"{out}/generate.gif", "--seed", "1", model=m)
    vidlatent(
        "generate", "a purple triangle moving down", "-o", f"{out}/generate2.gif", "--seed", "2", model=m
    )
    vidlatent("edit", f"{out}/generate.gif", "a red square moving right", "--strength", "0.5",
              "-o", f"{out}/edit.gif", "--seed", "1", model=m)  # fmt: skip
    vidlatent("edit", f"{out}/generate.gif", "a blue circle moving right", "--source-prompt",
              "a red circle moving right", "--strength", "0.7", "--guidance", "10", "-o", f"{out}/edit_flow.gif",
              "--seed", "1", model=m)  # fmt: skip
    vidlatent("inpaint", f"{out}/input.gif", "--mask", f"{out}/mask.png", "a green triangle moving left",
              "-o", f"{out}/inpaint.gif", "--seed", "1", model=m)  # fmt: skip
    prompt = f"a {still.colour} {still.shape} moving right"
    vidlatent("animate", f"{out}/still.png", prompt, "-o", f"{out}/animate.gif", "--seed", "1", model=m)
    vidlatent("generate", "a yellow circle", "--frames", "1", "-o", f"{out}/a.png", "--seed", "3", model=m)
    vidlatent("generate", "a blue square", "--frames", "1", "-o", f"{out}/b.png", "--seed", "4", model=m)
    vidlatent("morph", f"{out}/a.png", f"{out}/b.png", "--frames", "17", "-o", f"{out}/morph.gif", model=m)
    vidlatent("animate", f"{out}/a.png", "a yellow circle moving right", "--last", f"{out}/b.png",
              "-o", f"{out}/morph_animate.gif", "--seed", "1", model=m)  # fmt: skip
    vidlatent("animate", f"{out}/first.png", world.scene(4).caption, "--last", f"{out}/last.png",
              "-o", f"{out}/animate_last.gif", "--seed", "1", model=m)  # fmt: skip
    vidlatent("reconstruct", f"{out}/input.gif", "-o", f"{out}/reconstruct.gif", model=m)
    # one control path (a silhouette the user draws), three prompts
    write_video(out / "control.gif", to_tensor(arc_silhouette()), fps=8)
    for colour in ("red", "green", "blue"):
        vidlatent("control", f"{out}/control.gif", f"a {colour} circle moving right",
                  "-o", f"{out}/control_{colour}.gif", "--seed", "1", model=m)  # fmt: skip


if __name__ == "__main__":
    main()
