"""vidlatent: video latent diffusion with a 3D causal VAE and a spatio-temporal transformer."""

from .models.dit import VideoDiT
from .models.image import ImageEncoder, load_image_encoder
from .models.text import TextEncoder, load_text_encoder
from .models.vae import CausalVAE, DiagonalGaussian, StreamCache
from .pipelines.video import PipelineConfig, VideoPipeline

__version__ = "0.1.0"

__all__ = [
    "CausalVAE",
    "DiagonalGaussian",
    "ImageEncoder",
    "PipelineConfig",
    "StreamCache",
    "TextEncoder",
    "VideoDiT",
    "VideoPipeline",
    "__version__",
    "load_image_encoder",
    "load_text_encoder",
]
