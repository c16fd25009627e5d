"""What a VAE's latents hold, shown by linear probes: encode clips of the shapes world (one object each), pool the
latents and the pixels alike into a few statistics per channel, fit a logistic regression on a training share of
the clips for the object's colour, shape and motion, and print the accuracies on the rest.

    python scripts/probe_latents.py                     # 800 clips of 17x64x64 through the shipped VAE
    python scripts/probe_latents.py --clips 96 --frames 5 --size 32 --json probe.json

Two pools of each volume (c, t, h, w), the same for latents (16 channels, 5 frames of 8x8) and pixels (3, 17, 64x64):

- ``pooled``: per channel the mean, standard deviation, minimum and maximum over time and space (4c numbers);
- ``moments``: those, and per channel the first spatial moments (value times x, value times y) of the first,
  middle and last frames as differences from the first (where the object went), 10c numbers.

The probe is multinomial logistic regression in torch (features standardised on the training clips, L2 weight
decay chosen on a validation share of the training clips, full-batch L-BFGS): a linear read-out, so what it finds is what the pooled numbers hold linearly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from einops import rearrange, reduce

from vidlatent.checkpoint import atomic_write
from vidlatent.data.shapes import COLOURS, MOTIONS, SHAPES, ShapesWorld
from vidlatent.pipelines.encode import load_vae

TARGETS = {"colour": list(COLOURS), "shape": list(SHAPES), "motion": list(MOTIONS)}


def world_clips(count: int, frames: int, size: int, seed: int):
    """``count`` one-object clips (3, t, h, w) of every colour, shape and motion, and their labels per target."""
    world = ShapesWorld(height=size, width=size, frames=frames, split="all", seed=seed, max_objects=1)
    clips, labels = [], {name: [] for name in TARGETS}
    for i in range(count):
        scene = world.scene(i)
        obj = scene.objects[0]
        clips.append(world.clip(i)[0])
        for name, value in (("colour", obj.colour), ("shape", obj.shape), ("motion", obj.motion)):
            labels[name].append(TARGETS[name].index(value))
    return clips, {name: torch.tensor(v) for name, v in labels.items()}


def pool(volume: torch.Tensor, moments: bool) -> torch.Tensor:
    """Features of a batch of volumes (b, c, t, h, w): per channel mean, std, min, max over (t, h, w); with
    ``moments`` also the spatial first moments of the middle and last frames minus those of the first."""
    flat = rearrange(volume, "b c t h w -> b c (t h w)")
    stats = [flat.mean(-1), flat.std(-1), flat.amin(-1), flat.amax(-1)]
    if moments:
        b, c, t, h, w = volume.shape
        ys = torch.linspace(-1, 1, h, dtype=volume.dtype)[:, None].expand(h, w)
        xs = torch.linspace(-1, 1, w, dtype=volume.dtype)[None, :].expand(h, w)
        frames = volume[:, :, [0, t // 2, t - 1]]  # first, middle, last
        centred = frames - reduce(frames, "b c f h w -> b c f 1 1", "mean")
        mx = reduce(centred * xs, "b c f h w -> b c f", "mean")
        my = reduce(centred * ys, "b c f h w -> b c f", "mean")
        stats += [mx[..., 0], my[..., 0], *(m[..., k] - m[..., 0] for m in (mx, my) for k in (1, 2))]
    return rearrange(torch.stack(stats, -1), "b c k -> b (c k)")


def encode(vae, clips: list[torch.Tensor], batch: int = 8) -> torch.Tensor:
    """The posterior means (b, c, t', h', w') of ``clips`` (a list of (3, t, h, w) in [-1, 1]); progress on
    stderr every 100 clips."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(clips), batch):
            out.append(vae.encode(torch.stack(clips[i : i + batch])).mean.float())
            done = min(i + batch, len(clips))
            if done % 100 < batch and done < len(clips):
                print(f"encoded {done}/{len(clips)} clips", file=sys.stderr, flush=True)
    return torch.cat(out).clone()  # a normal tensor again (out of inference mode)


DECAYS = (
    1e-4,
    1e-3,
    1e-2,
    1e-1,
)  # the L2 weight decays a probe chooses from, on a validation share of its clips


def fit(
    x: torch.Tensor, labels: torch.Tensor, classes: int, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression's (weight, bias) on standardised features ``x``, L2 ``decay``."""
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, labels) + decay * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def accuracy(x: torch.Tensor, labels: torch.Tensor, model: tuple[torch.Tensor, torch.Tensor]) -> float:
    weight, bias = model
    return float(((x @ weight + bias).argmax(-1) == labels).double().mean())


def probe(features: torch.Tensor, labels: torch.Tensor, train: int, classes: int) -> float:
    """Accuracy on clips ``train:`` of a logistic regression fitted on clips ``:train``; its weight decay
    (``DECAYS``) is the one that does best on the last fifth of the training clips when fitted on the rest."""
    x = features.double()
    mean, std = x[:train].mean(0), x[:train].std(0).clamp(min=1e-8)
    x = (x - mean) / std
    cut = train - max(1, train // 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small fits: one thread is faster than two that wait on each other
    try:
        scores = [
            accuracy(x[cut:train], labels[cut:train], fit(x[:cut], labels[:cut], classes, d)) for d in DECAYS
        ]
        decay = DECAYS[max(range(len(DECAYS)), key=lambda i: (scores[i], i))]  # ties: the stronger decay
        return accuracy(x[train:], labels[train:], fit(x[:train], labels[:train], classes, decay))
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="the VAE: a shipped model, a folder or a preset")
    ap.add_argument("--clips", type=int, default=800, help="one-object clips of the shapes world")
    ap.add_argument("--train", type=float, default=0.75, help="the share of the clips the probes learn from")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64, help="height and width")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed")
    ap.add_argument("--json", help="also write the accuracies to this file")
    args = ap.parse_args(argv)
    train = int(round(args.clips * args.train))
    if not 0 < train < args.clips:
        ap.error(f"--train {args.train} of {args.clips} clips leaves no training or no test clips")
    if (args.frames - 1) % 4:
        ap.error(f"--frames must be 1 + 4k (the VAE's time stride); got {args.frames}")

    start = time.perf_counter()
    vae = load_vae(args.model)[0]
    clips, labels = world_clips(args.clips, args.frames, args.size, args.seed)
    latents = encode(vae, clips)
    pixels = torch.stack(clips)
    seconds = time.perf_counter() - start
    results: dict = {
        "model": args.model,
        "clips": {"train": train, "test": args.clips - train},
        "clip": [args.frames, args.size, args.size],
        "latent": list(latents.shape[1:]),
        "chance": {name: 1 / len(classes) for name, classes in TARGETS.items()},
        "probes": {},
    }
    for pooling in ("pooled", "moments"):
        for name, volume in (("latents", latents), ("pixels", pixels)):
            features = pool(volume, pooling == "moments")
            row = {
                target: probe(features, labels[target], train, len(classes))
                for target, classes in TARGETS.items()
            }
            results["probes"][f"{name} {pooling}"] = {"features": features.shape[1], **row}
    results["seconds"] = round(time.perf_counter() - start, 1)

    print(
        f"linear probes on {train} clips, tested on {args.clips - train} (one object each, {args.frames}x"
        f"{args.size}x{args.size}); VAE {args.model}: latents {tuple(latents.shape[1:])}, encoded in {seconds:.0f} s"
    )
    print(f"{'features':<28}{'colour':>8}{'shape':>8}{'motion':>8}")
    for key, row in results["probes"].items():
        label = f"{key} ({row['features']})"
        print(f"{label:<28}" + "".join(f"{100 * row[t]:>7.1f}%" for t in TARGETS))
    print(f"{'chance':<28}" + "".join(f"{100 * results['chance'][t]:>7.1f}%" for t in TARGETS))
    if args.json:
        text = json.dumps(results, indent=2)
        atomic_write(Path(args.json), lambda p: Path(p).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
