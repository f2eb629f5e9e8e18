"""Backbone classification training on Caltech-101/256 (the paper's Tables 4 and 5).

Shaped like torchvision's ``references/classification``: :func:`get_args_parser`, :func:`main`,
:func:`evaluate`; one training step is :meth:`ClassifierLoop.train_step`, and the epochs around
it are the shared :func:`dds_perception.engine.loop.fit`.

The default recipe is the paper's: batch 512, 300 epochs, initial learning rate 0.045 halved at
epochs 50, 100, 130, 160, 190, 220, 250 and 280 (``MultiStepLR``, gamma 0.5), cross-entropy,
Kaiming initialisation (done by the models). The paper does not name its optimizer; its schedule
is the one of ESPNetv2's ImageNet trainer, which uses SGD with Nesterov momentum 0.9 and weight
decay 4e-5, so that is the default here. Training images: RandomResizedCrop 224 + horizontal flip;
test images: shorter side resized to 256, centre crop 224. 2,000 random images are held out for
testing (seeded; the split is saved as ``split.json`` beside the outputs and reused).

Two pipelines feed the same loop: ``loader`` decodes and augments every image on the CPU in
DataLoader workers; ``device`` decodes the dataset once into a cached uint8 tensor and augments
whole batches on the training device (:mod:`dds_perception.data.device_pipeline`). Several
models can train side by side on one stream of batches (:func:`train_models`), each with its
own optimizer, random stream and run folder, and each ends with exactly the weights it would
have trained alone.

``--batch-size`` is the global batch: under ``torchrun`` each of the N processes takes
``batch_size / N`` images per step. The last incomplete batch of an epoch is dropped (BatchNorm
cannot train on a batch of one). Test accuracy is measured every ``--eval-every-steps`` optimizer
steps (and at the end of every ``--eval-every-epochs``-th epoch), so one run gives one row of the
paper's accuracy-at-N-steps table.

A run folder holds ``args.yaml`` (the resolved arguments), ``split.json``, ``metrics.jsonl``,
``checkpoint.json`` with its part files (written after every ``--checkpoint-every-epochs``-th
epoch, in parts of at most ``--checkpoint-part-mb``, see
:mod:`dds_perception.engine.checkpoint_parts`; ``--resume`` continues from it exactly: model,
optimizer, scheduler, grad scaler, epoch, step and every process's random streams, the model's
own and the data's, including the generator that seeds DataLoader workers), and at the end
``model.safetensors`` (self-describing weights) and ``summary.json``. A run killed mid-epoch
restarts that epoch from the last checkpoint; ``--max-minutes`` ends a run at a checkpoint
before a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from dds_perception.data.classification import (
    CALTECH101_BACKGROUND,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataError,
    ImageClassificationDataset,
    collate_skip_bad,
    eval_transform,
    load_dataset,
    load_or_create_split,
    read_split,
    train_transform,
)
from dds_perception.data.device_pipeline import (
    CacheSpec,
    DeviceTestBatches,
    DeviceTrainBatches,
    load_cached_images,
)
from dds_perception.engine.checkpoint_parts import load_parts, save_parts, saved_epochs
from dds_perception.engine.common import (
    DistributedContext,
    MetricsWriter,
    RecipeOptions,
    TrainingError,
    add_resume_argument,
    add_speed_arguments,
    all_reduce_sum,
    args_to_dict,
    autocast,
    barrier,
    check_resume_matches,
    gather_objects,
    iter_with_progress,
    make_grad_scaler,
    make_run_dir,
    parse_recipe_args,
    prepare_run_dir,
    read_metrics,
    restore_training_state,
    run_distributed,
    wrap_ddp,
    write_args_yaml,
)
from dds_perception.engine.loop import FitOptions, FitState, StepResult, TrainingLoop, fit
from dds_perception.utils.checkpoint import (
    CheckpointError,
    load_state_into,
    load_weights,
    save_weights,
)
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_path, write_json
from dds_perception.utils.io import cache_dir as cache_dir_default
from dds_perception.utils.runtime import resolve_device

PAPER_MILESTONES = (50, 100, 130, 160, 190, 220, 250, 280)
CHECKPOINT = "checkpoint.json"  # the manifest of the checkpoint's part files
WEIGHTS = "model.safetensors"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
PIPELINES = ("loader", "device")
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Arguments that must not change when a run is resumed (they define the network, the data and
# the stream of batches).
RESUME_KEYS = [
    "model",
    "width_mult",
    "dataset",
    "class_names",
    "input_size",
    "split_seed",
    "split_digest",
    "pipeline",
    "seed",
    "batch_size",
]


def _test_size(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"test size must be positive, got {text}")
    return value


def add_data_arguments(options: RecipeOptions) -> None:
    """Dataset options shared by training and the backbone comparison."""
    group = options.group("data")
    group.add_argument("--dataset", choices=DATASETS, default="caltech101", help="layout")
    group.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding 101_ObjectCategories / 256_ObjectCategories / class folders",
    )
    group.add_argument(
        "--drop-background",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Caltech-101 without BACKGROUND_Google (101 classes instead of 102)",
    )
    group.add_argument(
        "--verify-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode every image when scanning and drop unreadable ones up front",
    )
    group.add_argument(
        "--test-size",
        type=_test_size,
        default=2000.0,
        help="held-out test images: a count, or a fraction when below 1",
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split")
    group.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="train/test split JSON to reuse or create (default OUT/split.json)",
    )
    group.add_argument("--input-size", type=int, default=224, help="crop size in pixels")
    group.add_argument(
        "--eval-resize",
        type=int,
        default=None,
        help="shorter side before the test centre crop (default input-size * 256/224)",
    )
    group.add_argument(
        "--pipeline",
        choices=PIPELINES,
        default="loader",
        help="loader: decode and augment every image on the CPU (DataLoader workers); "
        "device: decode once into a cached uint8 tensor, augment batches on the device",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=4,
        help="DataLoader worker processes (device pipeline: threads decoding the cache)",
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder of the decoded caches (device pipeline; default "
        "~/.cache/dds_perception/decoded or $DDS_PERCEPTION_CACHE/decoded)",
    )
    group.add_argument(
        "--cache-short-side",
        type=int,
        default=None,
        help="training images with a longer shorter side are cached resized to it (device "
        "pipeline; default: the test resize, 256 at 224 px; 0: never)",
    )


def add_training_arguments(parser: argparse.ArgumentParser, *, with_model: bool = True) -> None:
    """Every option of the training recipe (the YAML recipe keys are these names)."""
    options = RecipeOptions(parser)
    options.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML recipe (config/train/*.yaml) setting defaults; given options still win",
    )
    if with_model:
        options.add_argument(
            "--model",
            default="dds_mobilenet_v2",
            help="registry name: dds_mobilenet_v2, mobilenet_v1, mobilenet_v2, shufflenet_v1",
        )
    options.add_argument("--width-mult", type=float, default=1.0, help="width multiplier")
    options.add_argument("--out", type=Path, default=None, help="run folder for all outputs")
    add_data_arguments(options)
    group = options.group("recipe (defaults: the paper's)")
    group.add_argument("--epochs", type=int, default=300, help="training epochs")
    group.add_argument("--batch-size", type=int, default=512, help="global batch size")
    group.add_argument("--eval-batch-size", type=int, default=None, help="default: batch size")
    group.add_argument("--lr", type=float, default=0.045, help="initial learning rate")
    group.add_argument(
        "--lr-milestones",
        type=int,
        nargs="*",
        default=list(PAPER_MILESTONES),
        help="epochs at which the learning rate is multiplied by --lr-gamma",
    )
    group.add_argument("--lr-gamma", type=float, default=0.5, help="factor at each milestone")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Nesterov momentum (SGD as ESPNetv2's trainer; the paper names no optimizer)",
    )
    group.add_argument("--weight-decay", type=float, default=4e-5, help="L2 on all weights")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy option")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation/augmentation")
    group = options.group("evaluation, logging, checkpoints")
    group.add_argument(
        "--eval-every-steps",
        type=int,
        default=0,
        help="measure test accuracy every N optimizer steps (0: only at epoch ends)",
    )
    group.add_argument(
        "--eval-every-epochs", type=int, default=1, help="test accuracy every N epochs (0: never)"
    )
    group.add_argument("--log-every-steps", type=int, default=10, help="training metrics period")
    add_resume_argument(group, CHECKPOINT)
    group.add_argument(
        "--checkpoint-every-epochs",
        type=int,
        default=1,
        help="write the checkpoint every N epochs (and after the last one)",
    )
    group.add_argument(
        "--checkpoint-part-mb",
        type=float,
        default=15.0,
        help="largest checkpoint part file in MiB (a device machine returns files <= 16 MB)",
    )
    group.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop at a checkpoint before this many minutes have passed (0: no limit); "
        "--resume continues",
    )
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars"
    )
    group = add_speed_arguments(
        options,
        channels_last_help="channels_last memory format on CUDA (ignored on CPU; default on, "
        "unmeasured)",
        max_steps_help="cap the optimizer steps of an epoch (0: no cap; for smoke tests and "
        "timing)",
        amp_help="mixed precision (--amp-dtype) on CUDA (ignored on CPU)",
    )
    group.add_argument(
        "--amp-dtype",
        choices=tuple(AMP_DTYPES),
        default="bfloat16",
        help="autocast type on CUDA; float16 adds a GradScaler (default bfloat16, unmeasured)",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile each model (CUDA; off by default: unmeasured, minutes to compile)",
    )
    options.show_defaults()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training parser (see :func:`parse_args` for recipe files)."""
    parser = argparse.ArgumentParser(
        description="Train a backbone classifier (the paper's recipe)", add_help=add_help
    )
    add_training_arguments(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` recipe as defaults: what :func:`main` takes."""
    return parse_recipe_args(get_args_parser(), argv)


# ------------------------------------------------------------------------------ building


def build_datasets(
    args: argparse.Namespace, split_path: Path, *, write_split: bool = True
) -> tuple[ImageClassificationDataset, ImageClassificationDataset, ImageClassificationDataset]:
    """Return ``(full, train, test)`` datasets with the run's split and transforms."""
    if args.data_root is None:
        raise UsageError("--data-root is required (the dataset folder)")
    full = load_dataset(
        args.dataset,
        args.data_root,
        drop_background=args.drop_background,
        verify=args.verify_images,
    )
    if full.skipped:
        warnings.warn(
            f"{len(full.skipped)} unreadable image(s) skipped in {full.root}", stacklevel=2
        )
    split = load_or_create_split(
        split_path, full, test_size=args.test_size, seed=args.split_seed, write=write_split
    )
    train = full.subset(
        split.train, transform=train_transform(args.input_size), substitute_bad=True
    )
    test = full.subset(
        split.test,
        transform=eval_transform(args.input_size, resize=args.eval_resize),
        substitute_bad=False,
    )
    return full, train, test


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The registry model for ``args.model`` with ``num_classes`` outputs."""
    from dds_perception.models import get_model

    return get_model(args.model, num_classes=num_classes, width_mult=args.width_mult)


def build_optimizer(
    model: torch.nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov momentum, as ESPNetv2's trainer) and the step schedule of the paper."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.nesterov and args.momentum > 0,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(args.lr_milestones), gamma=args.lr_gamma
    )
    return optimizer, scheduler


def learning_rate_at(args: argparse.Namespace, epoch: int) -> float:
    """The learning rate the recipe uses during ``epoch`` (0-based), computed in closed form."""
    drops = sum(1 for milestone in args.lr_milestones if epoch >= milestone)
    return args.lr * args.lr_gamma**drops


# ------------------------------------------------------------------------------ loops


def _to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_models(
    models: Mapping[str, torch.nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
    ctx: DistributedContext,
    *,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 accuracy (percent) and mean loss of each model on the same test batches
    (one pass over them), summed over processes."""
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    totals = {name: [0.0, 0.0, 0.0] for name in models}  # top-1 hits, top-5 hits, loss sum
    count = bad = 0.0
    for images, labels, n_bad in iter_with_progress(
        batches, enabled=progress and ctx.is_main, desc="test"
    ):
        bad += n_bad
        if labels.numel() == 0:
            continue
        images, labels = _to_device(images, labels, ctx.device, channels_last)
        count += labels.numel()
        for name, model in models.items():
            with autocast(ctx.device, amp, amp_dtype):
                logits = model(images)
            logits = logits.float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
            total = totals[name]
            total[0] += float(hits[:, 0].sum())
            total[1] += float(hits.any(dim=1).sum())
            total[2] += float(F.cross_entropy(logits, labels, reduction="sum"))
    names = list(models)
    summed = all_reduce_sum([v for name in names for v in totals[name]] + [count, bad], ctx)
    count, bad = summed[-2], summed[-1]
    for name, model in models.items():
        model.train(was_training[name])
    if count == 0:
        raise TrainingError("no readable test image: cannot measure accuracy")
    results = {}
    for index, name in enumerate(names):
        correct1, correct5, loss_sum = summed[3 * index : 3 * index + 3]
        results[name] = {
            "top1": 100.0 * correct1 / count,
            "top5": 100.0 * correct5 / count,
            "loss": loss_sum / count,
            "images": int(count),
            "bad_images": int(bad),
        }
    return results


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
    ctx: DistributedContext,
    *,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean loss over ``loader``, summed over processes."""
    results = evaluate_models(
        {"model": model}, loader, ctx, amp=amp, channels_last=channels_last, progress=progress
    )
    return results["model"]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def new_stream(seed: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    """A random stream of its own (CPU and ``device`` generator states) seeded by ``seed``."""
    devices = _rng_devices(device)
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)  # the current device only
        return {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(devices[0]) if devices else None,
        }


@contextlib.contextmanager
def own_stream(stream: dict[str, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the block on ``stream`` (a model's initialisation and dropout, the augmentation of
    the main process) and keep its new state; the process's own streams are left as they were.
    So models trained side by side draw exactly what each would draw alone."""
    devices = _rng_devices(device)
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(stream["cpu"])
        if devices and stream.get("cuda") is not None:
            torch.cuda.set_rng_state(stream["cuda"], devices[0])
        yield
        stream["cpu"] = torch.get_rng_state()
        if devices:
            stream["cuda"] = torch.cuda.get_rng_state(devices[0])


class _InStream:
    """Batches of ``batches`` drawn on the random stream ``stream`` (a loader whose transforms
    run in this process draw from the process's generator)."""

    def __init__(self, batches: Any, stream: dict[str, Any]) -> None:
        self.batches, self.stream = batches, stream

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.batches)
        while True:
            with own_stream(self.stream, torch.device("cpu")):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch


@dataclass
class Member:
    """One model of a run: its network, optimizer, random stream, run folder and records."""

    name: str
    args: argparse.Namespace
    out: Path
    model: torch.nn.Module  # the network itself (its weights are saved)
    forward: torch.nn.Module  # what trains on the batches: the network in DDP / compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    metrics: MetricsWriter
    identity: dict[str, Any]
    stream: dict[str, torch.Tensor | None]  # its initialisation and dropout
    last_eval: dict[str, Any] | None = None


class ClassifierLoop(TrainingLoop):
    """Classification in :func:`~dds_perception.engine.loop.fit`: one SGD step of every member
    on each batch (each model on its own random stream), the step-wise learning-rate schedule
    per epoch, test accuracy of every member on one pass over the test batches, and a
    checkpoint per member in its own run folder."""

    def __init__(
        self,
        *,
        members: list[Member],
        ctx: DistributedContext,
        args: argparse.Namespace,
        train_batches: Any,
        test_batches: Any,
        set_epoch: Callable[[int], None],
        data_stream: dict[str, Any],
        generator: torch.Generator | None,
        amp: bool,
        amp_dtype: torch.dtype,
        channels_last: bool,
    ) -> None:
        self.members, self.ctx, self.args = members, ctx, args
        self.train_batches, self.test_batches, self.set_epoch = (
            train_batches,
            test_batches,
            set_epoch,
        )
        self.data_stream, self.generator = data_stream, generator
        self.amp, self.amp_dtype, self.channels_last = amp, amp_dtype, channels_last

    def _label(self, member: Member) -> str:
        return "" if len(self.members) == 1 else f"{member.name}: "

    def begin_epoch(self, epoch: int) -> Iterable[Any]:
        self.set_epoch(epoch)
        for member in self.members:
            member.forward.train()
        return _InStream(self.train_batches, self.data_stream)

    def train_step(self, batch: Any, *, epoch: int, step: int) -> StepResult:
        images, labels, n_bad = batch
        images, labels = _to_device(images, labels, self.ctx.device, self.channels_last)
        values: dict[str, torch.Tensor] = {}
        counts: dict[str, Any] = {"bad_images": float(n_bad)}
        for member in self.members:
            with own_stream(member.stream, self.ctx.device):
                with autocast(self.ctx.device, self.amp, self.amp_dtype):
                    logits = member.forward(images)
                    loss = F.cross_entropy(
                        logits, labels, label_smoothing=member.args.label_smoothing
                    )
                member.optimizer.zero_grad(set_to_none=True)
                member.scaler.scale(loss).backward()
                member.scaler.step(member.optimizer)
                member.scaler.update()
            values[f"{member.name}/loss"] = loss.detach()
            counts[f"{member.name}/correct"] = logits.detach().argmax(dim=1).eq(labels).sum()
        return StepResult(images=labels.numel(), values=values, counts=counts)

    def learning_rate(self) -> float:
        return self.members[0].optimizer.param_groups[0]["lr"]

    def end_epoch(self, epoch: int) -> None:
        for member in self.members:
            member.scheduler.step()

    def epoch_stats(self, stats: dict[str, float]) -> dict[str, float]:
        for member in self.members:
            correct = stats.pop(f"{member.name}/correct", 0.0)
            stats[f"{member.name}/train_top1"] = 100.0 * correct / max(stats["images"], 1)
        return stats

    def evaluate(self, epoch: int, step: int) -> dict[str, Any]:
        results = evaluate_models(
            {member.name: member.model for member in self.members},
            self.test_batches,
            self.ctx,
            amp=self.amp,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            progress=self.args.progress,
        )
        for member in self.members:
            result = results[member.name]
            member.last_eval = {"type": "eval", "epoch": epoch, "step": step, **result}
            member.metrics.write(member.last_eval)
            if self.ctx.is_main and not self.args.progress:
                print(
                    f"step {step}: {self._label(member)}top1 {result['top1']:.2f}%  "
                    f"top5 {result['top5']:.2f}%"
                )
        return {"type": "eval", "epoch": epoch, "step": step}

    def save(self, *, epoch: int, step: int, last_eval: dict[str, Any] | None) -> None:
        # every process's streams, so each continues its own after --resume
        streams = gather_objects(
            {
                "data": self.data_stream,
                "loader": None if self.generator is None else self.generator.get_state(),
                "models": {member.name: member.stream for member in self.members},
            },
            self.ctx,
        )
        if not self.ctx.is_main:
            return
        for member in self.members:
            state = {
                "model": member.model.state_dict(),
                "optimizer": member.optimizer.state_dict(),
                "scheduler": member.scheduler.state_dict(),
                "scaler": member.scaler.state_dict(),
                "random_streams": [
                    {"data": s["data"], "loader": s["loader"], "model": s["models"][member.name]}
                    for s in streams
                ],
                "epoch": epoch,
                "step": step,
                "last_eval": member.last_eval,
                "identity": {key: member.identity.get(key) for key in RESUME_KEYS},
                "args": args_to_dict(member.args),
            }
            save_parts(
                member.out / CHECKPOINT,
                state,
                epoch=epoch,
                step=step,
                part_bytes=int(self.args.checkpoint_part_mb * 2**20),
            )

    def log(self, record: dict[str, Any]) -> None:
        common = {key: value for key, value in record.items() if "/" not in key}
        for member in self.members:
            prefix = f"{member.name}/"
            own = {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}
            member.metrics.write({**common, **own})
            if record["type"] == "epoch" and self.ctx.is_main and not self.args.progress:
                print(
                    f"epoch {record['epoch']}: {self._label(member)}loss {own['loss']:.4f}, "
                    f"{record['images_per_s']:.1f} img/s"
                )


# ------------------------------------------------------------------------------ main


def make_loaders(
    args: argparse.Namespace,
    train: ImageClassificationDataset,
    test: ImageClassificationDataset,
    ctx: DistributedContext,
    per_rank: int,
) -> tuple[DataLoader, DataLoader, DistributedSampler, torch.Generator]:
    """The CPU path: DataLoaders that decode and augment every image on every epoch."""
    # Seeded per epoch from (seed, epoch): the order does not depend on what ran before.
    sampler = DistributedSampler(
        train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed
    )
    # Seeds the DataLoader workers (one draw per epoch); its state is checkpointed.
    generator = torch.Generator()
    generator.manual_seed(args.seed * 1000 + ctx.rank)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(
        train,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=True,
        collate_fn=collate_skip_bad,
        generator=generator,
        persistent_workers=False,  # workers are re-seeded from `generator` every epoch
    )
    eval_batch = (args.eval_batch_size or args.batch_size) // ctx.world_size
    test_loader = DataLoader(
        test,
        batch_size=max(1, eval_batch),
        sampler=list(range(ctx.rank, len(test), ctx.world_size)),
        num_workers=args.workers,
        pin_memory=pin,
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
    )
    return train_loader, test_loader, sampler, generator


def device_batches(
    args: argparse.Namespace,
    train: ImageClassificationDataset,
    test: ImageClassificationDataset,
    ctx: DistributedContext,
    per_rank: int,
    channels_last: bool,
) -> tuple[DeviceTrainBatches, DeviceTestBatches]:
    """The device path: the decoded cache on the device, augmented there in batches."""
    cache_dir = args.cache_dir or cache_dir_default() / "decoded"
    eval_resize = args.eval_resize or round(args.input_size * 256 / 224)
    short_side = eval_resize if args.cache_short_side is None else args.cache_short_side
    specs = (
        (train, CacheSpec("train", short_side=short_side)),
        (test, CacheSpec("test", resize=eval_resize, size=args.input_size)),
    )
    threads = max(1, args.workers)
    cached = []
    if ctx.is_main:  # one process decodes, the others read its files
        cached = [load_cached_images(d, s, cache_dir, threads=threads) for d, s in specs]
    barrier(ctx)
    if not ctx.is_main:
        cached = [load_cached_images(d, s, cache_dir, threads=threads) for d, s in specs]
    train_images, test_images = (images.to(ctx.device) for images in cached)
    train_batches = DeviceTrainBatches(
        train_images,
        batch_size=per_rank,
        size=args.input_size,
        seed=args.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        channels_last=channels_last,
    )
    eval_batch = (args.eval_batch_size or args.batch_size) // ctx.world_size
    test_batches = DeviceTestBatches(
        test_images,
        batch_size=max(1, eval_batch),
        rank=ctx.rank,
        world_size=ctx.world_size,
        channels_last=channels_last,
    )
    return train_batches, test_batches


def _weights_meta(
    args: argparse.Namespace,
    model: torch.nn.Module,
    class_names: list[str],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    build_args = getattr(model, "build_args", None) or {
        "name": args.model,
        "num_classes": len(class_names),
        "width_mult": args.width_mult,
    }
    return {
        "task": "classification",
        "arch": dict(build_args),
        "class_names": list(class_names),
        "input_size": [args.input_size, args.input_size],
        "eval_resize": args.eval_resize or round(args.input_size * 256 / 224),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "dataset": args.dataset,
        "recipe": {
            "optimizer": "SGD",
            "nesterov": args.nesterov,
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "lr": args.lr,
            "lr_milestones": list(args.lr_milestones),
            "lr_gamma": args.lr_gamma,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "label_smoothing": args.label_smoothing,
            "seed": args.seed,
            "split_seed": args.split_seed,
            "test_size": args.test_size,
            "pipeline": args.pipeline,
            "train_transform": f"RandomResizedCrop({args.input_size}) + HorizontalFlip",
            "test_transform": "Resize + CenterCrop",
        },
        "metrics": metrics,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train with resolved ``args`` (see :func:`parse_args`); return the final summary."""
    return run_distributed(train, args)


def train(
    args: argparse.Namespace, ctx: DistributedContext, *, deadline: float | None = None
) -> dict[str, Any]:
    """Train ``args.model`` in ``args.out`` in the process group of ``ctx``; its summary."""
    split_path = Path(args.split_file) if args.split_file else None
    summaries = train_models(
        args, ctx, {args.model: args.out}, split_path=split_path, deadline=deadline
    )
    return summaries[args.model]


def _split_digest(train: ImageClassificationDataset, test: ImageClassificationDataset) -> str:
    """A short digest of the train/test image lists (a resumed run must use the same)."""
    lists = [[r.path for r in train.records], [r.path for r in test.records]]
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()[:16]


def precision(args: argparse.Namespace, ctx: DistributedContext) -> tuple[bool, torch.dtype, bool]:
    """(autocast on, its dtype, channels_last): the speed options, which apply on CUDA only."""
    cuda = ctx.device.type == "cuda"
    return bool(args.amp) and cuda, AMP_DTYPES[args.amp_dtype], bool(args.channels_last) and cuda


def build_member(
    name: str,
    out: Path,
    args: argparse.Namespace,
    ctx: DistributedContext,
    num_classes: int,
    data_identity: Mapping[str, Any],
) -> Member:
    """Model ``name`` of a run, initialised on its own random stream seeded by ``args.seed``
    (so its weights are those of the model trained alone), on ``ctx.device``, with its SGD
    optimizer, schedule, grad scaler and metrics file in ``out``."""
    amp, amp_dtype, channels_last = precision(args, ctx)
    member_args = copy.copy(args)
    member_args.model, member_args.out = name, out
    stream = new_stream(args.seed, ctx.device)
    with own_stream(stream, ctx.device):
        model = build_model(member_args, num_classes)
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = wrap_ddp(model, ctx)
    if args.compile:
        forward = torch.compile(forward)
    optimizer, scheduler = build_optimizer(model, member_args)
    return Member(
        name=name,
        args=member_args,
        out=out,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=make_grad_scaler(ctx.device, amp, amp_dtype),
        metrics=MetricsWriter(out / METRICS, enabled=ctx.is_main),
        identity={**vars(member_args), **data_identity},
        stream=stream,
    )


def _resume_members(
    members: list[Member],
    paths: dict[str, Path],
    ctx: DistributedContext,
    data_stream: dict[str, Any],
    generator: torch.Generator | None,
) -> FitState:
    """Load every member's checkpoint at the last epoch they all have; return where they are."""
    epochs = {m.name: saved_epochs(paths[m.name]) for m in members}
    common = min(found[0] for found in epochs.values())
    states = {}
    for member in members:
        if common not in epochs[member.name]:
            raise TrainingError(
                f"cannot resume {member.out} with the others: it holds checkpoints after "
                f"epochs {epochs[member.name]}, the others are after epoch {common}"
            )
        path = paths[member.name]
        state = load_parts(path, epoch=common)
        check_resume_matches(state["identity"], member.identity, RESUME_KEYS, path)
        restore_training_state(
            state,
            model=member.model,
            optimizer=member.optimizer,
            scheduler=member.scheduler,
            scaler=member.scaler,
        )
        member.last_eval = state.get("last_eval")
        states[member.name] = state
    steps = {name: state["step"] for name, state in states.items()}
    if len(set(steps.values())) != 1:
        raise TrainingError(f"cannot resume side by side: the members are at steps {steps}")
    first = states[members[0].name]
    streams = first["random_streams"]
    if len(streams) != ctx.world_size:
        warnings.warn(
            f"{paths[members[0].name]} was written by {len(streams)} process(es), this run has "
            f"{ctx.world_size}: training goes on, but its random streams differ from an "
            "uninterrupted run's",
            stacklevel=3,
        )
    else:
        mine = streams[ctx.rank]
        data_stream.update(mine["data"])
        if generator is not None and mine["loader"] is not None:
            generator.set_state(mine["loader"])
        for member in members:
            saved = states[member.name]["random_streams"][ctx.rank]["model"]
            member.stream["cpu"] = saved["cpu"]
            if saved.get("cuda") is not None and ctx.device.type == "cuda":
                member.stream["cuda"] = saved["cuda"]
    step = first["step"]
    for member in members:
        member.metrics.truncate_after(step)
    if ctx.is_main:
        names = (
            ", ".join(m.name for m in members) if len(members) > 1 else str(paths[members[0].name])
        )
        print(f"resumed {names}: epoch {common}, step {step}")
    last = members[0].last_eval
    return FitState(epoch=common, step=step, last_eval=None if last is None else dict(last))


def train_models(
    args: argparse.Namespace,
    ctx: DistributedContext,
    runs: Mapping[str, str | os.PathLike[str]],
    *,
    split_path: Path | None = None,
    deadline: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the models ``runs`` names (registry name -> run folder) on one stream of batches,
    side by side in this process group, each with its own optimizer, random stream, checkpoint
    and records in its own folder; return each one's summary.

    Every model gets exactly the batches and the weights it would get trained alone with the
    same ``args`` (tested): the batches depend only on the seed and the epoch, each model's
    initialisation and dropout draw from its own stream seeded with ``args.seed``. ``deadline``
    (``time.monotonic()``; else ``--max-minutes`` from now) stops training at a checkpoint.
    """
    if args.max_minutes and deadline is None:
        deadline = time.monotonic() + 60.0 * args.max_minutes
    prepared = {
        name: prepare_run_dir(out, args.resume, checkpoint=CHECKPOINT, weights=WEIGHTS)
        for name, out in runs.items()
    }
    resuming = {name for name, (_, path) in prepared.items() if path is not None}
    if resuming and len(resuming) != len(prepared):
        raise TrainingError(f"cannot resume some models and start others: {sorted(resuming)}")
    first_out = next(iter(prepared.values()))[0]
    for out, _ in prepared.values():
        make_run_dir(out, ctx)
    split_file = split_path or first_out / SPLIT
    full, train_set, test_set = build_datasets(args, split_file, write_split=ctx.is_main)
    class_names = list(full.class_names)
    data_identity = {
        "class_names": class_names,
        "split_digest": _split_digest(train_set, test_set),
    }

    if args.batch_size % ctx.world_size:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by {ctx.world_size} processes"
        )
    per_rank = args.batch_size // ctx.world_size
    if math.ceil(len(train_set) / ctx.world_size) < per_rank:
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images "
            "(the last incomplete batch is dropped, so no step would run)"
        )
    amp, amp_dtype, channels_last = precision(args, ctx)
    members = [
        build_member(name, out, args, ctx, len(class_names), data_identity)
        for name, (out, _) in prepared.items()
    ]

    # the augmentation of a loader without workers draws from this process's stream
    data_stream = new_stream(args.seed * 1000 + ctx.rank + 1, torch.device("cpu"))
    generator: torch.Generator | None = None
    if args.pipeline == "device":
        train_batches, test_batches = device_batches(
            args, train_set, test_set, ctx, per_rank, channels_last
        )
        set_epoch = train_batches.set_epoch
    else:
        train_batches, test_batches, sampler, generator = make_loaders(
            args, train_set, test_set, ctx, per_rank
        )
        set_epoch = sampler.set_epoch

    start = FitState()
    if resuming:
        paths = {name: path for name, (_, path) in prepared.items()}
        start = _resume_members(members, paths, ctx, data_stream, generator)
    for member in members:
        write_args_yaml(member.out, member.args, ctx)

    loop = ClassifierLoop(
        members=members,
        ctx=ctx,
        args=args,
        train_batches=train_batches,
        test_batches=test_batches,
        set_epoch=set_epoch,
        data_stream=data_stream,
        generator=generator,
        amp=amp,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
    )
    options = FitOptions.from_args(args, final_eval=True, deadline=deadline)
    finished = fit(loop, options, ctx, start)
    summaries = {}
    for member in members:
        summary: dict[str, Any] = {
            "model": member.name,
            "dataset": args.dataset,
            "num_classes": len(class_names),
            "train_images": len(train_set),
            "test_images": len(test_set),
            "skipped_images": len(full.skipped),
            "epochs": args.epochs,
            "epochs_done": finished.epoch,
            "steps": finished.step,
            "parameters": sum(p.numel() for p in member.model.parameters()),
            "stopped": finished.stopped,
        }
        if member.last_eval is not None:
            summary.update(
                top1=member.last_eval["top1"],
                top5=member.last_eval["top5"],
                test_loss=member.last_eval["loss"],
            )
        summaries[member.name] = summary
        if not ctx.is_main:
            continue
        if finished.stopped:
            print(
                f"stopped before the time limit: {member.name} after epoch {finished.epoch} "
                f"(step {finished.step}); continue with --resume ({member.out / CHECKPOINT})"
            )
            continue
        summary["weights"] = str(member.out / WEIGHTS)
        meta = _weights_meta(member.args, member.model, class_names, summary)
        save_weights(member.out / WEIGHTS, member.model.state_dict(), meta)
        write_json(member.out / "summary.json", summary)
        print(
            f"done: {member.name} on {args.dataset}, {finished.step} steps, "
            f"top1 {summary['top1']:.2f}%, top5 {summary['top5']:.2f}% -> {member.out / WEIGHTS}"
        )
    return summaries


# ------------------------------------------------------------------------------ evaluation


def evaluate_weights(
    weights: str | os.PathLike[str],
    *,
    dataset: str,
    data_root: str | os.PathLike[str],
    split_file: str | os.PathLike[str] | None = None,
    drop_background: bool | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 of a classification weights file on the test images of a saved split."""
    from dds_perception.models import get_model

    weights = Path(weights)
    state_dict, meta = load_weights(weights)
    if meta.get("task") != "classification":
        raise CheckpointError(f"{weights}: not classification weights (task {meta.get('task')!r})")
    class_names = list(meta["class_names"])
    if drop_background is None:
        drop_background = dataset == "caltech101" and CALTECH101_BACKGROUND not in class_names
    full = load_dataset(dataset, data_root, drop_background=drop_background)
    if list(full.class_names) != class_names:
        raise ClassificationDataError(
            f"{full.root}: its {full.num_classes} classes differ from the {len(class_names)} "
            f"classes {weights} was trained on"
        )
    split_path = Path(split_file) if split_file else weights.parent / SPLIT
    split = read_split(split_path)
    size = int(meta["input_size"][0])
    norm = meta.get("normalization", {})
    transform = eval_transform(
        size,
        resize=meta.get("eval_resize"),
        mean=norm.get("mean", IMAGENET_MEAN),
        std=norm.get("std", IMAGENET_STD),
    )
    test = full.subset(split.test, transform=transform, substitute_bad=False)
    model = get_model(**meta["arch"])
    load_state_into(model, state_dict, source=weights)
    ctx = DistributedContext(device=resolve_device(device))
    loader = DataLoader(
        test,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        collate_fn=collate_skip_bad,
    )
    result = evaluate(model.to(ctx.device), loader, ctx, progress=progress)
    return {
        "weights": str(weights),
        "model": meta["arch"].get("name"),
        "dataset": dataset,
        "split_file": str(split_path),
        **result,
    }


# ------------------------------------------------------------------------------ reports


def eval_records(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The test-accuracy records of a run, one per step (the latest wins), by step."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} in run folder {run_dir}")
    by_step = {int(r["step"]): r for r in read_metrics(path) if r.get("type") == "eval"}
    return [by_step[s] for s in sorted(by_step)]


def run_label(run_dir: str | os.PathLike[str]) -> str:
    """A run's model name from its args.yaml (with the folder name when it differs)."""
    name = Path(run_dir).resolve().name
    args_file = Path(run_dir) / "args.yaml"
    if args_file.is_file():
        data = yaml.safe_load(args_file.read_text(encoding="utf-8")) or {}
        model = str(data.get("model") or "")
        if model:
            return model if model == name else f"{model} ({name})"
    return name


def plot_accuracy(
    runs: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    metric: str = "top1",
    title: str | None = None,
) -> Path:
    """Draw test accuracy against optimizer steps, one line per run; write a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run in runs:
        records = eval_records(run)
        if not records:
            raise UsageError(f"{run}: no test-accuracy records in {METRICS} yet")
        ax.plot(
            [r["step"] for r in records],
            [r[metric] for r in records],
            marker="o",
            markersize=3,
            label=run_label(run),
        )
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"test {metric} accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    final = Path(out)
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return final
