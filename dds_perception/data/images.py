"""Image buffers to RGB arrays: raw ROS encodings and compressed JPEG/PNG bytes.

One function turns whatever a camera or a bag gives (an HxWxC array, a raw buffer with its ROS
``encoding``/``step``/``is_bigendian``, or encoded bytes) into an HxWx3 uint8 RGB array. The
pipeline, the bag tools and the node all decode through it.
"""

from __future__ import annotations

import cv2
import numpy as np

from dds_perception.utils.errors import DdsPerceptionError

# encoding -> (channels, conversion to RGB or None when already RGB)
RAW_ENCODINGS: dict[str, tuple[int, int | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, cv2.COLOR_BGR2RGB),
    "rgba8": (4, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, cv2.COLOR_BGRA2RGB),
    "mono8": (1, cv2.COLOR_GRAY2RGB),
}
COMPRESSED_ENCODINGS = ("jpeg", "jpg", "png", "compressed")
SUPPORTED_ENCODINGS = (*RAW_ENCODINGS, *COMPRESSED_ENCODINGS)


class ImageDecodeError(DdsPerceptionError, ValueError):
    """A frame cannot be decoded: unknown encoding, wrong step, truncated or empty buffer."""


def channels_of(encoding: str) -> int:
    """Number of channels of a raw ROS encoding."""
    try:
        return RAW_ENCODINGS[encoding][0]
    except KeyError as error:
        raise ImageDecodeError(
            f"unsupported encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        ) from error


def raw_to_array(
    data: bytes | bytearray | memoryview | np.ndarray,
    encoding: str,
    height: int,
    width: int,
    step: int | None = None,
    is_bigendian: bool = False,
) -> np.ndarray:
    """View a raw ROS image buffer as an HxWxC uint8 array, honouring ``step`` (row padding).

    ``is_bigendian`` is irrelevant for the 8-bit encodings supported here and is accepted so the
    signature matches sensor_msgs/Image.
    """
    del is_bigendian  # 8-bit channels: byte order does not apply
    channels = channels_of(encoding)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: height={height} width={width}")
    row = width * channels
    step = row if step is None or step == 0 else int(step)
    if step < row:
        raise ImageDecodeError(
            f"step {step} is smaller than width*channels = {width}*{channels} = {row} ({encoding})"
        )
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    buffer = buffer.reshape(-1)
    need = step * (height - 1) + row
    if buffer.size < need:
        raise ImageDecodeError(
            f"truncated buffer: {buffer.size} bytes for {height} rows of step {step} "
            f"(need at least {need})"
        )
    if buffer.size >= step * height:
        rows = buffer[: step * height].reshape(height, step)
    else:  # last row unpadded
        rows = np.lib.stride_tricks.as_strided(buffer, shape=(height, step), strides=(step, 1))
    return rows[:, :row].reshape(height, width, channels)


def decode_compressed(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode JPEG/PNG bytes to an HxWx3 uint8 RGB array."""
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buffer.size == 0:
        raise ImageDecodeError("empty compressed image buffer")
    bgr = cv2.imdecode(buffer.reshape(-1), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"cannot decode compressed image ({buffer.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_rgb(
    image: np.ndarray | bytes | bytearray | memoryview,
    encoding: str = "rgb8",
    *,
    height: int | None = None,
    width: int | None = None,
    step: int | None = None,
    is_bigendian: bool = False,
) -> np.ndarray:
    """Return an HxWx3 uint8 RGB array from an array, a raw buffer or compressed bytes.

    - ``encoding`` in ``jpeg``/``png``/``compressed``: ``image`` holds encoded bytes.
    - an ndarray: HxW (mono8) or HxWxC in ``encoding``.
    - raw bytes: ``height`` and ``width`` (and optionally ``step``) are required.
    """
    encoding = encoding.lower() if encoding else encoding
    if encoding in COMPRESSED_ENCODINGS or (
        encoding and encoding.split(";")[0].strip() in COMPRESSED_ENCODINGS
    ):
        return decode_compressed(image)
    channels = channels_of(encoding)
    if isinstance(image, np.ndarray) and image.ndim >= 2 and height is None:
        if image.dtype != np.uint8:
            raise ImageDecodeError(f"expected a uint8 array, got {image.dtype}")
        array = image if image.ndim == 3 else image[:, :, None]
        if array.shape[2] != channels:
            raise ImageDecodeError(
                f"array has {array.shape[2]} channels but encoding {encoding!r} has {channels}"
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ImageDecodeError(f"empty image of shape {image.shape}")
    else:
        if height is None or width is None:
            raise ImageDecodeError("a raw buffer needs height and width")
        array = raw_to_array(image, encoding, height, width, step, is_bigendian)
    conversion = RAW_ENCODINGS[encoding][1]
    if conversion is None:
        return np.ascontiguousarray(array)
    return cv2.cvtColor(np.ascontiguousarray(array), conversion)
