"""Data: video and image file IO (``vidlatent.data.io``)."""

from vidlatent.data import io
from vidlatent.data.io import *  # noqa: F403  (the names io.__all__ lists)

__all__ = io.__all__
