"""Detector training on KITTI-format data (real or generated scenes), with KITTI AP validation.

Shaped like torchvision's ``references/detection``: :func:`get_args_parser`, :func:`main`,
:func:`evaluate`; one training step is :meth:`DetectorLoop.train_step`, and the epochs around
it are the shared :func:`dds_perception.engine.loop.fit`. Shared plumbing (torchrun, YAML
recipes, AMP, RNG states, atomic checkpoints, JSON-lines metrics) comes from
:mod:`dds_perception.engine.common`.

Data: ``KittiDetectionDataset`` (Car positives; Van and DontCare as ignore regions) with
``DetectionTrainTransform`` (scale jitter + crop to the network size, flip, colour jitter) for
training and ``DetectionEvalTransform`` (the pipeline's letterbox) for validation.

Validation: detections are mapped back to source pixels with the letterbox inverse and scored by
the KITTI evaluator (``evaluation.kitti.evaluate``: devkit matching, easy/moderate/hard, AP_11
and AP_40). Validation runs on the main process over the whole validation split.

A run folder holds ``args.yaml`` (resolved arguments), ``metrics.jsonl`` (one JSON object per
line: ``train`` every ``--log-every-steps`` with the mean losses since the last one, ``epoch``,
``eval``), ``checkpoint.pt`` (atomic, after every epoch; ``--resume`` continues exactly: model,
optimizer, scheduler, scaler, epoch, step, every process's RNG and loader-generator states),
``eval.md`` (latest AP table), and at the end ``model.safetensors`` (self-describing detector
weights) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dds_perception.data.detection_dataset import KittiDetectionDataset, detection_collate
from dds_perception.data.kitti import detection_to_object
from dds_perception.data.letterbox import boxes_to_source
from dds_perception.data.sources import CopyPasteDataset, MixtureDataset, SourceSpec
from dds_perception.data.transforms import DetectionEvalTransform, DetectionTrainTransform
from dds_perception.detection.config import DetectorConfig, DetectorConfigError
from dds_perception.detection.detector import RPNDetector
from dds_perception.detection.postprocess import PostprocessParams, postprocess
from dds_perception.detection.weights import (
    backbone_normalization,
    build_detector,
    load_backbone_weights,
    save_detector,
)
from dds_perception.engine.common import (
    DistributedContext,
    MetricsWriter,
    RecipeOptions,
    add_resume_argument,
    add_speed_arguments,
    autocast,
    check_finite,
    gather_random_streams,
    iter_with_progress,
    make_grad_scaler,
    make_run_dir,
    parse_recipe_args,
    prepare_run_dir,
    resume_run,
    run_distributed,
    save_checkpoint,
    training_checkpoint,
    wrap_ddp,
    write_args_yaml,
)
from dds_perception.engine.loop import FitOptions, FitState, StepResult, TrainingLoop, fit
from dds_perception.evaluation.kitti import evaluate as kitti_evaluate
from dds_perception.models.pretrained import freeze_batchnorm
from dds_perception.utils.checkpoint import load_training_state
from dds_perception.utils.errors import UsageError
from dds_perception.utils.io import atomic_open, write_json
from dds_perception.utils.runtime import seed_everything

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
# Arguments that must not change when a run is resumed (they define the network and the data).
RESUME_KEYS = [
    "detector_config",
    "data_root",
    "split",
    "sources",
    "batch_size",
    "seed",
    "epochs",
    "lr",
    "ema",
]
PRIMARY = ("Car", "moderate", "AP_40")  # the AP that selects and describes a model


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of the recipe (YAML recipe keys are these names)."""
    options = RecipeOptions(parser)
    options.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML recipe (config/train/*.yaml) setting defaults; given options still win",
    )
    group = options.group("data")
    group.add_argument("--data-root", type=Path, default=None, help="KITTI root (or training/)")
    group.add_argument(
        "--split",
        default="train",
        help="training frames: a split file, a name in ImageSets/ (train), or 'all'",
    )
    group.add_argument(
        "--val-split",
        default="val",
        help="validation frames (as --split); 'none' skips validation",
    )
    group.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    group.add_argument(
        "--sources",
        nargs="*",
        type=SourceSpec.parse,
        default=[],
        metavar="SPEC",
        help="more training sources beside --data-root/--split, e.g. "
        "'kind=copy_paste,crops=DIR,weight=1' or 'kind=kitti,root=DIR,split=all,weight=0.5' "
        "(YAML recipes: a list of mappings; see data.sources)",
    )
    group.add_argument(
        "--primary-weight",
        type=float,
        default=1.0,
        help="sampling weight of the --data-root/--split frames among --sources",
    )
    group.add_argument(
        "--epoch-size",
        type=int,
        default=0,
        help="items per epoch when --sources are given (0: the number of --split frames)",
    )
    group.add_argument(
        "--min-height",
        type=float,
        default=0.0,
        help="cars shorter than this (source px) become ignore regions in training",
    )
    group = options.group("model")
    group.add_argument("--model", default="dds_mobilenet_v2", help="backbone registry name")
    group.add_argument("--width-mult", type=float, default=1.0, help="backbone width multiplier")
    group.add_argument(
        "--backbone-weights",
        type=Path,
        default=None,
        help="classification weights file whose 'features.' tensors initialise the backbone",
    )
    group.add_argument(
        "--frozen-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="backbone BatchNorms as torchvision's FrozenBatchNorm2d (default: on with "
        "--backbone-weights, whose statistics a small batch must not overwrite)",
    )
    group.add_argument(
        "--freeze-layers",
        type=int,
        default=0,
        help="keep the first N backbone layers (0: stem, 1-17: blocks) fixed (no gradients)",
    )
    defaults = DetectorConfig()
    group.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=list(defaults.input_size),
        metavar=("H", "W"),
        help="network input (multiples of 32)",
    )
    group.add_argument(
        "--anchor-sizes", type=float, nargs="+", default=list(defaults.anchor_sizes)
    )
    group.add_argument(
        "--aspect-ratios", type=float, nargs="+", default=list(defaults.aspect_ratios)
    )
    group.add_argument(
        "--use-layer13",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="add the stride-16 layer13 map (small anchors) to layer17",
    )
    group.add_argument("--box-loss", choices=("smooth_l1", "giou"), default=defaults.box_loss)
    group.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any DetectorConfig field, e.g. --set fg_iou=0.7 score_threshold=0.4",
    )
    options.add_argument("--out", type=Path, default=None, help="run folder for all outputs")
    group = options.group("recipe")
    group.add_argument("--epochs", type=int, default=24)
    group.add_argument("--batch-size", type=int, default=8, help="global batch size")
    group.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=1e-4)
    group.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=1.0,
        help="the backbone's learning rate as a fraction of --lr (pretrained features move "
        "slower than the new head)",
    )
    group.add_argument(
        "--clip-grad-norm",
        type=float,
        default=0.0,
        help="clip the gradients' global L2 norm to this (0: off); guards a fine-tuned "
        "backbone against the rare batch whose loss explodes",
    )
    group.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    group.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        default=[0.75, 1.33],
        help="training scale jitter around the letterbox scale",
    )
    group.add_argument(
        "--color-jitter",
        type=float,
        nargs=4,
        default=[0.3, 0.3, 0.3, 0.0],
        metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"),
        help="ColorJitter strengths (hue is off by default: it costs ~130 ms/frame on CPU)",
    )
    group.add_argument(
        "--crop-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="train on windows of this size cut from the scaled frame (default: --input-size)",
    )
    group.add_argument(
        "--focus-prob",
        type=float,
        default=0.0,
        help="probability that a training window is placed around a car",
    )
    group.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="decay of an exponential moving average of the weights, evaluated and saved "
        "instead of the raw weights (0: off)",
    )
    group.add_argument("--seed", type=int, default=0)
    group = options.group("evaluation, logging, checkpoints")
    group.add_argument("--eval-every-epochs", type=int, default=1, help="0: only at the end")
    group.add_argument(
        "--eval-score-threshold",
        type=float,
        default=0.01,
        help="score threshold for the AP (low: AP integrates over the whole PR curve)",
    )
    group.add_argument("--log-every-steps", type=int, default=10)
    add_resume_argument(group)
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_speed_arguments(
        options,
        channels_last_help="channels_last memory format (CPU too: measured 2-4x faster for the "
        "dilated depthwise convolutions of dds_mobilenet_v2)",
        max_steps_help="cap steps per epoch (0: none)",
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The training parser (see :func:`parse_args` for recipe files)."""
    parser = argparse.ArgumentParser(description="Train the car detector", add_help=add_help)
    add_training_arguments(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` recipe as defaults: what :func:`main` takes."""
    return parse_recipe_args(get_args_parser(), argv)


def detector_config_from_args(args: argparse.Namespace) -> DetectorConfig:
    """The :class:`DetectorConfig` described by the options (``--set`` applied last)."""
    fields: dict[str, Any] = {
        "backbone": args.model,
        "backbone_kwargs": {"width_mult": float(args.width_mult)},
        "input_size": tuple(args.input_size),
        "anchor_sizes": tuple(args.anchor_sizes),
        "aspect_ratios": tuple(args.aspect_ratios),
        "use_layer13": bool(args.use_layer13),
        "box_loss": args.box_loss,
    }
    if args.backbone_weights is not None:
        # the input normalisation the pretrained weights expect (an --set still wins)
        normalization = backbone_normalization(args.backbone_weights)
        if normalization is not None:
            fields["mean"], fields["std"] = normalization
    for item in args.overrides or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise DetectorConfigError(f"--set {item!r}: expected KEY=VALUE")
        fields[key.strip()] = yaml.safe_load(value)
    return DetectorConfig.from_dict(fields)


# ------------------------------------------------------------------------------ data


def _split(value: str | None) -> str | None:
    return None if value in (None, "all") else value


def train_transform(args: argparse.Namespace, config: DetectorConfig) -> DetectionTrainTransform:
    """The training augmentation the options describe."""
    return DetectionTrainTransform(
        config.input_size,
        scale_range=tuple(args.scale_range),
        brightness=args.color_jitter[0],
        contrast=args.color_jitter[1],
        saturation=args.color_jitter[2],
        hue=args.color_jitter[3],
        crop_size=tuple(args.crop_size) if args.crop_size else None,
        focus_prob=args.focus_prob,
    )


def build_source(
    spec: SourceSpec, args: argparse.Namespace, transform: DetectionTrainTransform
) -> Dataset:
    """One training source (``--data-root``/``--split`` where the spec names none)."""
    root = spec.root if spec.root is not None else args.data_root
    split = spec.split if spec.split is not None else args.split
    if root is None:
        raise UsageError(f"source {spec.to_dict()}: no root and no --data-root")
    if spec.kind == "kitti":
        return KittiDetectionDataset(root, _split(split), transform, min_height=args.min_height)
    base = KittiDetectionDataset(root, _split(split), None, min_height=args.min_height)
    return CopyPasteDataset(base, spec.crops, spec.negatives, transform, paste=spec.paste)


def build_datasets(
    args: argparse.Namespace, config: DetectorConfig
) -> tuple[Dataset, KittiDetectionDataset | None]:
    """The training set (one folder, or a :class:`MixtureDataset` of several sources) and the
    validation set (``--data-root``/``--val-split``, letterboxed as at inference)."""
    if args.data_root is None:
        raise UsageError("--data-root is required (a KITTI folder with training/image_2)")
    transform = train_transform(args, config)
    train: Dataset = KittiDetectionDataset(
        args.data_root, _split(args.split), transform, min_height=args.min_height
    )
    if len(train) == 0:
        raise UsageError(f"{args.data_root}: split {args.split!r} has no frames")
    if args.sources:
        datasets = [train] + [build_source(spec, args, transform) for spec in args.sources]
        names = [f"{args.data_root}:{args.split}"] + [
            f"{spec.kind}:{spec.root or args.data_root}" for spec in args.sources
        ]
        train = MixtureDataset(
            datasets,
            [args.primary_weight] + [spec.weight for spec in args.sources],
            args.epoch_size or len(train),
            seed=args.seed,
            names=names,
        )
    val = None
    if args.val_split not in (None, "none", ""):
        val = KittiDetectionDataset(
            args.data_root, _split(args.val_split), DetectionEvalTransform(config.input_size)
        )
    return train, val


# ------------------------------------------------------------------------------ loops


def _targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    keys = ("boxes", "labels", "ignore_boxes")
    return [{k: torch.as_tensor(t[k]).to(device) for k in keys} for t in targets]


@torch.inference_mode()
def predict_dataset(
    model: RPNDetector,
    dataset: KittiDetectionDataset,
    *,
    device: torch.device,
    score_threshold: float = 0.01,
    nms_iou: float | None = None,
    vote_iou: float | None = None,
    batch_size: int = 4,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, list]:
    """Detections (KittiObject with score, source pixels) for every frame of ``dataset``;
    ``nms_iou`` / ``vote_iou`` replace the model's own NMS and box-voting IoUs."""
    model.eval()
    config = model.config
    params = PostprocessParams.from_config(
        config,
        score_threshold=score_threshold,
        nms_iou=config.nms_iou if nms_iou is None else nms_iou,
        vote_iou=config.vote_iou if vote_iou is None else vote_iou,
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=detection_collate
    )
    detections: dict[str, list] = {}
    for images, targets in iter_with_progress(loader, enabled=progress, desc="validate"):
        images = model.normalize(images.to(device))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs = model(images)
        results = postprocess(outputs["scores"], outputs["boxes"], params, config.input_size)
        for (boxes, scores, _), target in zip(results, targets, strict=True):
            source = boxes_to_source(boxes.cpu(), target["letterbox"])
            detections[target["frame_id"]] = [
                detection_to_object(tuple(float(v) for v in box), float(score))
                for box, score in zip(source.tolist(), scores.tolist(), strict=True)
            ]
    return detections


def evaluate(
    model: RPNDetector,
    dataset: KittiDetectionDataset,
    *,
    device: torch.device,
    score_threshold: float = 0.01,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """KITTI 2D AP (percent) of ``model`` on ``dataset``; ``"ap"`` is Car moderate AP_40."""
    start = time.perf_counter()
    detections = predict_dataset(
        model,
        dataset,
        device=device,
        score_threshold=score_threshold,
        channels_last=channels_last,
        progress=progress,
    )
    ground_truth = {fid: dataset.objects(i) for i, fid in enumerate(dataset.frame_ids)}
    result = kitti_evaluate(ground_truth, detections, classes=("Car",))
    cls, difficulty, metric = PRIMARY
    return {
        "ap": result.ap(cls, difficulty, metric),
        "ap_easy": result.ap(cls, "easy", metric),
        "ap_hard": result.ap(cls, "hard", metric),
        "mAP_40": result.mean_ap("AP_40"),
        "mAP_11": result.mean_ap("AP_11"),
        "kitti": result.to_json(),
        "markdown": result.markdown(),
        "frames": len(dataset),
        "detections": sum(len(v) for v in detections.values()),
        "seconds": time.perf_counter() - start,
    }


class DetectorLoop(TrainingLoop):
    """The detector's part of :func:`~dds_perception.engine.loop.fit`: one AdamW step on the
    summed RPN losses per batch (learning rate and EMA updated per step), KITTI AP validation on
    the main process, a checkpoint with every process's random streams (and the EMA).

    :meth:`train_step` needs only the network, optimizer, schedule and scaler; the data,
    records and run folder are for the epochs :func:`fit` runs."""

    def __init__(
        self,
        *,
        args: argparse.Namespace,
        ctx: DistributedContext,
        model: torch.nn.Module,
        detector: RPNDetector,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        ema: AveragedModel | None = None,
        amp: bool = False,
        channels_last: bool = False,
        loader: DataLoader | None = None,
        sampler: DistributedSampler | None = None,
        generator: torch.Generator | None = None,
        train_set: Dataset | None = None,
        val_set: KittiDetectionDataset | None = None,
        metrics: MetricsWriter | None = None,
        identity: dict[str, Any] | None = None,
        out: Path | None = None,
    ) -> None:
        self.args, self.ctx, self.model, self.detector, self.ema = args, ctx, model, detector, ema
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loader, self.sampler, self.generator = loader, sampler, generator
        self.train_set, self.val_set, self.metrics = train_set, val_set, metrics
        self.identity, self.out, self.amp, self.channels_last = identity, out, amp, channels_last
        self.evaluated = detector if ema is None else ema.module

    def begin_epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if isinstance(self.train_set, MixtureDataset):
            self.train_set.set_epoch(epoch)
        self.model.train()
        return self.loader

    def train_step(self, batch: Any, *, epoch: int, step: int) -> StepResult:
        images, targets = batch
        device = self.ctx.device
        images = self.detector.normalize(images.to(device, non_blocking=True))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, self.amp):
            losses = self.model(images, _targets_to(targets, device))
        loss = sum(losses.values())
        check_finite(loss, epoch=epoch, step=step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.detector)
        values = {name: float(value.detach()) for name, value in (("loss", loss), *losses.items())}
        return StepResult(images=images.shape[0], values=values)

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, epoch: int, step: int) -> dict[str, Any] | None:
        if self.val_set is None or not self.ctx.is_main:
            return None
        result = evaluate(
            self.evaluated,
            self.val_set,
            device=self.ctx.device,
            score_threshold=self.args.eval_score_threshold,
            channels_last=self.channels_last,
            progress=self.args.progress,
        )
        with atomic_open(self.out / "eval.md", "w", encoding="utf-8") as handle:
            handle.write(result.pop("markdown") + "\n")
        record = {"type": "eval", "epoch": epoch, "step": step, **result}
        raw = ""
        if self.ema is not None:  # the trained weights too: what the average adds, measured
            plain = evaluate(
                self.detector,
                self.val_set,
                device=self.ctx.device,
                score_threshold=self.args.eval_score_threshold,
                channels_last=self.channels_last,
                progress=self.args.progress,
            )
            record["without_ema"] = {k: plain[k] for k in ("ap_easy", "ap", "ap_hard")}
            raw = (
                f"; without EMA {plain['ap_easy']:.2f} / {plain['ap']:.2f} / "
                f"{plain['ap_hard']:.2f}"
            )
        self.metrics.write(record)
        print(
            f"epoch {epoch} step {step}: Car AP_40 easy {result['ap_easy']:.2f} "
            f"moderate {result['ap']:.2f} hard {result['ap_hard']:.2f} "
            f"({result['frames']} val frames){raw}"
        )
        return record

    def save(self, *, epoch: int, step: int, last_eval: dict[str, Any] | None) -> None:
        # every process's random streams, so each continues its own after --resume
        streams = gather_random_streams(self.generator, self.ctx)
        if not self.ctx.is_main:
            return
        state = training_checkpoint(
            model=self.detector,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            random_streams=streams,
            epoch=epoch,
            step=step,
            last_eval=last_eval,
            identity=self.identity,
            resume_keys=RESUME_KEYS,
            args=self.args,
        )
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        save_checkpoint(self.out / CHECKPOINT, state)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if record["type"] == "epoch" and self.ctx.is_main and not self.args.progress:
            print(
                f"epoch {record['epoch']}: loss {record['loss']:.4f}, "
                f"{record['images_per_s']:.1f} img/s"
            )


# ------------------------------------------------------------------------------ main


def build_optimizer(
    model: torch.nn.Module, args: argparse.Namespace, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (no decay on norms/biases/PReLU slopes), linear warm-up then cosine to 1 %.

    The backbone's groups get ``args.backbone_lr_mult`` times the peak learning rate.
    """
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    mult = args.backbone_lr_mult
    # (own learning rate, decays): with one learning rate the groups are the two they always
    # were, in the same order, so runs started before this option resume as they were
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (mult != 1.0 and id(param) in backbone_ids, param.ndim > 1)
            groups.setdefault(key, []).append(param)
    order = [(False, True), (False, False), (True, True), (True, False)]
    optimizer = torch.optim.AdamW(
        [
            {
                "params": groups[key],
                "weight_decay": args.weight_decay if key[1] else 0.0,
                "lr": args.lr * (mult if key[0] else 1.0),
            }
            for key in order
            if key in groups
        ],
        lr=args.lr,
    )
    warmup = max(0, min(args.warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _recipe(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "dds-perception train-detector",
        "data_root": str(args.data_root),
        "split": args.split,
        "val_split": args.val_split,
        "optimizer": "AdamW",
        "lr": args.lr,
        "backbone_lr_mult": args.backbone_lr_mult,
        "clip_grad_norm": args.clip_grad_norm,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "schedule": "linear warm-up, cosine to 1 % per step",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "scale_range": list(args.scale_range),
        "color_jitter": list(args.color_jitter),
        "train_transform": "scale jitter + crop to input, hflip, ColorJitter",
        "crop_size": list(args.crop_size) if args.crop_size else None,
        "focus_prob": args.focus_prob,
        "sources": [spec.to_dict() for spec in args.sources],
        "primary_weight": args.primary_weight,
        "epoch_size": args.epoch_size,
        "backbone_weights": str(args.backbone_weights) if args.backbone_weights else None,
        "frozen_bn": args.frozen_bn,
        "freeze_layers": args.freeze_layers,
        "ema": args.ema,
        "seed": args.seed,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train with resolved ``args`` (see :func:`parse_args`); return the final summary."""
    return run_distributed(_train, args)


def _train(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, Any]:
    out, resume_path = prepare_run_dir(
        args.out, args.resume, checkpoint=CHECKPOINT, weights=WEIGHTS
    )
    if args.batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {args.batch_size} not divisible by {ctx.world_size}")
    config = detector_config_from_args(args)
    make_run_dir(out, ctx)
    seed_everything(args.seed)
    train_set, val_set = build_datasets(args, config)

    amp = bool(args.amp) and ctx.device.type == "cuda"
    model = build_detector(config)
    if args.backbone_weights is not None and resume_path is None:
        loaded = load_backbone_weights(model, args.backbone_weights)
        if ctx.is_main:
            print(f"backbone: {loaded} tensors from {args.backbone_weights}")
    frozen_bn = args.frozen_bn if args.frozen_bn is not None else bool(args.backbone_weights)
    if frozen_bn:
        freeze_batchnorm(model.backbone)
    for layer in model.backbone.features[: args.freeze_layers]:
        layer.requires_grad_(False)
    channels_last = bool(args.channels_last)
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if args.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
    detector = model
    model = wrap_ddp(model, ctx)

    per_rank = args.batch_size // ctx.world_size
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed
    )
    generator = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=len(train_set) // ctx.world_size >= per_rank,
        collate_fn=detection_collate,
        generator=generator,
    )
    steps_per_epoch = len(loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    optimizer, scheduler = build_optimizer(detector, args, steps_per_epoch * args.epochs)
    scaler = make_grad_scaler(ctx.device, amp)
    metrics = MetricsWriter(out / METRICS, enabled=ctx.is_main)
    identity = {**vars(args), "detector_config": config.to_dict()}
    identity["data_root"] = str(args.data_root)
    identity["sources"] = [spec.to_dict() for spec in args.sources]

    start = FitState()
    if resume_path is not None:
        start_epoch, step, last_eval = resume_run(
            resume_path,
            identity=identity,
            resume_keys=RESUME_KEYS,
            model=detector,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            generator=generator,
            metrics=metrics,
            ctx=ctx,
            strict_streams=True,
        )
        start = FitState(epoch=start_epoch, step=step, last_eval=last_eval)
        if ema is not None:
            ema.load_state_dict(load_training_state(resume_path)["ema"])
    write_args_yaml(out, args, ctx)

    loop = DetectorLoop(
        args=args,
        ctx=ctx,
        model=model,
        detector=detector,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader=loader,
        sampler=sampler,
        generator=generator,
        train_set=train_set,
        val_set=val_set,
        metrics=metrics,
        identity=identity,
        out=out,
        amp=amp,
        channels_last=channels_last,
    )
    finished = fit(loop, FitOptions.from_args(args), ctx, start)
    step, last_eval = finished.step, finished.last_eval

    summary: dict[str, Any] = {
        "model": config.backbone,
        "width_mult": config.backbone_kwargs.get("width_mult", 1.0),
        "input_size": list(config.input_size),
        "train_frames": len(train_set),
        "val_frames": len(val_set) if val_set is not None else 0,
        "epochs": args.epochs,
        "steps": step,
        "parameters": sum(p.numel() for p in detector.parameters()),
        "weights": str(out / WEIGHTS),
    }
    if last_eval is not None:
        summary.update(
            {
                "val_ap_moderate_40": last_eval["ap"],
                "val_ap_easy_40": last_eval["ap_easy"],
                "val_ap_hard_40": last_eval["ap_hard"],
                "val_mAP_40": last_eval["mAP_40"],
                "val_mAP_11": last_eval["mAP_11"],
                "val_kitti": last_eval["kitti"],
            }
        )
    if ctx.is_main:
        save_detector(out / WEIGHTS, loop.evaluated, recipe=_recipe(args), metrics=summary)
        write_json(out / "summary.json", summary)
        ap = f", val Car moderate AP_40 {summary['val_ap_moderate_40']:.2f}" if last_eval else ""
        print(f"done: {step} steps{ap} -> {out / WEIGHTS}")
    return summary
