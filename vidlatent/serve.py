"""``vidlatent serve``: a local web page (Gradio) with a tab per job, a thin layer over the command line.

Each tab turns its fields into the arguments of the matching ``vidlatent`` subcommand and runs that command's
own function (``build_parser`` → ``args.func``), so the page and the CLI share every check, every library
call and every one-line error. What lives here is only page glue: the fields, a folder per request for the
outputs, a drawn mask turned into a mask image, progress (the sampling loop's tqdm bar, tracked by
``gr.Progress``), one job at a time, and cancelling (the running loop stops at its next step).

Needs the ``ui`` extra: ``pip install -e ".[ui]"``.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Cancelled", "JobRunner", "build_app", "serve"]

SAMPLERS = ("model default", "euler", "unipc", "dpm")
STILL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class Cancelled(Exception):
    """The page's Cancel button stopped the running job (raised from the sampling loop's next step)."""


class JobRunner:
    """Runs ``vidlatent`` commands for the page, one at a time, each writing into a fresh folder; a job that
    loads the model as the last one did reuses its pipeline (``cli.jobs.PipelineReuse``).

    model: the ``--model`` every job uses; device: ``--device`` (None: the CLI's default); workdir: where the
    request folders go (a temporary folder by default); runtime: runtime flags (``cli.jobs.add_runtime_flags``, e.g.
    ``["--offload", "model", "--weights-dtype", "fp8"]``) every pipeline job runs with, ahead of its own."""

    def __init__(
        self,
        model: str = "default",
        device: str | None = None,
        workdir: str | None = None,
        runtime: Sequence[str] = (),
    ):
        self.model, self.device, self.runtime = model, device, list(runtime)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="vidlatent-serve-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        from .cli.jobs import PipelineReuse

        self.reuse = PipelineReuse()  # the last job's pipeline, for the next job that loads it the same way

    def folder(self) -> Path:
        """A new folder for one request's outputs."""
        return Path(tempfile.mkdtemp(dir=self.workdir, prefix="job-"))

    def cancel(self) -> None:
        """Stop the running job at its sampling loop's next step."""
        self._stop.set()

    def run(self, argv: list[str]) -> str:
        """Run ``vidlatent <argv> --model M`` as the command line does; returns what it printed.

        A user's error (``errors.user_error``: bad files, sizes, options) raises ``ValueError`` with the
        command's one-line message; a cancelled job raises ``Cancelled``."""
        from .cli import UsageError, build_parser
        from .cli.common import warning_lines
        from .errors import user_error

        argv = [*argv, "--model", self.model, *(["--device", self.device] if self.device else [])]
        try:
            args = build_parser().parse_args(argv)
            # a pipeline job (one with runtime flags): the page's runtime flags first, so its own win
            if self.runtime and hasattr(args, "offload"):
                args = build_parser().parse_args([argv[0], *self.runtime, *argv[1:]])
        except UsageError as err:
            raise ValueError(f"{err.prog}: {err}") from None
        args.reuse = self.reuse
        out = io.StringIO()
        with self._lock:
            self._stop.clear()
            try:
                with _stop_tqdm_on(self._stop), contextlib.redirect_stdout(out), warning_lines(args.command):
                    status = args.func(args)
            except Cancelled:
                raise
            except Exception as err:
                message = user_error(err)
                if message is None:
                    raise
                raise ValueError(f"vidlatent {args.command}: {message}") from None
        text = out.getvalue().strip()
        if status not in (0, None):
            raise ValueError(f"vidlatent {args.command} failed: {text.splitlines()[-1] if text else status}")
        return text


@contextlib.contextmanager
def _stop_tqdm_on(stop: threading.Event):
    """While inside: every tqdm loop (the sampling loops are tqdm loops) raises ``Cancelled`` at its next item
    once ``stop`` is set. Jobs run one at a time (``JobRunner``'s lock), so the class attribute is ours."""
    from tqdm import tqdm

    original = tqdm.__iter__

    def iterate(self):
        for item in original(self):
            if stop.is_set():
                raise Cancelled("cancelled")
            yield item

    tqdm.__iter__ = iterate
    try:
        yield
    finally:
        tqdm.__iter__ = original


def _text(value) -> str:
    """A field's value as typed ("" when empty); the command line checks it."""
    return "" if value is None else str(value).strip()


def _morph_mode_argv(mode, easing, prompt_a, prompt_b, strength, stagger=None) -> list[str]:
    """The morph tab's mode options as CLI arguments; the prompts and strength are the noise mode's (the latent
    mode takes none, and the CLI refuses a strength there), the stagger either mode's; empty fields leave the
    defaults."""
    argv = ["--mode", mode, "--easing", easing]
    argv += ["--stagger", f"{float(stagger):g}"] if stagger not in (None, "") else []
    if mode == "noise":
        argv += ["--prompt-a", prompt_a] if prompt_a else []
        argv += ["--prompt-b", prompt_b] if prompt_b else []
        argv += ["--strength", f"{float(strength):g}"] if strength not in (None, "") else []
    return argv


def _sampling_argv(steps, guidance, seed, sampler, shift, negative, lora, lora_scale) -> list[str]:
    """The shared sampling panel as CLI flags (empty fields: the model's defaults)."""
    argv = []
    for flag, value in (("--steps", steps), ("--guidance", guidance), ("--shift", shift)):
        argv += [flag, _text(value)] if _text(value) else []
    if _text(seed) and float(seed) >= 0:
        argv += ["--seed", str(int(float(seed)))]
    if sampler and sampler != SAMPLERS[0]:
        argv += ["--sampler", sampler]
    if negative:
        argv += ["--negative-prompt", negative]
    if lora:
        argv += ["--lora", f"{lora}:{lora_scale if lora_scale is not None else 1}"]
    return argv


def _size_argv(frames=None, height=None, width=None) -> list[str]:
    argv = []
    for flag, value in (("--frames", frames), ("--height", height), ("--width", width)):
        argv += [flag, _text(value).removesuffix(".0")] if _text(value) else []
    return argv


def _optional(gr, label: str, elem_id: str):
    """A field left empty for the model's default."""
    return gr.Textbox(label=label, placeholder="model default", elem_id=elem_id)


def _need(value, what: str) -> str:
    if not value:
        raise ValueError(f"{what} is missing: fill it in (or upload it)")
    return str(value)


def _media(path: Path) -> tuple[str | None, str | None]:
    """(video, image): the output shown in the page's video or image box."""
    return (None, str(path)) if path.suffix in STILL_SUFFIXES else (str(path), None)


def _mask_from_drawing(drawing, folder: Path) -> str | None:
    """A drawn mask (``gr.ImageEditor`` value) as a black-and-white png: what was painted is white."""
    import numpy as np
    from PIL import Image

    layers = (drawing or {}).get("layers") or []
    painted = None
    for layer in layers:
        alpha = np.asarray(Image.open(layer).convert("RGBA") if isinstance(layer, str) else layer)[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    path = folder / "mask.png"
    Image.fromarray((painted * 255).astype(np.uint8)).save(path)
    return str(path)


def _first_frame(path):
    """The first frame of an uploaded clip, for drawing a mask on (None when it cannot be read)."""
    if not path:
        return None
    from .data.io import read_video

    try:
        video, _ = read_video(path, frames=1)
    except Exception:  # a bad upload: the job's own error comes when it runs
        return None
    return ((video[:, 0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def build_app(runner: JobRunner):
    """The page: a tab per job and one sampling panel; returns the ``gr.Blocks`` (not launched)."""
    import gradio as gr

    def job(fn):
        """Wrap a tab's handler: progress from tqdm, the one-line error as ``gr.Error``."""

        def handler(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            try:
                return fn(*values)
            except Cancelled:
                raise gr.Error("cancelled", print_exception=False) from None
            except ValueError as err:
                raise gr.Error(str(err), print_exception=False) from None

        return handler

    with gr.Blocks(title="vidlatent") as app:
        runs = f" ({' '.join(runner.runtime)})" if runner.runtime else ""  # serve's runtime flags
        gr.Markdown(f"## vidlatent — model `{runner.model}`{runs}")
        with gr.Accordion("sampling (every job)", open=True):
            with gr.Row():
                steps = _optional(gr, "steps", "steps")
                guidance = _optional(gr, "guidance (1 = off)", "guidance")
                seed = gr.Number(label="seed (-1: random)", value=-1, precision=0, elem_id="seed")
                sampler = gr.Dropdown(list(SAMPLERS), value=SAMPLERS[0], label="sampler", elem_id="sampler")
                shift = _optional(gr, "shift", "shift")
            with gr.Row():
                negative = gr.Textbox(label="negative prompt", elem_id="negative")
                lora = gr.File(label="LoRA (.safetensors)", file_types=[".safetensors"], elem_id="lora")
                lora_scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale", elem_id="lora-scale")
            status = gr.Textbox(label="result (the seed used is here)", interactive=False, elem_id="status")
        panel = [steps, guidance, seed, sampler, shift, negative, lora, lora_scale]
        events = []

        def outputs(name: str):
            with gr.Row():
                video = gr.Video(label="video", elem_id=f"{name}-video")
                image = gr.Image(label="image", type="filepath", elem_id=f"{name}-image")
            download = gr.File(label="download", elem_id=f"{name}-download")
            return [video, image, download]

        def finish(path: Path, printed: str):
            video, image = _media(path)
            return video, image, str(path), printed

        with gr.Tab("generate", elem_id="tab-generate"):
            g_prompt = gr.Textbox(label="prompt", elem_id="generate-prompt")
            with gr.Row():
                g_frames = _optional(gr, "frames (1 = image)", "generate-frames")
                g_height = _optional(gr, "height", "generate-height")
                g_width = _optional(gr, "width", "generate-width")
            g_run = gr.Button("generate", variant="primary", elem_id="generate-run")
            g_out = outputs("generate")

        def generate(prompt, frames, height, width, *sampling):
            out = runner.folder() / ("out.png" if str(frames).strip() == "1" else "out.mp4")
            argv = [
                "generate",
                _need(prompt, "the prompt"),
                "-o",
                str(out),
                *_size_argv(frames, height, width),
            ]
            return finish(out, runner.run(argv + _sampling_argv(*sampling)))

        events.append(
            g_run.click(job(generate), [g_prompt, g_frames, g_height, g_width, *panel], [*g_out, status])
        )

        with gr.Tab("edit", elem_id="tab-edit"):
            e_input = gr.File(label="video or image to edit", elem_id="edit-input")
            e_prompt = gr.Textbox(label="prompt (what it should become)", elem_id="edit-prompt")
            e_strength = gr.Slider(0, 1, value=0.6, step=0.05, label="strength", elem_id="edit-strength")
            e_source = gr.Textbox(label="source prompt (FlowEdit; empty: SDEdit)", elem_id="edit-source")
            e_run = gr.Button("edit", variant="primary", elem_id="edit-run")
            e_out = outputs("edit")

        def edit(path, prompt, strength, source, *sampling):
            path = _need(path, "the input video or image")
            out = runner.folder() / ("out.png" if Path(path).suffix.lower() in STILL_SUFFIXES else "out.mp4")
            argv = ["edit", path, _need(prompt, "the prompt"), "-o", str(out), "--strength", str(strength)]
            argv += ["--source-prompt", source] if source else []
            return finish(out, runner.run(argv + _sampling_argv(*sampling)))

        events.append(
            e_run.click(job(edit), [e_input, e_prompt, e_strength, e_source, *panel], [*e_out, status])
        )

        with gr.Tab("inpaint", elem_id="tab-inpaint"):
            i_input = gr.File(label="video or image", elem_id="inpaint-input")
            i_prompt = gr.Textbox(label="prompt (what goes in the masked part)", elem_id="inpaint-prompt")
            with gr.Row():
                i_mask = gr.File(label="mask (white = regenerate)", elem_id="inpaint-mask")
                i_draw = gr.ImageEditor(label="or draw the mask on the first frame", type="filepath",
                                        elem_id="inpaint-draw")  # fmt: skip
            i_strength = gr.Slider(0, 1, value=1, step=0.05, label="strength", elem_id="inpaint-strength")
            i_run = gr.Button("inpaint", variant="primary", elem_id="inpaint-run")
            i_out = outputs("inpaint")
        i_input.change(_first_frame, i_input, i_draw)

        def inpaint(path, prompt, mask, drawing, strength, *sampling):
            path = _need(path, "the input video or image")
            folder = runner.folder()
            mask = mask or _mask_from_drawing(drawing, folder)
            out = folder / ("out.png" if Path(path).suffix.lower() in STILL_SUFFIXES else "out.mp4")
            argv = [
                "inpaint",
                path,
                _need(prompt, "the prompt"),
                "--mask",
                _need(mask, "the mask (upload or draw)"),
            ]
            argv += ["-o", str(out), "--strength", str(strength)]
            return finish(out, runner.run(argv + _sampling_argv(*sampling)))

        events.append(i_run.click(job(inpaint), [i_input, i_prompt, i_mask, i_draw, i_strength, *panel],
                                  [*i_out, status]))  # fmt: skip

        with gr.Tab("animate", elem_id="tab-animate"):
            with gr.Row():
                a_image = gr.Image(label="first frame", type="filepath", elem_id="animate-image")
                a_last = gr.Image(label="last frame (optional)", type="filepath", elem_id="animate-last")
            a_prompt = gr.Textbox(label="prompt (what happens next)", elem_id="animate-prompt")
            with gr.Row():
                a_frames = _optional(gr, "frames", "animate-frames")
                a_strength = gr.Slider(0, 1, value=1, step=0.05, label="strength", elem_id="animate-strength")
            a_run = gr.Button("animate", variant="primary", elem_id="animate-run")
            a_out = outputs("animate")

        def animate(image, last, prompt, frames, strength, *sampling):
            out = runner.folder() / "out.mp4"
            argv = ["animate", _need(image, "the first frame"), _need(prompt, "the prompt"), "-o", str(out)]
            argv += [*(["--last", last] if last else []), *_size_argv(frames), "--strength", str(strength)]
            return finish(out, runner.run(argv + _sampling_argv(*sampling)))

        events.append(a_run.click(job(animate), [a_image, a_last, a_prompt, a_frames, a_strength, *panel],
                                  [*a_out, status]))  # fmt: skip

        with gr.Tab("morph", elem_id="tab-morph"):
            with gr.Row():
                m_a = gr.Image(label="image A", type="filepath", elem_id="morph-a")
                m_b = gr.Image(label="image B", type="filepath", elem_id="morph-b")
            with gr.Row():
                m_frames = gr.Number(label="frames", value=17, precision=0, elem_id="morph-frames")
                m_mode = gr.Radio(["latent", "noise"], value="latent", label="mode", elem_id="morph-mode")
                m_easing = gr.Radio(["linear", "cosine", "smoothstep"], value="linear", label="easing",
                                    elem_id="morph-easing")  # fmt: skip
            with gr.Row():
                m_prompt_a = gr.Textbox(label="noise mode: prompt for A", elem_id="morph-prompt-a")
                m_prompt_b = gr.Textbox(label="noise mode: prompt for B", elem_id="morph-prompt-b")
                m_strength = gr.Number(label="noise mode: strength (how far A and B are inverted; empty: the "
                                       "model's default)", value=None, elem_id="morph-strength")  # fmt: skip
                m_stagger = gr.Number(label="stagger in [0, 1) (B's content comes in before A's goes; empty: 0 "
                                      "for latent, 0.3 for noise)", value=None, elem_id="morph-stagger")  # fmt: skip
            m_run = gr.Button("morph", variant="primary", elem_id="morph-run")
            m_out = outputs("morph")

        def morph(
            a,
            b,
            frames,
            mode,
            easing,
            prompt_a,
            prompt_b,
            strength,
            stagger,
            steps,
            guidance,
            seed,
            sampler,
            shift,
            *rest,
        ):
            out = runner.folder() / "out.mp4"
            argv = ["morph", _need(a, "image A"), _need(b, "image B"), "-o", str(out), *_size_argv(frames)]
            argv += _morph_mode_argv(mode, easing, prompt_a, prompt_b, strength, stagger)
            # morph takes steps, guidance and shift (noise mode); no seed or sampler: it is deterministic
            argv += _sampling_argv(steps, guidance, None, None, shift, None, *rest[1:])
            return finish(out, runner.run(argv))

        events.append(m_run.click(job(morph), [m_a, m_b, m_frames, m_mode, m_easing, m_prompt_a, m_prompt_b,
                                               m_strength, m_stagger, *panel], [*m_out, status]))  # fmt: skip

        with gr.Tab("control", elem_id="tab-control"):
            c_input = gr.File(label="control video (pose, edges, silhouettes)", elem_id="control-input")
            c_prompt = gr.Textbox(label="prompt", elem_id="control-prompt")
            with gr.Row():
                c_mask = gr.File(label="mask (optional; white = generate)", elem_id="control-mask")
                c_ref = gr.Image(label="reference image (optional)", type="filepath", elem_id="control-ref")
            with gr.Row():
                c_scale = gr.Number(label="control scale (empty: the model's)", value=None,
                                    elem_id="control-scale")  # fmt: skip
                c_branch = gr.Textbox(label="control branch folder (optional)", elem_id="control-branch")
            c_run = gr.Button("control", variant="primary", elem_id="control-run")
            c_out = outputs("control")

        def control(path, prompt, mask, ref, scale, branch, *sampling):
            out = runner.folder() / "out.mp4"
            argv = ["control", _need(path, "the control video"), _need(prompt, "the prompt"), "-o", str(out)]
            argv += [*(["--mask", mask] if mask else []), *(["--reference", ref] if ref else [])]
            argv += ["--scale", f"{float(scale):g}"] if scale not in (None, "") else []
            argv += ["--control-branch", branch] if branch else []
            return finish(out, runner.run(argv + _sampling_argv(*sampling)))

        events.append(c_run.click(job(control), [c_input, c_prompt, c_mask, c_ref, c_scale, c_branch, *panel],
                                  [*c_out, status]))  # fmt: skip

        with gr.Tab("reconstruct", elem_id="tab-reconstruct"):
            r_input = gr.File(label="video or image", elem_id="reconstruct-input")
            r_run = gr.Button("reconstruct (VAE round trip, PSNR and SSIM)", variant="primary",
                              elem_id="reconstruct-run")  # fmt: skip
            r_out = outputs("reconstruct")

        def reconstruct(path):
            path = _need(path, "the input video or image")
            out = runner.folder() / ("out.png" if Path(path).suffix.lower() in STILL_SUFFIXES else "out.mp4")
            return finish(out, runner.run(["reconstruct", path, "-o", str(out)]))

        events.append(r_run.click(job(reconstruct), [r_input], [*r_out, status]))

        with gr.Tab("encode", elem_id="tab-encode"):
            n_input = gr.File(label="clips", file_count="multiple", elem_id="encode-input")
            n_run = gr.Button("encode (latents + statistics)", variant="primary", elem_id="encode-run")
            n_files = gr.File(
                label="latent files and statistics", file_count="multiple", elem_id="encode-download"
            )

        def encode(paths):
            if not paths:
                raise ValueError("no clips: upload video or image files")
            folder = runner.folder()
            stats = folder / "stats.yaml"
            printed = runner.run(["encode", *paths, "-o", str(folder / "latents"), "--stats",
                                  "--stats-out", str(stats)])  # fmt: skip
            return [str(p) for p in sorted((folder / "latents").glob("*.safetensors"))] + [
                str(stats)
            ], printed

        events.append(n_run.click(job(encode), [n_input], [n_files, status]))

        cancel = gr.Button("cancel the running job", variant="stop", elem_id="cancel")
        cancel.click(runner.cancel, None, None, cancels=events, queue=False)
    return app


def serve(
    model: str = "default",
    port: int = 7860,
    host: str = "127.0.0.1",
    share: bool = False,
    device: str | None = None,
    block: bool = True,
    runtime: Sequence[str] = (),
):
    """Start the page on ``host:port`` (loopback unless asked), one job at a time; returns the ``gr.Blocks``.

    share: a public gradio.live link (anyone with the link can run jobs on this machine): warned about.
    runtime: runtime flags every pipeline job runs with (``JobRunner``), e.g. ``["--offload", "model"]``."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError('vidlatent serve needs gradio: pip install -e ".[ui]"') from None
    if share or host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(
            f"serving beyond this machine (host {host}{', share link' if share else ''}): anyone who reaches "
            "it can run jobs and read their outputs",
            stacklevel=2,
        )
    runner = JobRunner(model, device, runtime=runtime)
    app = build_app(runner)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
               allowed_paths=[str(runner.workdir)], show_error=True)  # fmt: skip
    return app
