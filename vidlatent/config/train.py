"""The training run's config: ``TrainConfig``, mirrored by ``configs/train/*.yaml``.

One flat dataclass for every task (``task: denoiser | vae | control``); ``vidlatent.train.load_train_config`` merges a
preset, yaml files and ``key=value`` overrides into it and checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything a training run needs; mirrored by ``configs/train/*.yaml``."""

    task: str = "denoiser"  # denoiser | vae | control
    data: str = "???"  # folder of latent files (vidlatent encode's output), or "shapes" (procedural)
    # ShapesWorld arguments when data=shapes; VideoFolderDataset ones (frames, size, buckets, fps, stride,
    # images) when task=vae trains on a folder of videos
    data_options: dict = field(default_factory=dict)
    num_workers: int = 0  # DataLoader worker processes reading videos (task=vae on a folder)
    captions: str | None = None  # metadata.jsonl or .csv with path + caption (else sidecar .txt files)
    data_in_memory: bool = False  # denoiser: read every latent file once at the start, not per batch
    output: str = "runs/train"  # checkpoints/, metrics.jsonl
    dit: str = "tiny"  # dit preset name or vidlatent/diffusers folder
    dit_overrides: list[str] = field(default_factory=list)  # key=value DiTConfig fields (presets only)
    text_encoder: str = "tiny"  # preset name or folder
    train_text_encoder: bool = True  # the built-in encoder learns with the denoiser
    # the trained built-in encoder learns the caption words outside its vocabulary: before training, each gets
    # its own word-embedding row (starting as the <unk> row it was read with, so no encoding changes until it
    # trains) and final/text_encoder lists it; false: such words stay <unk> (an UnknownWordsWarning names them)
    text_new_words: bool = False
    text_overrides: list[str] = field(default_factory=list)  # key=value text config fields (presets only)
    vae: str = "tiny"  # vae preset or folder: trained when task=vae; encodes data=shapes for the denoiser
    # key=value VAEConfig fields over the preset's, or (task=vae) over a folder's config: e.g. first_frame=still
    vae_overrides: list[str] = field(default_factory=list)
    l1_weight: float = 1.0  # VAE objective (task=vae)
    mse_weight: float = 0.0
    ssim_weight: float = 0.2
    kl_weight: float = 1.0e-6
    # "module:factory" making a (recon, target) -> scalar loss module (your code)
    perceptual: str | None = None
    perceptual_weights: str | None = None  # safetensors file loaded into it (no code runs while loading)
    perceptual_weight: float = 0.0
    chroma_weight: float = 0.0  # MSE of the Cb/Cr colour differences (see losses.vae_loss)
    edge_weight: float = 0.0  # extra L1/MSE weight on pixels at edges of the target (see losses.edge_weights)
    vae_train: str = "all"  # all | decoder (the encoder and so the latent space stay fixed)
    # vae_train=decoder: a pipeline folder (or "default") whose denoiser re-draws a share of the encoded clips
    # from their captions (SDEdit) before the decoder sees them, so it learns to draw what a denoiser leaves
    redraw_pipeline: str | None = None
    redraw_fraction: float = 0.5  # share of the clips re-drawn
    # each re-drawn clip's SDEdit strength: uniform in [lo, hi]
    redraw_strength: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # task=vae: each clip's latents get white noise of a std drawn uniformly in [0, latent_noise], in the unit-scale
    # (normalized) latents a denoiser works in, before the decoder sees them: what a denoiser leaves is never exact,
    # and a shape whose latents are faint loses its corners to an error that size (docs/default-model.md, squares)
    latent_noise: float = 0.0
    logvar_init: float = -6.0  # bias of a fresh VAE's log-variance outputs (0 = std-1 posterior noise, slow)
    disc_weight: float = 0.0  # adversarial weight; 0 = no discriminator
    disc_start: int = 0  # optimizer step at which the discriminator starts
    disc_lr: float = 1.0e-4
    seed: int = 0
    steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget of the training steps (summed over resumes); 0 = none
    batch_size: int = 1  # clips per micro-batch (one shape bucket)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1.0e-8
    schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    optimizer: str = "adamw"  # adamw (fused where torch has it) | adamw8bit (bitsandbytes' 8-bit states)
    ema_decay: float = 0.999  # 0 = no EMA
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (for classifier-free guidance)
    caption_word_dropout: float = 0.0  # probability each word of a kept caption is left out (0 = off)
    timestep_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # sigma shift applied to the sampled sigmas
    # [lo, hi]: the drawn sigmas (after shift) mapped linearly into this band, so a denoiser learns only those
    # noise levels (one expert of a two-expert model; a carry-on that leaves the others as they are); None = (0, 1)
    sigma_range: list[float] | None = None
    mixed_precision: str = "no"  # no | bf16 (autocast)
    gradient_checkpointing: bool = False
    # denoiser: torch.compile each DiT block (fewer kernel launches; compiles on the first step)
    compile: bool = False
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the last step
    export_checkpoints: bool = False  # each checkpoint also holds pipeline/ (as final/: --model takes it)
    log_every: int = 1  # steps between metrics.jsonl rows
    resume: str | None = None  # "auto" (latest under output, if any) or a checkpoint folder
    device: str | None = None  # default: cuda if available
    progress: bool = True
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 per DiT block, then the root), under torchrun
    first_frame_dropout: float = 1.0  # image to video: P(the clean first latent frame is NOT given); 1 = off
    image_fraction: float = 0.0  # denoiser: P(a micro-batch keeps its first latent frame only); 0 = off
    # denoiser: weight of the first latent frame's error against each later frame's in a clip's loss (a causal
    # VAE's first latent frame is the one frame encoded alone); 1 = every frame alike
    first_frame_weight: float = 1.0
    # denoiser: extra weight on the latent positions that hold content, against a frame's flat background: each
    # position's error counts 1 + content_weight * min(r / 4, 1) times, r being how far its clean latent lies
    # from the frame's per-channel median over the frame's mean such distance (train.tasks.denoiser.content_weights)
    content_weight: float = 0.0
    text_cache: bool = False  # frozen text encoder (train_text_encoder=false): encode each caption once
    sample_every: int = 0  # steps between <output>/samples/step-XXXXXXX.gif (0 = none); EMA weights if kept
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle moves right"])  # denoiser
    sample_steps: int = 10  # sampler steps of a denoiser sample
    lora_rank: int = 0  # > 0: train LoRA adapters on the denoiser's blocks instead of its weights
    lora_alpha: float | None = None  # adapter scale alpha / rank; default alpha = rank
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "ffn"])  # see train.lora.add_lora
    # task=control: a control branch (models.control.ControlBranch) learns beside a frozen pipeline's denoiser,
    # text encoder and VAE (data: shapes, or a folder of videos with their control videos)
    # the frozen pipeline: a folder, "default" or a preset ("tiny"). task=denoiser: the pipeline folder to fine-tune
    # (ours or a diffusers Wan root): its denoiser trains on data= (a folder of captioned clips)
    # with latents and text embeddings cached to disk through its VAE and text encoder (see train.cache)
    pipeline: str | None = None
    cache: str | None = None  # fine-tuning a pipeline on clips: the cache folder (default <output>/cache)
    control_layers: list[int] | None = None  # denoiser blocks given a hint; None = every second (as VACE)
    control_transform: str = "silhouette"  # data=shapes: the control made from each clip (silhouette | edges)
    controls: str = "controls"  # a video folder: the folder beside the clips holding their control videos
    control_init: str = (
        "zero"  # zero: fresh blocks | copy: block j starts as the denoiser's block j; or a trained
    )
    # branch's folder (ControlBranch.save_pretrained's, a pipeline folder with control/) to carry on
