"""A/B of inference options on one network, interleaved: the measurement behind a default.

The bench's speed-up section turns every switch off in one large pool; this times just the
variants asked for, on the deploy ``TorchBackend`` (what the pipeline runs), round-robin so that
load from other processes falls on all of them alike::

  python -m dds_perception.benchmarks.ab inplace_prelu --threads 1 --repeats 30
  python -m dds_perception.benchmarks.ab --variant branches:dense_pyramid=false \\
      --variant dense:dense_pyramid=true \\
      --variant dense3:dense_pyramid=true,dense_pyramid_max_dilation=3
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch

from dds_perception.benchmarks.backends import BenchError
from dds_perception.benchmarks.candidates import OUR_INPUT, detector_candidate
from dds_perception.benchmarks.timing import measure_interleaved, num_threads
from dds_perception.deploy.backends import TorchBackend
from dds_perception.deploy.runtime import freed_memory_reuse
from dds_perception.detection.optimize import InferenceOptions, to_input_layout


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, InferenceOptions changes)."""
    name, _, body = text.partition(":")
    known = {f.name for f in fields(InferenceOptions)}
    changes: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise BenchError(
                f"variant {text!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(known)}"
            )
        changes[key] = _value(value)
    return name, changes


def compare_options(
    variants: dict[str, dict[str, Any]],
    *,
    model: str = "dds_rpn_s32",
    input_size: tuple[int, int] = OUR_INPUT,
    device: str = "cpu",
    half: bool = False,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
) -> dict[str, Any]:
    """Median / min / max ms of ``model`` under each variant's options, interleaved."""
    device_ = torch.device(device)
    candidate = detector_candidate(model, our_input=input_size)
    example = candidate.example(1)
    runs = {}
    with num_threads(threads), freed_memory_reuse(device_.type == "cpu"):
        for name, changes in variants.items():
            options = InferenceOptions(**changes)
            backend = TorchBackend(
                candidate.network, device=device_, half=half, options=options, example=example
            )
            x = to_input_layout(example, backend.options, device_, half)
            runs[name] = lambda backend=backend, x=x: backend(x)
        timings = measure_interleaved(runs, warmup=warmup, repeats=repeats, device=device_)
        used_threads = torch.get_num_threads()
    return {
        "model": model,
        "input": list(input_size),
        "device": device,
        "precision": "fp16" if half else "fp32",
        "threads": used_threads,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "variants": {
            name: {"options": variants[name], **t.to_json()} for name, t in timings.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "switch", nargs="?", help="an InferenceOptions switch: compare it on and off"
    )
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,...")
    parser.add_argument("--model", default="dds_rpn_s32")
    parser.add_argument("--input-size", nargs=2, type=int, default=OUR_INPUT, metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variant)
    if args.switch:
        variants = {
            f"{args.switch}=on": {args.switch: True},
            f"{args.switch}=off": {args.switch: False},
            **variants,
        }
    if len(variants) < 2:
        parser.error("give a switch or at least two --variant")
    result = compare_options(
        variants,
        model=args.model,
        input_size=tuple(args.input_size),
        device=args.device,
        half=args.half,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    base = None
    for name, timing in result["variants"].items():
        base = base or timing["median_ms"]
        print(
            f"{name}: median {timing['median_ms']:.2f} ms (min {timing['min_ms']:.2f}, max "
            f"{timing['max_ms']:.2f}); {timing['median_ms'] / base:.3f}x the first"
        )
    print(f"threads {result['threads']}, load average after {result['load_average_after']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
