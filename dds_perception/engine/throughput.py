"""Training throughput of the Caltech classifiers: images per second of each backbone alone, of
the backbones side by side, and of the data paths alone.

Every number is measured with the training code itself (:meth:`ClassifierLoop.train_step` on
the device pipeline's batches: augmentation, forward, backward and SGD step), after ``--warmup``
steps (cuDNN autotuning, ``torch.compile``), over ``--steps`` steps, with the device
synchronised before and after. Modes (``--modes``): ``augment`` (the device pipeline alone),
``loader`` (the CPU DataLoader path alone, ``--workers`` processes: JPEG decoding and
augmentation), ``alone`` (each of ``--models`` by itself) and ``side_by_side`` (all of them on
each batch). The recipe options are train-classifier's (``--config`` recipes too).

examples:
  python -m dds_perception.engine.throughput --config config/train/paper_caltech101.yaml \\
      --data-root ../shared/data/caltech101_s128 --cache-dir /tmp/dds_cache --json tp.json
  python -m dds_perception.engine.throughput --data-root ../shared/data/caltech101_s128 \\
      --dataset caltech101 --device cpu --batch-size 32 --modes augment loader --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

from dds_perception.engine.classification import (
    ClassifierLoop,
    add_training_arguments,
    build_datasets,
    build_member,
    device_batches,
    make_loaders,
    new_stream,
    precision,
)
from dds_perception.engine.common import DistributedContext, RecipeOptions, parse_recipe_args
from dds_perception.utils.io import write_json
from dds_perception.utils.runtime import resolve_device

MODES = ("augment", "loader", "alone", "side_by_side")
PAPER_MODELS = ("dds_mobilenet_v2", "mobilenet_v1", "mobilenet_v2", "shufflenet_v1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """train-classifier's recipe options plus what to measure."""
    add_training_arguments(parser, with_model=False)
    group = RecipeOptions(parser).group("throughput")
    group.add_argument("--models", nargs="+", default=list(PAPER_MODELS), help="registry names")
    group.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="what to measure"
    )
    group.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    group.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    group.add_argument("--json", type=Path, default=None, help="write the results here")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(batches: Any) -> Iterator[Any]:
    """The batches of epoch 0, 1, 2, ... one after another."""
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        elif hasattr(batches, "sampler") and hasattr(batches.sampler, "set_epoch"):
            batches.sampler.set_epoch(epoch)
        yield from batches
        epoch += 1


def _rate(
    run: Any, batches: Iterator[Any], device: torch.device, warmup: int, steps: int
) -> dict[str, float]:
    """Images per second of ``run(batch)`` over ``steps`` batches after ``warmup`` ones."""
    start = time.perf_counter()
    for _ in range(warmup):
        run(next(batches))
    _synchronize(device)
    warm = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += run(next(batches))
    _synchronize(device)
    seconds = time.perf_counter() - warm
    return {
        "images_per_s": images / max(seconds, 1e-9),
        "seconds": seconds,
        "warmup_seconds": warm - start,
        "images": images,
    }


def measure(
    args: argparse.Namespace, report: Callable[[dict[str, Any]], None] = lambda _: None
) -> dict[str, Any]:
    """Run the measurements ``args.modes`` names; return them with the setting. ``report``
    gets the results so far after each one (a run cut short keeps what it measured)."""
    ctx = DistributedContext(device=resolve_device(args.device))
    device = ctx.device
    amp, amp_dtype, channels_last = precision(args, ctx)
    with tempfile.TemporaryDirectory() as scratch:
        split = Path(args.split_file) if args.split_file else Path(scratch) / "split.json"
        full, train_set, test_set = build_datasets(args, split, write_split=False)
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(),
            "dataset": args.dataset,
            "train_images": len(train_set),
            "batch_size": args.batch_size,
            "input_size": args.input_size,
            "amp": amp,
            "amp_dtype": args.amp_dtype if amp else None,
            "channels_last": channels_last,
            "compile": bool(args.compile),
            "steps": args.steps,
            "warmup": args.warmup,
        }
        if "loader" in args.modes:
            loader, _, _, _ = make_loaders(args, train_set, test_set, ctx, args.batch_size)
            batches = _endless(loader)

            def load(batch: Any) -> int:
                images = batch[0].to(device, non_blocking=True)
                return int(images.shape[0])

            result["loader"] = {"workers": args.workers} | _rate(
                load, batches, device, args.warmup, args.steps
            )
            print(f"loader ({args.workers} workers): {result['loader']['images_per_s']:.0f} img/s")
            report(result)
        if not set(args.modes) & {"augment", "alone", "side_by_side"}:
            return result
        train_batches, _ = device_batches(
            args, train_set, test_set, ctx, args.batch_size, channels_last
        )
        batches = _endless(train_batches)
        if "augment" in args.modes:
            result["augment"] = _rate(
                lambda batch: int(batch[0].shape[0]), batches, device, args.warmup, args.steps
            )
            print(f"device augmentation: {result['augment']['images_per_s']:.0f} img/s")
            report(result)
        groups = []
        if "alone" in args.modes:
            groups += [[name] for name in args.models]
        if "side_by_side" in args.modes and len(args.models) > 1:
            groups.append(list(args.models))
        for group in groups:
            members = [
                build_member(name, Path(scratch) / name, args, ctx, full.num_classes, {})
                for name in group
            ]
            loop = ClassifierLoop(
                members=members,
                ctx=ctx,
                args=args,
                train_batches=train_batches,
                test_batches=None,
                set_epoch=train_batches.set_epoch,
                data_stream=new_stream(0, torch.device("cpu")),
                generator=None,
                amp=amp,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            for member in members:
                member.forward.train()

            def step(batch: Any, loop: ClassifierLoop = loop) -> int:
                return loop.train_step(batch, epoch=0, step=0).images

            rate = _rate(step, batches, device, args.warmup, args.steps)
            if device.type == "cuda":
                rate["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            key = group[0] if len(group) == 1 else "side_by_side"
            result.setdefault("training", {})[key] = {"models": group} | rate
            print(f"train {' + '.join(group)}: {rate['images_per_s']:.0f} img/s")
            report(result)
            del loop, members
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dds_perception.engine.throughput",
        description=__doc__.split("\n", 1)[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parse_recipe_args(parser, list(sys.argv[1:] if argv is None else argv))

    def report(result: dict[str, Any]) -> None:
        if args.json is not None:
            write_json(args.json, result)

    result = measure(args, report)
    report(result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
