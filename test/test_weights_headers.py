"""Headers read by the libraries that own the formats: safetensors metadata, PNG sizes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dds_perception.data.anchor_stats import png_size
from dds_perception.utils.checkpoint import CheckpointError, read_meta, save_weights
from dds_perception.utils.errors import UsageError


def test_read_meta_reads_the_header_only(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", {"a": torch.ones(3)}, {"task": "x", "n": 2})
    meta = read_meta(path)
    assert meta["task"] == "x" and meta["n"] == 2 and meta["format"].startswith("dds_")


def test_saved_weights_are_readable_like_any_new_file(tmp_path):
    """safetensors writes 0600; the atomic rename gives the file the umask's permissions, so a
    node running as another user can read an installed model."""
    path = save_weights(tmp_path / "w.safetensors", {"a": torch.ones(3)}, {"task": "x"})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty", b"", "not a safetensors"),
        ("short", b"\x10\x00\x00", "not a safetensors"),
        ("huge_header", (10**9).to_bytes(8, "little") + b"{}", "not a safetensors"),
        ("json_garbage", (4).to_bytes(8, "little") + b"nope", "not a safetensors"),
    ],
)
def test_read_meta_names_the_file_of_a_bad_header(tmp_path, name, content, message):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{name}\.safetensors.*{message}"):
        read_meta(path)


def test_read_meta_without_our_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2)}, str(plain))  # no metadata at all
    with pytest.raises(CheckpointError, match=r"plain\.safetensors: no 'dds_perception'"):
        read_meta(plain)
    broken = tmp_path / "broken.safetensors"
    save_file({"a": torch.ones(2)}, str(broken), metadata={"dds_perception": "{not json"})
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: unreadable"):
        read_meta(broken)
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(tmp_path / "missing.safetensors")


def test_png_size_from_the_header(tmp_path):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), np.zeros((37, 61, 3), dtype=np.uint8))
    assert png_size(path) == (37, 61)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UsageError, match=r"notes\.png: not a readable image"):
        png_size(text)
