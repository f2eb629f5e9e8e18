"""Classification data decoded once into a tensor cache and augmented in batches on the device.

The CPU path (:mod:`dds_perception.data.classification`) decodes and augments every JPEG on
every epoch; on a large GPU that caps training far below what the network can take. Here:

- **Decode once.** :func:`load_cached_images` decodes a list of images (with PIL and the RGB
  conversion of the CPU path) into one uint8 tensor file, a safetensors file in a cache folder.
  Training images keep their size (images whose shorter side exceeds ``short_side`` are first
  resized to it, with the CPU path's antialiased resize), packed one after another as HWC rows;
  test images are stored after the CPU path's own ``Resize`` + ``CenterCrop``, so evaluation
  sees the very pixels the CPU path feeds the network. The file records every source file's
  size and modification time and is rebuilt, with a message, when they no longer match. A file
  that fails to decode is left out and reported as today (a warning, ``bad_images``).
- **Augment on the device.** :class:`DeviceTrainBatches` draws each batch's
  ``RandomResizedCrop`` boxes and flips on the CPU with the algorithm and defaults of
  torchvision's ``RandomResizedCrop`` (scale 0.08-1, ratio 3/4-4/3, ten tries, then the centre
  crop), from a generator seeded by (seed, epoch, rank), so a resumed epoch repeats exactly; it
  then gathers each crop (mirrored when flipped) from the cache on the device in one indexing
  operation and resizes all crops at once with ``torchvision.ops.roi_align`` (``aligned=True``:
  the half-pixel sampling of bilinear resize, edges repeated as the CPU path's resize does),
  then normalises. When a crop is enlarged (always the case for the 128-px Caltech-101 copy at
  224 px) the pixels match the CPU path's up to its uint8 rounding; when it is shrunk,
  ``roi_align`` averages a grid of samples per output pixel where torchvision uses an
  antialiasing triangle filter: close, not equal.
- Everything runs on CPU tensors too (that is how it is tested).

The order of images in an epoch is the CPU path's: ``DistributedSampler``'s permutation from
(seed, epoch). The random numbers of the crops differ from the CPU path's, the distributions do
not (tested).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dds_perception.data.classification import (
    DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataError,
    ImageClassificationDataset,
    eval_crop_transform,
)
from dds_perception.utils.io import atomic_path

CACHE_FORMAT = "dds_perception.decoded/1"
META_KEY = "dds_perception.decoded"
MAX_BAD_IN_A_ROW = 16  # as the CPU path: more unreadable images in a row end the run


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: training images (shorter side at most ``short_side``, 0: as they
    are) or test images (``Resize(resize)`` + ``CenterCrop(size)``)."""

    role: str  # "train" or "test"
    short_side: int = 0
    resize: int = 0
    size: int = 0

    def tag(self) -> str:
        if self.role == "train":
            return f"train-s{self.short_side}"
        return f"test-r{self.resize}-c{self.size}"


