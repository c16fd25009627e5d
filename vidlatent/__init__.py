"""vidlatent: video latent diffusion with a 3D causal VAE and a spatio-temporal transformer."""

from .models.dit import VideoDiT
from .models.vae import CausalVAE, DiagonalGaussian, StreamCache

__version__ = "0.1.0"

__all__ = ["CausalVAE", "DiagonalGaussian", "StreamCache", "VideoDiT", "__version__"]
