"""The deployment path of issue 10 in one interleaved comparison: torch against ONNX Runtime.

The backends themselves (the deploy ``Backend`` objects the pipeline runs, made ready the way
``dds-perception export`` and the pipeline make them) are :mod:`.backends`'; this module only
adds :func:`compare_backends`, which interleaves every (model, backend) pair in one loop, so
that torch against ONNX Runtime is measured under the same load too (a shared machine's load
drifts between the bench's backend groups)::

  python -m dds_perception.benchmarks.deploy_backends --threads 1 --repeats 15
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dds_perception.benchmarks.backends import Settings, get_backend
from dds_perception.benchmarks.candidates import detector_candidate
from dds_perception.benchmarks.timing import measure_interleaved, num_threads


def compare_backends(
    models: Sequence[str] = ("dds_rpn_s32", "ssd300_vgg16"),
    backends: Sequence[str] = ("torch", "onnxruntime"),
    *,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 15,
) -> dict[str, Any]:
    """Network latency of every (model, backend) pair on a KITTI frame, all interleaved.

    Returns the timings (ms), each backend's speed ratio of ``ssd300_vgg16`` to ``dds_rpn_s32``
    and each model's torch / other-backend speed-up.
    """
    settings, cpu = Settings(threads=threads), torch.device("cpu")
    runs = {}
    with num_threads(threads):
        for name in models:
            candidate = detector_candidate(name)
            for backend in backends:
                prepared = get_backend(backend).prepare(
                    candidate.network, candidate.example(1), device=cpu, half=False,
                    settings=settings,
                )  # fmt: skip
                runs[(name, backend)] = prepared.run
        timings = measure_interleaved(
            {f"{n} / {b}": fn for (n, b), fn in runs.items()}, warmup=warmup, repeats=repeats
        )
    median = {key: timings[f"{key[0]} / {key[1]}"].median_ms for key in runs}
    result: dict[str, Any] = {
        "threads": threads,
        "repeats": repeats,
        "timings": {k: v.to_json() for k, v in timings.items()},
        "ratio_to_ssd300_vgg16": {},
        "speedup_over_torch": {},
    }
    if "ssd300_vgg16" in models and "dds_rpn_s32" in models:
        for b in backends:
            ratio = median[("ssd300_vgg16", b)] / median[("dds_rpn_s32", b)]
            result["ratio_to_ssd300_vgg16"][b] = round(ratio, 3)
    if "torch" in backends:
        for n in models:
            for b in backends:
                if b != "torch":
                    speedup = median[(n, "torch")] / median[(n, b)]
                    result["speedup_over_torch"][f"{n} / {b}"] = round(speedup, 3)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dds_perception.benchmarks.deploy_backends``: print :func:`compare_backends`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=compare_backends.__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", default="torch,onnxruntime")
    args = parser.parse_args(argv)
    result = compare_backends(
        backends=tuple(args.backends.split(",")), threads=args.threads, repeats=args.repeats
    )
    for key, timing in result["timings"].items():
        print(f"{key}: median {timing['median_ms']:.1f} ms "
              f"(min {timing['min_ms']:.1f}, max {timing['max_ms']:.1f})")  # fmt: skip
    print(json.dumps({k: result[k] for k in ("ratio_to_ssd300_vgg16", "speedup_over_torch")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
