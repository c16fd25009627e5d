"""Data: video and image file IO (``vidlatent.data.io``)."""

from vidlatent.data.io import (
    FRAME_POLICIES,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    WRITE_EXTENSIONS,
    VideoReadError,
    read_image,
    read_video,
    write_video,
)

__all__ = [
    "FRAME_POLICIES",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "VideoReadError",
    "read_image",
    "read_video",
    "write_video",
]
