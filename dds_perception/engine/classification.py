"""Backbone classification training on Caltech-101/256 (the paper's Tables 4 and 5).

Shaped like torchvision's ``references/classification``: :func:`get_args_parser`, :func:`main`,
:func:`train_one_epoch`, :func:`evaluate`.

The default recipe is the paper's: batch 512, 300 epochs, initial learning rate 0.045 halved at
epochs 50, 100, 130, 160, 190, 220, 250 and 280 (``MultiStepLR``, gamma 0.5), cross-entropy,
Kaiming initialisation (done by the models). The paper does not name its optimizer; its schedule
is the one of ESPNetv2's ImageNet trainer, which uses SGD with Nesterov momentum 0.9 and weight
decay 4e-5, so that is the default here. Training images: RandomResizedCrop 224 + horizontal flip;
test images: shorter side resized to 256, centre crop 224. 2,000 random images are held out for
testing (seeded; the split is saved as ``split.json`` beside the outputs and reused).

``--batch-size`` is the global batch: under ``torchrun`` each of the N processes takes
``batch_size / N`` images per step. The last incomplete batch of an epoch is dropped (BatchNorm
cannot train on a batch of one). Test accuracy is measured every ``--eval-every-steps`` optimizer
steps (and at the end of every ``--eval-every-epochs``-th epoch), so one run gives one row of the
paper's accuracy-at-N-steps table.

A run folder holds ``args.yaml`` (the resolved arguments), ``split.json``, ``metrics.jsonl``,
``checkpoint.pt`` (written atomically after every epoch; ``--resume`` continues from it exactly:
model, optimizer, scheduler, grad scaler, epoch, step and every process's RNG states, including the
generator that seeds its DataLoader workers), and at the end ``model.safetensors``
(self-describing weights) and ``summary.json``. A run killed mid-epoch restarts that epoch from
the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
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
from dds_perception.engine.common import (
    DistributedContext,
    MetricsWriter,
    RecipeOptions,
    TrainingError,
    add_resume_argument,
    add_speed_arguments,
    all_reduce_sum,
    autocast,
    barrier,
    check_finite,
    close_bar,
    gather_random_streams,
    iter_with_progress,
    make_grad_scaler,
    make_run_dir,
    parse_recipe_args,
    prepare_run_dir,
    read_metrics,
    resume_run,
    run_distributed,
    save_checkpoint,
    training_checkpoint,
    wrap_ddp,
    write_args_yaml,
)
from dds_perception.utils.checkpoint import (
    CheckpointError,
    load_state_into,
    load_weights,
    save_weights,
)
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_path, write_json
from dds_perception.utils.runtime import resolve_device, seed_everything

PAPER_MILESTONES = (50, 100, 130, 160, 190, 220, 250, 280)
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
# Arguments that must not change when a run is resumed (they define the network and the data).
RESUME_KEYS = ["model", "width_mult", "dataset", "class_names", "input_size", "split_seed"]


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
    group.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")


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
    add_resume_argument(group)
    group.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars"
    )
    add_speed_arguments(
        options,
        channels_last_help="channels_last memory format on CUDA (ignored on CPU)",
        max_steps_help="cap the optimizer steps of an epoch (0: no cap; for smoke tests and "
        "timing)",
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
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    ctx: DistributedContext,
    *,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean loss over ``loader``, summed over processes."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = bad = 0.0
    batches = iter_with_progress(loader, enabled=progress and ctx.is_main, desc="test")
    for images, labels, n_bad in batches:
        bad += n_bad
        if labels.numel() == 0:
            continue
        images, labels = _to_device(images, labels, ctx.device, channels_last)
        with autocast(ctx.device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        count += labels.numel()
    correct1, correct5, loss_sum, count, bad = all_reduce_sum(
        [correct1, correct5, loss_sum, count, bad], ctx
    )
    model.train(was_training)
    if count == 0:
        raise TrainingError("no readable test image: cannot measure accuracy")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "bad_images": int(bad),
    }


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    ctx: DistributedContext,
    *,
    epoch: int,
    step: int,
    scaler: torch.amp.GradScaler,
    amp: bool = False,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
    max_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
    metrics: MetricsWriter | None = None,
    log_every: int = 10,
    progress: bool = False,
) -> tuple[int, dict[str, float]]:
    """One pass over ``loader``; returns the new global step and the epoch's statistics.

    ``on_step(step)`` runs after every optimizer step (the periodic test evaluation).
    """
    model.train()
    loss_sum = correct = seen = bad = 0.0
    window_loss = window_n = 0.0
    train_time = 0.0
    tick = time.perf_counter()
    total = min(len(loader), max_steps) if max_steps else len(loader)
    bar = iter_with_progress(
        loader, enabled=progress and ctx.is_main, desc=f"epoch {epoch}", total=total
    )
    for index, (images, labels, n_bad) in enumerate(bar):
        if max_steps and index >= max_steps:
            break
        bad += n_bad
        images, labels = _to_device(images, labels, ctx.device, channels_last)
        with autocast(ctx.device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        check_finite(loss, epoch=epoch, step=step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        batch = labels.numel()
        value = float(loss.detach())
        loss_sum += value * batch
        correct += float(logits.detach().argmax(dim=1).eq(labels).sum())
        seen += batch
        window_loss += value
        window_n += 1
        now = time.perf_counter()
        train_time += now - tick
        if metrics is not None and log_every and step % log_every == 0:
            metrics.write(
                {
                    "type": "train",
                    "epoch": epoch,
                    "step": step,
                    "loss": window_loss / window_n,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": seen * ctx.world_size / max(train_time, 1e-9),
                }
            )
            window_loss = window_n = 0.0
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        if on_step is not None:
            on_step(step)
        tick = time.perf_counter()  # evaluation time is not training time
    close_bar(bar)
    loss_sum, correct, seen, bad = all_reduce_sum([loss_sum, correct, seen, bad], ctx)
    stats = {
        "loss": loss_sum / max(seen, 1),
        "train_top1": 100.0 * correct / max(seen, 1),
        "images": int(seen),
        "bad_images": int(bad),
        "images_per_s": seen / max(train_time, 1e-9),
    }
    return step, stats


# ------------------------------------------------------------------------------ main


def _make_loaders(
    args: argparse.Namespace,
    train: ImageClassificationDataset,
    test: ImageClassificationDataset,
    ctx: DistributedContext,
) -> tuple[DataLoader, DataLoader, DistributedSampler, torch.Generator]:
    if args.batch_size % ctx.world_size:
        raise UsageError(
            f"--batch-size {args.batch_size} is not divisible by {ctx.world_size} processes"
        )
    per_rank = args.batch_size // ctx.world_size
    if len(train) // ctx.world_size < per_rank:
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {len(train)} training images "
            "(the last incomplete batch is dropped, so no step would run)"
        )
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
            "train_transform": f"RandomResizedCrop({args.input_size}) + HorizontalFlip",
            "test_transform": "Resize + CenterCrop",
        },
        "metrics": metrics,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train with resolved ``args`` (see :func:`parse_args`); return the final summary."""
    return run_distributed(train, args)


