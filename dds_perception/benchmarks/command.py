"""Benchmark backbones, detectors, the pipeline and the speed-ups; write JSON, markdown, plots.

Writes DIR/bench.json (every number, the machine, the method), DIR/bench.md (the tables) and
PNG plots. Our detector's speed ratio to ssd300_vgg16 is measured in the same run, interleaved,
with the same speed-ups applied to both where they apply. Run it on a quiet machine: the load
average at the start is recorded.

examples:
  dds-perception bench --out bench_out                      # full run on CPU (~15 min, 2 cores)
  dds-perception bench --quick --out /tmp/bench             # tiny sizes: checks it all works
  dds-perception bench --backend torch,onnxruntime --out bench_out
  dds-perception bench --sections detectors,speedups --repeats 20 --out bench_out
  dds-perception bench --device cuda --half --out bench_gpu # fp16 on a CUDA GPU
  dds-perception bench --sections batches --batch-sizes 1,4,8 --out bench_batches
  dds-perception bench --sections detectors --input-size 352 1152 --out bench_352
  dds-perception bench --device cuda --half --sections compile --compile-variants eager,compile
  dds-perception bench --compare bench_out bench_gpu --out cpu_vs_gpu   # runs side by side
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dds_perception.benchmarks.backends import BACKENDS, BenchError
from dds_perception.benchmarks.suites import SECTIONS, BenchConfig, run_bench


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _csv(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be >= 1")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--half", action="store_true", help="fp16 (CUDA only)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1 repeat: seconds, numbers meaningless"
    )
    parser.add_argument(
        "--backend",
        default="torch",
        type=_csv,
        help=f"comma-separated backends to measure ({', '.join(BACKENDS)}; default torch)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3)")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: all logical CPUs)"
    )
    parser.add_argument(
        "--sections",
        type=_csv,
        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default all)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile in the speed-up study"
    )
    parser.add_argument(
        "--weights", type=Path, help="pipeline weights (default: the shipped ones)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=_ints,
        help="the batches section's batch sizes, comma-separated (default 1,4,8)",
    )
    parser.add_argument(
        "--compile-variants",
        type=_csv,
        help="the compile section's variants, comma-separated (eager, compile, "
        "compile_no_freezing, compile_max_autotune; default: all that apply to the device)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="measure nothing: put earlier runs (folders with bench.json) side by side in "
        "OUT/compare.md and OUT/compare.json",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="our detector's network input, multiples of 32 (default: the --weights file's, "
        "the shipped model's without it)",
    )
    parser.add_argument(
        "--frame",
        type=Path,
        help="a real image for the pipeline section (default: a KITTI sample frame when "
        "../shared/data is present, else a generated frame)",
    )


def _default_frame() -> Path | None:
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kitti_sample"
    images = sorted((root / "training" / "image_2").glob("*.png")) if root.is_dir() else []
    return images[0] if images else None


def _weights_input_size(weights: Path | None) -> tuple[int, int] | None:
    """The input size a weights file (default: the shipped model) runs at; None without one."""
    from dds_perception.pipeline import default_weights
    from dds_perception.utils.checkpoint import read_meta

    if weights is None:
        try:
            weights = default_weights()
        except FileNotFoundError:
            return None
    size = read_meta(weights).get("input_size")
    return None if size is None else (int(size[0]), int(size[1]))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from the parsed command line."""
    from dds_perception.utils.runtime import resolve_device

    device = resolve_device(args.device)
    changes = {"device": device, "half": args.half, "backends": args.backend}
    for name in ("repeats", "warmup", "threads", "sections", "weights", "batch_sizes"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.repeats is not None and args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}")
    if args.input_size is not None:
        height, width = args.input_size
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            raise BenchError(f"--input-size {height} {width}: need positive multiples of 32")
        changes["our_input"] = (height, width)
    elif not args.quick:
        size = _weights_input_size(args.weights)
        if size is not None:
            changes["our_input"] = size
    if args.no_compile:
        changes["compile"] = False
    if args.compile_variants is not None:
        changes["compile_variants"] = args.compile_variants
    frame = args.frame if args.frame is not None else (None if args.quick else _default_frame())
    if frame is not None and not frame.is_file():
        raise BenchError(f"--frame {frame}: no such file")
    changes["frame_image"] = frame
    changes["progress"] = lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True)
    if args.quick:
        return BenchConfig.quick_config(**changes)
    return BenchConfig(**changes)


def compare(dirs: list[Path], out: Path) -> int:
    """Write OUT/compare.md and OUT/compare.json from earlier runs' bench.json files."""
    import json

    from dds_perception.benchmarks.report import comparison_rows, render_comparison
    from dds_perception.utils.io import atomic_open, write_json

    runs = []
    for folder in dirs:
        path = folder / "bench.json"
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise BenchError(f"--compare {path}: cannot read a bench result ({error})") from error
        if "environment" not in runs[-1]:
            raise BenchError(f"--compare {path}: not a bench.json (no 'environment')")
    out.mkdir(parents=True, exist_ok=True)
    sources = [str(d) for d in dirs]
    write_json(out / "compare.json", {"runs": sources, "rows": comparison_rows(runs)})
    with atomic_open(out / "compare.md", "w", encoding="utf-8") as handle:
        handle.write(render_comparison(runs, sources))
    print(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from dds_perception.benchmarks.report import render_markdown, write_plots
    from dds_perception.utils.io import atomic_open, write_json

    if args.compare:
        return compare(args.compare, args.out)
    config = config_from_args(args)
    results = run_bench(config, command=["dds-perception", "bench", *sys.argv[2:]])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = write_plots(results, out)
    write_json(out / "bench.json", results)
    with atomic_open(out / "bench.md", "w", encoding="utf-8") as handle:
        handle.write(render_markdown(results))
    target = results.get("target", {})
    if target.get("best"):
        best = target["best"]
        print(
            f"speed ratio to ssd300_vgg16: best {best['ratio']:.2f}x ({best['backend']}, "
            f"{best['settings']}); target {target['target_ratio']:.0f}x "
            f"{'reached' if target['reached'] else 'not reached'}"
        )
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(results['plots'])} plots")
    return 0
