"""Data: video and image file IO (``vidlatent.data.io``, whose names are re-exported here), the latent file
format (``data.latents``), path expansion and sharding (``data.paths``) and the shapes world
(``data.shapes``)."""

from vidlatent.data import io
from vidlatent.data.io import *  # noqa: F403  (the names io.__all__ lists)

__all__ = io.__all__
