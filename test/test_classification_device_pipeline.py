"""The decoded cache and the batched device augmentation, on CPU tensors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds_perception.data.classification import eval_transform, load_image_folder
from dds_perception.data.device_pipeline import (
    CachedImages,
    CacheSpec,
    DeviceTestBatches,
    DeviceTrainBatches,
    load_cached_images,
    normalize,
    resized_crops,
    sample_resized_crops,
)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the two CDFs)."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, x, side="right") / len(a)
    cdf_b = np.searchsorted(b, x, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _geometry(boxes: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    return {
        "scale": (h * w / (height * width)).numpy(),
        "log_ratio": torch.log(w / h).numpy(),
        "top": (top / (height - h + 1)).numpy(),
        "left": (left / (width - w + 1)).numpy(),
    }


@pytest.mark.parametrize("height,width", [(100, 150), (300, 120), (128, 128), (24, 400)])
def test_crop_boxes_follow_the_cpu_paths_distribution(height: int, width: int) -> None:
    """Seeded crop scales, aspect ratios and positions: the batched sampler against the CPU
    path's own RandomResizedCrop (torchvision v2), two-sample KS statistics. With 20,000 and
    8,000 draws a KS statistic above 0.03 has p < 0.001 under equal distributions; a ratio drawn
    uniformly instead of log-uniformly, say, moves the log-ratio statistic past it."""
    from torchvision.transforms import v2

    mine = sample_resized_crops(
        torch.tensor([[height, width]] * 20000), torch.Generator().manual_seed(0)
    )
    cpu = v2.RandomResizedCrop(32)
    image = torch.zeros(3, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        drawn = [cpu.make_params([image]) for _ in range(8000)]
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in drawn])
    ours, theirs = _geometry(mine, height, width), _geometry(ref, height, width)
    for key in ours:
        assert _ks(ours[key], theirs[key]) < 0.03, key
    assert (mine[:, 2] <= height).all() and (mine[:, 3] <= width).all()
    assert (mine[:, 0] + mine[:, 2] <= height).all() and (mine[:, 1] + mine[:, 3] <= width).all()
    # the centre-crop fallback happens as often (all the time for a 24x400 strip)
    fallback = lambda b: ((b[:, 2] == height) & (b[:, 0] == 0)).double().mean().item()  # noqa: E731
    assert fallback(mine) == pytest.approx(fallback(ref), abs=0.02)


def _packed(images: list[torch.Tensor]) -> CachedImages:
    sizes = torch.tensor([list(image.shape[:2]) for image in images], dtype=torch.int64)
    lengths = sizes[:, 0] * sizes[:, 1] * 3
    return CachedImages(
        CacheSpec("train"),
        torch.cat([image.reshape(-1) for image in images]),
        torch.cumsum(lengths, 0) - lengths,
        sizes,
        torch.arange(len(images)),
        [f"{i}.jpg" for i in range(len(images))],
        {},
    )


def test_device_crops_are_the_cpu_paths_resized_crops() -> None:
    """Enlarged crops equal torchvision's resized_crop up to its uint8 rounding; flips mirror
    them; a shrunk crop of a smooth image stays within a grey level on average."""
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((90, 120), (128, 100))
    ]
    cached = _packed(images)
    boxes = torch.tensor([[10, 5, 60, 70], [3, 7, 100, 90]])
    for flip in (False, True):
        out = resized_crops(
            cached, torch.tensor([0, 1]), boxes, torch.tensor([flip, flip]), 112, region=(100, 90)
        )
        for k, (top, left, h, w) in enumerate(boxes.tolist()):
            chw = images[k].permute(2, 0, 1).contiguous()
            ref = TF.resized_crop(chw, top, left, h, w, [112, 112], antialias=True).float()
            ref = ref.flip(-1) if flip else ref
            assert (out[k] - ref).abs().max() <= 1.01
            assert (out[k] - ref).abs().mean() < 0.5
    yy, xx = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    smooth = (127 + 100 * torch.sin(xx / 13) * torch.cos(yy / 17)).round().to(torch.uint8)
    smooth = torch.stack([smooth, 255 - smooth, smooth // 2], dim=-1)
    out = resized_crops(
        _packed([smooth]),
        torch.tensor([0]),
        torch.tensor([[20, 30, 250, 360]]),
        torch.tensor([False]),
        112,
        region=(250, 360),
    )
    chw = smooth.permute(2, 0, 1).contiguous()
    ref = TF.resized_crop(chw, 20, 30, 250, 360, [112, 112], antialias=True).float()
    assert (out[0] - ref).abs().mean() < 1.0


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 30, (size[1], size[0], 3))
    pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture
def folder_with_a_bad_image(tmp_path: Path) -> Path:
    """Three classes of small JPEGs of several sizes and one truncated JPEG."""
    root = tmp_path / "data"
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for label, colour in enumerate(colours):
        for i in range(4):
            _jpeg(root / f"c{label}" / f"{i}.jpg", colour, (40 + 7 * i, 30 + 5 * label), i)
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buffer, "JPEG", quality=95)
    (root / "c1" / "9_truncated.jpg").write_bytes(buffer.getvalue()[:300])
    return root


def test_cache_is_built_once_checked_and_rebuilt(folder_with_a_bad_image, tmp_path) -> None:
    data = load_image_folder(folder_with_a_bad_image)
    cache_dir = tmp_path / "cache"
    messages: list[str] = []
    spec = CacheSpec("train", short_side=40)
    with pytest.warns(UserWarning, match="unreadable image .*9_truncated"):
        first = load_cached_images(data, spec, cache_dir, threads=2, log=messages.append)
    assert len(messages) == 1 and "decoding 13 train images" in messages[0]
    assert list(first.bad) == ["c1/9_truncated.jpg"]  # skipped and counted
    assert first.good.sum() == 12 and first.pixels.dtype == torch.uint8
    # shorter sides above 40 were resized to 40, the others kept
    heights, widths = first.sizes[first.good].unbind(1)
    assert int(torch.minimum(heights, widths).max()) == 40
    index = data.records.index(next(r for r in data.records if r.path == "c0/0.jpg"))
    h, w = first.sizes[index].tolist()
    start = int(first.offsets[index])
    decoded = np.array(Image.open(folder_with_a_bad_image / "c0/0.jpg").convert("RGB"))
    assert np.array_equal(first.pixels[start : start + h * w * 3].reshape(h, w, 3), decoded)

    with pytest.warns(UserWarning, match="9_truncated"):
        again = load_cached_images(data, spec, cache_dir, log=messages.append)
    assert len(messages) == 1  # read back, not rebuilt
    assert torch.equal(again.pixels, first.pixels) and torch.equal(again.sizes, first.sizes)

    changed = folder_with_a_bad_image / "c2" / "3.jpg"
    _jpeg(changed, (10, 10, 10), (50, 44), 7)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    with pytest.warns(UserWarning, match="9_truncated"):
        rebuilt = load_cached_images(data, spec, cache_dir, log=messages.append)
    assert "no longer matches" in messages[-1] and "c2/3.jpg" in messages[-1]
    assert not torch.equal(rebuilt.pixels, first.pixels)
    # a cache file cut short (a full disk, a killed copy) is rebuilt too
    (cache_file,) = cache_dir.glob("*.safetensors")
    cache_file.write_bytes(cache_file.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="9_truncated"):
        again = load_cached_images(data, spec, cache_dir, log=messages.append)
    assert "unreadable" in messages[-1] and torch.equal(again.pixels, rebuilt.pixels)


def test_cached_test_images_are_the_cpu_paths_test_pixels(folder_with_a_bad_image, tmp_path):
    data = load_image_folder(folder_with_a_bad_image)
    with pytest.warns(UserWarning, match="9_truncated"):
        cached = load_cached_images(
            data, CacheSpec("test", resize=36, size=32), tmp_path / "cache", log=lambda _: None
        )
    transform = eval_transform(32, resize=36)
    batches = list(DeviceTestBatches(cached, batch_size=5))
    images = torch.cat([batch[0] for batch in batches])
    labels = torch.cat([batch[1] for batch in batches])
    assert sum(batch[2] for batch in batches) == 1  # the truncated image: dropped, counted
    assert images.shape == (12, 3, 32, 32)
    good = [r for r in data.records if r.path != "c1/9_truncated.jpg"]
    for k, record in enumerate(good):
        with Image.open(data.root / record.path) as image:
            expected = transform(image.convert("RGB"))
        torch.testing.assert_close(images[k], expected, rtol=0, atol=1e-5)
        assert labels[k] == record.label


def test_device_batches_repeat_per_epoch_and_stand_in_for_bad_images(
    folder_with_a_bad_image, tmp_path
) -> None:
    data = load_image_folder(folder_with_a_bad_image)
    with pytest.warns(UserWarning):
        cached = load_cached_images(
            data, CacheSpec("train"), tmp_path / "cache", log=lambda _: None
        )
    batches = DeviceTrainBatches(cached, batch_size=4, size=24, seed=3, channels_last=True)
    assert len(batches) == 3  # 13 images: the last incomplete batch is dropped

    def epoch(n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        batches.set_epoch(n)
        return list(batches)

    first, again, other = epoch(0), epoch(0), epoch(1)
    for (a, la, ba), (b, lb, bb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and ba == bb
    assert not torch.equal(first[0][0], other[0][0])
    images = first[0][0]
    assert images.shape == (4, 3, 24, 24) and images.is_contiguous(
        memory_format=torch.channels_last
    )
    # the truncated image (c1/9_truncated.jpg) is replaced by the next image, c2/0.jpg
    bad = next(i for i, r in enumerate(data.records) if r.path == "c1/9_truncated.jpg")
    for n in range(4):
        order = batches.order(n)[:12]
        drawn = sum(batch[2] for batch in epoch(n))
        assert drawn == (1 if bad in order else 0)
        labels = torch.cat([batch[1] for batch in epoch(n)])
        expected = [data.records[(i + 1) if i == bad else i].label for i in order]
        assert labels.tolist() == expected
    # the batch is normalised like the CPU path (ImageNet mean/std)
    raw = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert raw[0, :, 0, 0].tolist() == pytest.approx(
        [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    )