@dataclass
class CachedImages:
    """Decoded images: ``pixels`` packs training images as HWC rows (``offsets`` in bytes,
    ``sizes`` = (h, w)); test images are one ``(n, 3, size, size)`` tensor. Unreadable images
    have size (0, 0) and are named in ``bad`` (path -> why)."""

    spec: CacheSpec
    pixels: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    bad: dict[str, str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def good(self) -> torch.Tensor:
        """Boolean mask of the readable images."""
        return self.sizes[:, 0] > 0

    def to(self, device: torch.device | str) -> CachedImages:
        """The same images with the tensors on ``device`` (``sizes`` stay on the CPU too)."""
        return CachedImages(
            self.spec,
            self.pixels.to(device),
            self.offsets.to(device),
            self.sizes.to(device),
            self.labels.to(device),
            self.paths,
            self.bad,
        )


# ------------------------------------------------------------------------------------ the cache


def _fingerprint(dataset: ImageClassificationDataset) -> list[list[Any]]:
    """(path, label, size, mtime_ns) of every image, the identity a cache is checked against."""
    rows = []
    for record in dataset.records:
        try:
            stat = (dataset.root / record.path).stat()
        except OSError as error:
            raise ClassificationDataError(
                f"image listed for caching is gone: {dataset.root / record.path}"
            ) from error
        rows.append([record.path, record.label, stat.st_size, stat.st_mtime_ns])
    return rows


def cache_path(cache_dir: Path, dataset: ImageClassificationDataset, spec: CacheSpec) -> Path:
    """Where the cache of ``dataset`` (these images of this root) with ``spec`` lives."""
    key = json.dumps(
        [str(dataset.root.resolve()), [[r.path, r.label] for r in dataset.records]]
    ).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return Path(cache_dir) / f"{dataset.name}-{spec.tag()}-{len(dataset)}-{digest}.safetensors"


def _decode(path: Path) -> np.ndarray:
    """The CPU path's decoding: the whole file, converted to RGB, as HWC uint8."""
    with Image.open(path) as image:
        image.load()
        return np.array(image.convert("RGB"))


def _prepare(spec: CacheSpec) -> Callable[[np.ndarray], torch.Tensor]:
    """HWC uint8 -> the cached form (train: HWC, shorter side capped; test: CHW crop)."""
    from torchvision.transforms.v2 import functional as TF

    if spec.role == "test":
        crop = eval_crop_transform(spec.size, resize=spec.resize)
        return lambda hwc: crop(torch.from_numpy(hwc).permute(2, 0, 1).contiguous())

    def train(hwc: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(hwc)
        if spec.short_side and min(hwc.shape[:2]) > spec.short_side:
            chw = TF.resize(
                tensor.permute(2, 0, 1).contiguous(), [spec.short_side], antialias=True
            )
            tensor = chw.permute(1, 2, 0)
        return tensor.contiguous()

    return train


def build_cache(
    dataset: ImageClassificationDataset,
    spec: CacheSpec,
    path: Path,
    *,
    fingerprint: list[list[Any]] | None = None,
    threads: int = 8,
) -> CachedImages:
    """Decode every image of ``dataset`` once and write the cache file ``path`` atomically."""
    fingerprint = _fingerprint(dataset) if fingerprint is None else fingerprint
    prepare = _prepare(spec)

    def load(index: int) -> torch.Tensor | str:
        file = dataset.root / dataset.records[index].path
        try:
            return prepare(_decode(file))
        except DECODE_ERRORS as error:
            return str(error) or type(error).__name__

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        decoded = list(pool.map(load, range(len(dataset))))
    bad: dict[str, str] = {}
    for record, item in zip(dataset.records, decoded, strict=True):
        if isinstance(item, str):
            warnings.warn(
                f"skipping unreadable image {dataset.root / record.path}: {item}", stacklevel=2
            )
            bad[record.path] = item
    labels = torch.tensor([record.label for record in dataset.records], dtype=torch.int64)
    if spec.role == "test":
        blank = torch.zeros(3, spec.size, spec.size, dtype=torch.uint8)
        pixels = torch.stack([blank if isinstance(t, str) else t for t in decoded])
        sizes = torch.tensor(
            [[0, 0] if isinstance(t, str) else [spec.size, spec.size] for t in decoded],
            dtype=torch.int64,
        ).reshape(-1, 2)
        offsets = torch.zeros(len(decoded), dtype=torch.int64)
    else:
        shapes = [(0, 0) if isinstance(t, str) else tuple(t.shape[:2]) for t in decoded]
        sizes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
        lengths = sizes[:, 0] * sizes[:, 1] * 3
        offsets = torch.cumsum(lengths, 0) - lengths
        pixels = torch.cat(
            [t.reshape(-1) for t in decoded if not isinstance(t, str)]
            or [torch.empty(0, dtype=torch.uint8)]
        )
    meta = {
        "format": CACHE_FORMAT,
        "spec": vars(spec),
        "root": str(dataset.root.resolve()),
        "records": fingerprint,
        "bad": bad,
    }
    tensors = {"pixels": pixels, "offsets": offsets, "sizes": sizes, "labels": labels}
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return CachedImages(
        spec, pixels, offsets, sizes, labels, [r.path for r in dataset.records], bad
    )


def _stale_reason(
    meta: dict[str, Any], spec: CacheSpec, root: Path, fingerprint: list[list[Any]]
) -> str | None:
    """Why a cache's header no longer describes these images (``None``: it does)."""
    if meta.get("format") != CACHE_FORMAT:
        return f"format {meta.get('format')!r}, want {CACHE_FORMAT}"
    if meta.get("spec") != vars(spec):
        return f"made for {meta.get('spec')}, want {vars(spec)}"
    if meta.get("root") != str(root.resolve()):
        return f"made from {meta.get('root')}"
    saved = meta.get("records") or []
    if len(saved) != len(fingerprint) or [r[:2] for r in saved] != [r[:2] for r in fingerprint]:
        return "it lists other images"
    changed = [now[0] for old, now in zip(saved, fingerprint, strict=True) if old != now]
    if changed:
        return f"{len(changed)} image file(s) changed size or time since (first: {changed[0]})"
    return None


def load_cached_images(
    dataset: ImageClassificationDataset,
    spec: CacheSpec,
    cache_dir: str | os.PathLike[str],
    *,
    threads: int = 8,
    log: Callable[[str], None] = print,
) -> CachedImages:
    """The images of ``dataset`` as a decoded cache: read from ``cache_dir`` when it still
    matches the source files (sizes and modification times), else (re)built there."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = cache_path(Path(cache_dir), dataset, spec)
    fingerprint = _fingerprint(dataset)
    if path.is_file():
        tensors: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get(META_KEY, "{}"))
            reason = _stale_reason(meta, spec, dataset.root, fingerprint)
            if reason is None:
                tensors = load_file(str(path))
        except (SafetensorError, OSError, json.JSONDecodeError) as error:
            reason = f"unreadable ({error})"
        if reason is None:
            for item in meta["bad"]:
                warnings.warn(f"skipping unreadable image {dataset.root / item}", stacklevel=2)
            return CachedImages(
                spec,
                tensors["pixels"],
                tensors["offsets"],
                tensors["sizes"],
                tensors["labels"],
                [record.path for record in dataset.records],
                dict(meta["bad"]),
            )
        log(f"decoded cache {path} no longer matches the data ({reason}): rebuilding it")
    else:
        log(f"decoding {len(dataset)} {spec.role} images of {dataset.root} once into {path}")
    return build_cache(dataset, spec, path, fingerprint=fingerprint, threads=threads)


# ------------------------------------------------------------------------------- augmentation


def sample_resized_crops(
    sizes: torch.Tensor,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    tries: int = 10,
) -> torch.Tensor:
    """``RandomResizedCrop`` boxes ``(top, left, height, width)`` for images of ``sizes``
    (``(n, 2)`` heights and widths), drawn for all images at once with torchvision's algorithm:
    up to ``tries`` draws of area fraction (uniform in ``scale``) and aspect ratio (log-uniform
    in ``ratio``), the first that fits, at a uniform position; else the centre crop of the
    image's shape clamped to ``ratio``."""
    n = sizes.shape[0]
    height = sizes[:, 0].to(torch.float64)
    width = sizes[:, 1].to(torch.float64)
    area = (height * width)[:, None]
    u_scale = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    h = h.gather(1, first)[:, 0]
    w = w.gather(1, first)[:, 0]
    # the fallback: the whole image, its shape clamped to the ratio range, centred
    in_ratio = width / height.clamp(min=1)
    fh = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    fw = torch.where(
        in_ratio < min(ratio),
        width,
        torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width),
    )
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    u_top, u_left = torch.rand(2, n, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(u_top * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u_left * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resized_crops(
    images: CachedImages,
    rows: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    *,
    region: tuple[int, int],
) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w; on the images' device) out of training images ``rows``,
    mirror those with ``flips``, resize each to ``size`` x ``size``: float, 0-255, NCHW.

    ``region`` is (max h, max w) of the boxes, known on the host so nothing waits for the
    device. Each crop is gathered into a ``region``-sized tensor (its last row and column
    repeated beyond the crop), then ``roi_align`` resizes every crop in one call."""
    from torchvision.ops import roi_align

    device = images.pixels.device
    top, left, h, w = boxes.unbind(1)
    rh, rw = region
    ys = torch.minimum(torch.arange(rh, device=device)[None, :], h[:, None] - 1) + top[:, None]
    xs = torch.minimum(torch.arange(rw, device=device)[None, :], w[:, None] - 1)
    xs = torch.where(flips[:, None], w[:, None] - 1 - xs, xs) + left[:, None]
    widths = images.sizes[rows, 1]
    starts = images.offsets[rows] // 3
    index = starts[:, None, None] + ys[:, :, None] * widths[:, None, None] + xs[:, None, :]
    gathered = images.pixels.view(-1, 3)[index]  # (n, rh, rw, 3) uint8
    crops = gathered.permute(0, 3, 1, 2).to(torch.float32)
    rois = torch.zeros(rows.shape[0], 5, dtype=torch.float32, device=device)
    rois[:, 0] = torch.arange(rows.shape[0], device=device, dtype=torch.float32)
    rois[:, 3] = w.to(torch.float32)
    rois[:, 4] = h.to(torch.float32)
    return roi_align(crops, rois, (size, size), spatial_scale=1.0, aligned=True)


def normalize(
    pixels: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = IMAGENET_MEAN,
    std: Sequence[float] | torch.Tensor = IMAGENET_STD,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """0-255 pixels (uint8 or float, NCHW) -> normalised float32, as the CPU path's
    ``ToDtype(scale=True)`` + ``Normalize``. ``mean``/``std`` may be tensors on the device
    already (no copy from the host per batch, which would wait for the device)."""
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(shape)
    # (x / 255 - mean) / std as x * (1 / (255 std)) - mean / std: two passes, one new tensor
    out = pixels.to(torch.float32).mul(1.0 / (255.0 * std_t)).add_(-mean_t / std_t)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (the epoch's stream depends on seed, epoch and rank only)."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def substitutes(good: Sequence[bool], paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the one trained in its place and how many unreadable ones that skips:
    itself and 0, or (as the CPU path does) the next readable one in the list."""
    n = len(good)
    rows = torch.empty(n, dtype=torch.int64)
    skipped = torch.empty(n, dtype=torch.int64)
    for index in range(n):
        for n_bad in range(min(n, MAX_BAD_IN_A_ROW)):
            if good[(index + n_bad) % n]:
                rows[index], skipped[index] = (index + n_bad) % n, n_bad
                break
        else:
            raise ClassificationDataError(
                f"{MAX_BAD_IN_A_ROW} unreadable images in a row from {paths[index]}"
            )
    return rows, skipped


class DeviceTrainBatches:
    """The training batches of one process, augmented on the device of ``images``.

    Each epoch visits ``DistributedSampler``'s permutation of the images from (seed, epoch),
    this process's share, in batches of ``batch_size`` (the last incomplete batch dropped).
    Yields ``(images, labels, n_bad)`` like the CPU path's loader.
    """

    def __init__(
        self,
        images: CachedImages,
        *,
        batch_size: int,
        size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = False,
        chunk: int = 128,
    ) -> None:
        self.images = images
        self.host_sizes = images.sizes.cpu()
        self.rows, self.skipped = substitutes((self.host_sizes[:, 0] > 0).tolist(), images.paths)
        self.batch_size, self.size, self.seed = batch_size, size, seed
        self.rank, self.world_size = rank, world_size
        device = images.pixels.device
        self.scale, self.ratio = scale, ratio
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.channels_last, self.chunk = channels_last, max(1, chunk)
        self.epoch = 0

    def order(self, epoch: int) -> list[int]:
        """This process's images of ``epoch``, in order (``DistributedSampler``'s)."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            range(len(self.images)),  # type: ignore[arg-type]
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=self.seed,
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        order = torch.tensor(self.order(self.epoch), dtype=torch.int64)
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank))
        device = self.images.pixels.device
        pin = device.type == "cuda"
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            picked = order[start : start + self.batch_size]
            rows = self.rows[picked]
            n_bad = int(self.skipped[picked].sum())
            boxes = sample_resized_crops(
                self.host_sizes[rows], generator, scale=self.scale, ratio=self.ratio
            )
            flips = torch.rand(rows.shape[0], generator=generator) < 0.5
            plan = torch.cat([rows[:, None], boxes, flips[:, None].to(torch.int64)], dim=1)
            if pin:
                plan = plan.pin_memory()
            plan = plan.to(device, non_blocking=True)
            pieces = []
            for lo in range(0, rows.shape[0], self.chunk):
                part = plan[lo : lo + self.chunk]
                host = boxes[lo : lo + self.chunk]
                region = (int(host[:, 2].max()), int(host[:, 3].max()))
                crops = resized_crops(
                    self.images,
                    part[:, 0],
                    part[:, 1:5],
                    part[:, 5].bool(),
                    self.size,
                    region=region,
                )
                pieces.append(crops)
            batch = normalize(
                torch.cat(pieces), self.mean, self.std, channels_last=self.channels_last
            )
            yield batch, self.images.labels[plan[:, 0]], n_bad


class DeviceTestBatches:
    """The test images of this process (every ``world_size``-th from ``rank``), normalised on
    the device, in batches; unreadable ones are dropped and counted like the CPU path's."""

    def __init__(
        self,
        images: CachedImages,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = False,
    ) -> None:
        self.images = images
        self.batch_size = max(1, batch_size)
        self.mine = list(range(rank, len(images), world_size))
        self.good = images.good.cpu()
        device = images.pixels.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return math.ceil(len(self.mine) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        device = self.images.pixels.device
        for start in range(0, len(self.mine), self.batch_size):
            picked = torch.tensor(self.mine[start : start + self.batch_size], dtype=torch.int64)
            keep = picked[self.good[picked]]
            n_bad = int(picked.shape[0] - keep.shape[0])
            keep = keep.to(device)
            pixels = normalize(
                self.images.pixels[keep], self.mean, self.std, channels_last=self.channels_last
            )
            yield pixels, self.images.labels[keep], n_bad