def train(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, Any]:
    """Train in the process group of ``ctx`` (runs may share one: see compare-backbones)."""
    out, resume_path = prepare_run_dir(
        args.out, args.resume, checkpoint=CHECKPOINT, weights=WEIGHTS
    )
    checkpoint_path = out / CHECKPOINT
    make_run_dir(out, ctx)
    seed_everything(args.seed)

    split_path = Path(args.split_file) if args.split_file else out / SPLIT
    full, train_set, test_set = build_datasets(args, split_path, write_split=ctx.is_main)
    class_names = list(full.class_names)
    identity = {**vars(args), "class_names": class_names}

    amp = bool(args.amp) and ctx.device.type == "cuda"
    channels_last = bool(args.channels_last) and ctx.device.type == "cuda"
    model = build_model(args, len(class_names)).to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    model = wrap_ddp(model, ctx)
    optimizer, scheduler = build_optimizer(model_without_ddp, args)
    scaler = make_grad_scaler(ctx.device, amp)
    train_loader, test_loader, sampler, generator = _make_loaders(args, train_set, test_set, ctx)
    metrics = MetricsWriter(out / METRICS, enabled=ctx.is_main)

    start_epoch, step, last_eval = 0, 0, None
    if resume_path is not None:
        start_epoch, step, last_eval = resume_run(
            resume_path,
            identity=identity,
            resume_keys=RESUME_KEYS,
            model=model_without_ddp,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            generator=generator,
            metrics=metrics,
            ctx=ctx,
            strict_streams=False,
        )
    write_args_yaml(out, args, ctx)

    eval_kwargs = {"amp": amp, "channels_last": channels_last, "progress": args.progress}

    def run_eval(epoch: int, current_step: int) -> dict[str, Any]:
        result = evaluate(model, test_loader, ctx, **eval_kwargs)
        record = {"type": "eval", "epoch": epoch, "step": current_step, **result}
        metrics.write(record)
        if ctx.is_main and not args.progress:
            print(f"step {current_step}: top1 {result['top1']:.2f}%  top5 {result['top5']:.2f}%")
        return record

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()

        def on_step(current_step: int, epoch: int = epoch) -> None:
            nonlocal last_eval
            if args.eval_every_steps and current_step % args.eval_every_steps == 0:
                last_eval = run_eval(epoch, current_step)

        step, stats = train_one_epoch(
            model,
            optimizer,
            train_loader,
            ctx,
            epoch=epoch,
            step=step,
            scaler=scaler,
            amp=amp,
            channels_last=channels_last,
            label_smoothing=args.label_smoothing,
            max_steps=args.max_steps_per_epoch,
            on_step=on_step,
            metrics=metrics,
            log_every=args.log_every_steps,
            progress=args.progress,
        )
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics.write(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": step,
                "lr": lr,
                "seconds": time.perf_counter() - epoch_start,
                **stats,
            }
        )
        last_epoch = epoch + 1 == args.epochs
        periodic = args.eval_every_epochs and (epoch + 1) % args.eval_every_epochs == 0
        if (periodic or last_epoch) and (last_eval is None or last_eval["step"] != step):
            last_eval = run_eval(epoch, step)
        # every process's random streams, so each continues its own after --resume
        streams = gather_random_streams(generator, ctx)
        if ctx.is_main:
            if not args.progress:
                print(
                    f"epoch {epoch}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
                )
            save_checkpoint(
                checkpoint_path,
                training_checkpoint(
                    model=model_without_ddp,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    random_streams=streams,
                    epoch=epoch + 1,
                    step=step,
                    last_eval=last_eval,
                    identity=identity,
                    resume_keys=RESUME_KEYS,
                    args=args,
                ),
            )
        barrier(ctx)

    if last_eval is None or last_eval["step"] != step:
        last_eval = run_eval(max(args.epochs - 1, 0), step)
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "num_classes": len(class_names),
        "train_images": len(train_set),
        "test_images": len(test_set),
        "skipped_images": len(full.skipped),
        "epochs": args.epochs,
        "steps": step,
        "parameters": sum(p.numel() for p in model_without_ddp.parameters()),
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "test_loss": last_eval["loss"],
        "weights": str(out / WEIGHTS),
    }
    if ctx.is_main:
        meta = _weights_meta(args, model_without_ddp, class_names, summary)
        save_weights(out / WEIGHTS, model_without_ddp.state_dict(), meta)
        write_json(out / "summary.json", summary)
        print(
            f"done: {args.model} on {args.dataset}, {step} steps, top1 {summary['top1']:.2f}%, "
            f"top5 {summary['top5']:.2f}% -> {out / WEIGHTS}"
        )
    return summary


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
