"""vidlatent: video latent diffusion with a 3D causal VAE and a spatio-temporal transformer.

The public names below load on first use, so importing a light module (``vidlatent.checkpoint``,
``vidlatent.metrics``, ``vidlatent.data.io``) does not build the models and pipelines.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

_HOMES = {
    "CausalVAE": ".models.vae",
    "DiagonalGaussian": ".models.vae",
    "ImageEncoder": ".models.image",
    "PipelineConfig": ".pipelines.video",
    "StreamCache": ".models.vae",
    "TextEncoder": ".models.text",
    "VideoDiT": ".models.dit",
    "VideoPipeline": ".pipelines.video",
    "load_image_encoder": ".models.image",
    "load_text_encoder": ".models.text",
}

__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str):
    """A public name (imported from its module) or a subpackage (``vidlatent.pipelines`` after ``import
    vidlatent``), loaded the first time it is asked for."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
