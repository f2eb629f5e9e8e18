"""Human-readable output of a bench run: ``bench.md`` tables and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dds_perception.benchmarks.candidates import REFERENCE
from dds_perception.benchmarks.suites import OURS

PLOTS = (
    "backbones_latency_vs_macs.png",
    "backbones_latency_vs_params.png",
    "detectors_latency.png",
    "detectors_latency_vs_macs.png",
    "pipeline_stages.png",
    "speedups.png",
)


def _m(value: float | int) -> str:
    return f"{value / 1e6:.2f}"


def _g(value: float | int) -> str:
    return f"{value / 1e9:.2f}"


def _t(ms: float) -> str:
    """Milliseconds with a precision that suits the value (GPU calls take fractions of one)."""
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _ms(timing: dict[str, Any] | None) -> str:
    if not timing:
        return "-"
    return f"{_t(timing['median_ms'])} ({_t(timing['min_ms'])}-{_t(timing['max_ms'])})"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _environment(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    cfg = results["config"]
    lines = [
        "## Machine and method",
        "",
        f"- date (UTC): {env['date_utc']}; command: `{' '.join(results.get('command') or [])}`",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, ISA: "
        f"{', '.join(env['cpu_isa']) or '-'}), {env.get('memory_total_gb')} GB RAM; "
        f"device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- torch {env['torch']}, torchvision {env['torchvision']}, numpy {env['numpy']}, "
        f"onnxruntime {env.get('onnxruntime')}, Python {env['python']}, {env['platform']}",
        f"- threads: torch intra-op {env['torch_threads']}, inter-op "
        f"{env['torch_interop_threads']}; oneDNN enabled: {env['mkldnn_enabled']}",
        f"- load average at start (1/5/15 min): {env.get('load_average_1_5_15')} "
        "(other processes on a shared machine slow every number; ratios are measured "
        "interleaved, so they suffer less)",
        f"- timing: {cfg['warmup']} warm-up calls, then {cfg['repeats']} timed calls; "
        "median (min-max) in ms; CUDA synchronised around each call",
        "- MACs: torch.utils.flop_counter.FlopCounterMode FLOPs / 2 (convolutions and matrix "
        "products only)",
    ]
    if cfg.get("quick"):
        lines.append("- **--quick run: tiny sizes and 1 repeat; the numbers mean nothing**")
    return [*lines, ""]


def _backbones(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    size = rows[0]["input"]
    body = []
    for r in rows:
        body.append(
            [
                r["name"],
                r["source"],
                r["backend"],
                _m(r["params"]),
                _g(r["macs"]) if r["macs"] < 1e8 else f"{r['macs'] / 1e6:.0f} M",
                _ms(r.get("latency_ms")),
                _ms(r.get("plain_latency_ms")),
                f"{r['throughput_img_s']:.1f}" if "throughput_img_s" in r else r.get("error", "-"),
            ]
        )
    batch = next((r["throughput_batch"] for r in rows if "throughput_batch" in r), "-")
    return [
        f"## Backbones ({size[0]}x{size[1]}, 1000 classes, untrained)",
        "",
        *_table(
            [
                "model",
                "from",
                "backend",
                "params (M)",
                "MACs",
                "latency b1 ms, default",
                "latency b1 ms, plain eager",
                f"throughput b{batch} (img/s)",
            ],
            body,
        ),
        "",
    ]


def _detectors(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    info = {m["name"]: m for m in section["models"]}
    frame = section["frame"]
    body = []
    for run in section["runs"]:
        m = info.get(run["name"], {})
        if "error" in run:
            body.append(
                [run["name"], run["backend"], run["settings"], "-", "-", "-", run["error"], "-"]
            )
            continue
        body.append(
            [
                run["name"],
                run["backend"],
                run["settings"],
                "x".join(str(v) for v in m.get("input", [])),
                _m(m.get("params", 0)),
                _g(m.get("macs", 0)),
                _ms(run["network_ms"]),
                f"**{run['ratio_to_ssd300_vgg16']:.2f}x**"
                if run["name"] == OURS
                else f"{run.get('ratio_to_ssd300_vgg16', float('nan')):.2f}x",
            ]
        )
    return [
        f"## Detectors on a {frame[1]}x{frame[0]} KITTI frame (batch 1)",
        "",
        "Network = backbone + detection head on the tensor each model runs on (ours: the frame "
        "letterboxed to a multiple of 32; torchvision's: what its own transform makes of the "
        "frame). `plain` = eager PyTorch, nothing else; `optimized` = the pipeline's default "
        "speed-ups, applied to every model where they apply. All models of one row group are "
        "measured interleaved; the ratio is SSD300-VGG16's median / the model's median.",
        "",
        *_table(
            [
                "model",
                "backend",
                "settings",
                "input HxW",
                "params (M)",
                "GMACs",
                "network ms",
                "speed vs ssd300_vgg16",
            ],
            body,
        ),
        "",
    ]


def _pipeline(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    body = [[stage, _ms(t)] for stage, t in section["stages"].items()]
    body.append(["**total**", _ms(section["total_ms"])])
    share = section["outside_network_share"]
    where = "on the device (torch ops)" if section.get("pre_and_post_on_device") else "cv2, host"
    return [
        f"## Pipeline end to end ({section['frame'][1]}x{section['frame'][0]} "
        f"{section['encoding']} buffer -> detections -> Detection2DArray)",
        "",
        f"Weights: {section['weights']}; frame: {section['frame_source']}; network input "
        f"{section['input_size'][0]}x{section['input_size'][1]}; device {section['device']} "
        f"({section.get('precision', 'fp32')}); letterbox, normalisation and NMS "
        f"{where}; "
        f"{section['detections']} detections; messages: {section['message_building']}.",
        "",
        *_table(["stage", "ms median (min-max)"], body),
        "",
        f"Share of the end-to-end time spent outside the network: **{share:.1%}** "
        f"(target <= {section['target_outside_share']:.0%}). Peak RSS "
        f"{section['memory']['peak_rss_mb']:.0f} MiB.",
        "",
    ]


def _batches(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    body = []
    for r in section["rows"]:
        ratio = r.get("ratio_to_ssd300_vgg16")
        body.append(
            [
                r["name"],
                r["precision"],
                r["batch"],
                _ms(r["batch_ms"]),
                _t(r["ms_per_frame"]),
                f"{r['frames_per_s']:.1f}",
                "-" if ratio is None else f"**{ratio:.2f}x**",
            ]
        )
    notes = [
        f"- not measured: {e['model']} {e['precision']}: {e['error']}"
        for e in section.get("errors", [])
    ]
    return [
        f"## Batches ({OURS} and {REFERENCE}, default speed-ups for both, median)",
        "",
        "Each (precision, batch) pair measured interleaved; latency per frame = batch latency / "
        "batch size; the ratio compares the per-frame latencies (above 1: ours is faster).",
        "",
        *_table(
            [
                "model",
                "precision",
                "batch",
                "ms per batch (min-max)",
                "ms per frame",
                "frames/s",
                "speed ratio",
            ],
            body,
        ),
        "",
        *notes,
        "",
    ]


def _compile(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    body = [
        [
            r["variant"],
            r["model"],
            _ms(r["latency_ms"]),
            f"{r['first_call_s']:.1f}",
            r["meaning"],
        ]
        for r in section["rows"]
    ]
    notes = [
        f"- not measured: {e['variant']} of {e['model']}: {e['error']}"
        for e in section.get("errors", [])
    ]
    return [
        "## torch.compile options (batch 1, interleaved)",
        "",
        *_table(["variant", "model", "ms median (min-max)", "first call s", "meaning"], body),
        "",
        *notes,
        "",
    ]


def _planning(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    verdict = "within" if section["within_budget"] else "over"
    return [
        f"## Tracker and distance ({section['cars']} cars, {section['frames']} frames)",
        "",
        f"Per frame, median of {section['repeats']} passes: the node's planning stage "
        f"**{section['planning_ms_per_frame']:.3f} ms** ({verdict} the "
        f"{section['budget_ms']:.1f} ms budget): tracker "
        f"{section['tracker_ms_per_frame']:.3f} ms, distance with covariance "
        f"{section['distance_ms_per_frame']:.3f} ms.",
        "",
    ]


def _memory(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    body = [
        [
            r["name"],
            r["what"],
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_rss_delta_mb']:.0f}",
            "-" if r.get("cuda_footprint_mb") is None else f"{r['cuda_footprint_mb']:.0f}",
            r["method"],
        ]
        for r in rows
    ]
    return [
        "## Memory (default settings, one inference)",
        "",
        *_table(
            [
                "model",
                "what",
                "peak RSS MiB",
                "added by the call MiB",
                "CUDA footprint MiB",
                "method",
            ],
            body,
        ),
        "",
    ]


def _speedups(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    body = []
    for e in section["table"]:
        gain_ours = e.get(f"{OURS}_gain", e.get(f"{OURS}_gain_vs_plain"))
        gain_ref = e.get(f"{REFERENCE}_gain", e.get(f"{REFERENCE}_gain_vs_plain"))
        body.append(
            [
                e["variant"],
                e["meaning"],
                _t(e[f"{OURS}_ms"]),
                "-" if gain_ours is None else f"{gain_ours:.2f}x",
                _t(e[f"{REFERENCE}_ms"]),
                "n/a" if gain_ref is None else f"{gain_ref:.2f}x",
                f"**{e['ratio']:.2f}x**",
            ]
        )
    compile_rows = [r for r in section["runs"] if r["variant"] == "compile"]
    notes = [
        f"- compile time of {r['model']}: {r['first_call_s']:.1f} s (first call)"
        for r in compile_rows
    ]
    notes += [
        f"- not measured: {e['variant']} of {e['model']}: {e['error']}"
        for e in section.get("errors", [])
    ]
    return [
        f"## Speed-ups on and off ({OURS} against {REFERENCE}, torch backend, median ms)",
        "",
        "`default` = every eager speed-up on (the pipeline's default); each `X=off` row turns "
        "one off and keeps the rest, so its gain (off / default) is that switch's own "
        "contribution (an `X=on` row turns on one that is off by default on this device; "
        "its gain is default / on); `plain` and `compile` gains are against plain eager. "
        "n/a: the switch does not apply to that model (SSD300-VGG16 has no BatchNorm and no "
        "pyramid block). All rows were measured interleaved in one pool.",
        "",
        *_table(
            ["variant", "meaning", f"{OURS} ms", "gain", f"{REFERENCE} ms", "gain", "speed ratio"],
            body,
        ),
        "",
        *notes,
        "",
    ]


def _profile(section: dict[str, Any]) -> list[str]:
    if not section:
        return []
    lines = [f"## Where the time goes ({OURS}, torch.profiler self CPU time)", ""]
    categories: list[str] = []
    for data in section.values():
        categories += [c for c in data["share"] if c not in categories]
    body = [[c, *(f"{section[k]['share'].get(c, 0.0):.1%}" for k in section)] for c in categories]
    body.append(["ms per call (profiled)", *(f"{section[k]['ms_per_call']:.1f}" for k in section)])
    lines += _table(["operator category", *section.keys()], body)
    return [*lines, ""]


def _target(target: dict[str, Any]) -> list[str]:
    if not target or not target.get("ratios"):
        return []
    best = target["best"]
    verdict = "REACHED" if target["reached"] else "NOT reached"
    body = [
        [r["source"], r["backend"], r["settings"], f"{r['ratio']:.2f}x"] for r in target["ratios"]
    ]
    return [
        f"## Target: {OURS} >= {target['target_ratio']:.0f}x faster than {REFERENCE}",
        "",
        f"**{verdict}**: best {best['ratio']:.2f}x ({best['backend']}, {best['settings']}).",
        "",
        *_table(["measured in", "backend", "settings", "speed ratio"], body),
        "",
    ]


def render_markdown(results: dict[str, Any]) -> str:
    """The whole ``bench.md``."""
    lines = ["# dds_perception benchmark", ""]
    lines += _target(results.get("target", {}))
    lines += _detectors(results.get("detectors", {}))
    lines += _speedups(results.get("speedups", {}))
    lines += _profile(results.get("profile", {}))
    lines += _batches(results.get("batches", {}))
    lines += _compile(results.get("compile", {}))
    lines += _pipeline(results.get("pipeline", {}))
    lines += _planning(results.get("planning", {}))
    lines += _backbones(results.get("backbones", []))
    lines += _memory(results.get("memory", []))
    lines += _environment(results)
    return "\n".join(lines).rstrip() + "\n"


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the PNG plots for the sections present; return the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dds_perception.utils.io import atomic_path

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(name)

    backbones = [r for r in results.get("backbones", []) if "latency_ms" in r]
    for key, label, name in (
        ("macs", "MACs (M)", "backbones_latency_vs_macs.png"),
        ("params", "parameters (M)", "backbones_latency_vs_params.png"),
    ):
        if not backbones:
            break
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in backbones:
            x, y = r[key] / 1e6, r["latency_ms"]["median_ms"]
            ax.scatter(x, y, color="C3" if r["source"] == "dds_perception" else "C0")
            ax.annotate(f"{r['name']} ({r['backend']})", (x, y), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("latency, batch 1 (ms, median)")
        ax.set_title("Backbones: latency vs " + label.split(" ")[0])
        save(fig, name)

    detectors = results.get("detectors", {})
    runs = [r for r in detectors.get("runs", []) if "network_ms" in r]
    if runs:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['name']}\n{r['backend']}/{r['settings']}" for r in runs]
        values = [r["network_ms"]["median_ms"] for r in runs]
        colors = ["C3" if r["name"].startswith("dds_") else "C0" for r in runs]
        ax.barh(range(len(runs)), values, color=colors)
        ax.set_yticks(range(len(runs)), labels, fontsize=6)
        ax.set_xlabel("network latency, batch 1 (ms, median)")
        ax.set_title("Detectors on a KITTI frame")
        save(fig, "detectors_latency.png")
        macs = {m["name"]: m["macs"] for m in detectors["models"]}
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            x, y = macs[r["name"]] / 1e9, r["network_ms"]["median_ms"]
            ax.scatter(x, y, color="C3" if r["name"].startswith("dds_") else "C0")
            ax.annotate(f"{r['name']} ({r['settings']})", (x, y), fontsize=6)
        ax.set_xlabel("GMACs")
        ax.set_ylabel("network latency (ms, median)")
        ax.set_title("Detectors: latency vs MACs")
        save(fig, "detectors_latency_vs_macs.png")

    pipeline = results.get("pipeline")
    if pipeline:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        left = 0.0
        for i, (stage, t) in enumerate(pipeline["stages"].items()):
            ax.barh([0], [t["median_ms"]], left=left, color=f"C{i}", label=stage)
            left += t["median_ms"]
        ax.set_yticks([])
        ax.set_xlabel("ms (median per stage)")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45))
        ax.set_title("Pipeline stages")
        save(fig, "pipeline_stages.png")

    speedups = results.get("speedups")
    if speedups:
        table = speedups["table"]
        fig, ax = plt.subplots(figsize=(8, 4))
        y = range(len(table))
        ax.barh(
            [i - 0.2 for i in y], [e[f"{OURS}_ms"] for e in table], 0.4, label=OURS, color="C3"
        )
        ax.barh(
            [i + 0.2 for i in y],
            [e[f"{REFERENCE}_ms"] for e in table],
            0.4,
            label=REFERENCE,
            color="C0",
        )
        ax.set_yticks(list(y), [e["variant"] for e in table], fontsize=7)
        ax.set_xlabel("latency (ms, median)")
        ax.legend(fontsize=7)
        ax.set_title("Speed-ups on/off")
        save(fig, "speedups.png")
    return written


# ----------------------------------------------------------------------------- several runs
def _run_label(results: dict[str, Any]) -> str:
    env, cfg = results["environment"], results["config"]
    if env.get("gpu"):
        return f"{env['gpu']} {'fp16' if cfg.get('half') else 'fp32'}"
    return f"CPU, {env['torch_threads']} thread(s)"


def _measured(
    results: dict[str, Any], model: str, settings: str
) -> tuple[float | None, float | None]:
    """(median network ms of ``model``, its speed ratio to the reference) under ``settings``:
    the detectors section's row, else the speed-up pool's (the run's own ratio, not recomputed
    from rounded medians)."""
    detectors = {"default": "optimized", "plain": "plain"}.get(settings)
    for row in results.get("detectors", {}).get("runs", []):
        if (row["name"], row.get("backend"), row.get("settings")) == (model, "torch", detectors):
            ms = row["network_ms"]["median_ms"] if "network_ms" in row else None
            return ms, row.get("ratio_to_ssd300_vgg16")
    for entry in results.get("speedups", {}).get("table", []):
        if entry["variant"] == settings:
            return entry.get(f"{model}_ms"), entry.get("ratio")
    return None, None


def comparison_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per quantity, one value per run (None where a run did not measure it)."""
    rows: list[dict[str, Any]] = []
    for settings in ("plain", "default", "compile"):
        ours, ratios = zip(*(_measured(r, OURS, settings) for r in runs), strict=True)
        ref = [_measured(r, REFERENCE, settings)[0] for r in runs]
        if all(v is None for v in ours):
            continue
        rows.append({"what": f"{OURS} network ms ({settings})", "values": list(ours)})
        rows.append({"what": f"{REFERENCE} network ms ({settings})", "values": ref})
        ratios = list(ratios)
        rows.append({"what": f"speed ratio ({settings})", "values": ratios, "ratio": True})
    keys: list[tuple[str, int]] = []
    for run in runs:
        for row in run.get("batches", {}).get("rows", []):
            if (row["precision"], row["batch"]) not in keys:
                keys.append((row["precision"], row["batch"]))
    for precision, batch in keys:
        for model in (OURS, REFERENCE):
            values = []
            for run in runs:
                found = [
                    r["ms_per_frame"]
                    for r in run.get("batches", {}).get("rows", [])
                    if (r["name"], r["precision"], r["batch"]) == (model, precision, batch)
                ]
                values.append(found[0] if found else None)
            what = f"{model} ms per frame, batch {batch}, {precision}"
            rows.append({"what": what, "values": values})
    pipelines = [r.get("pipeline") or {} for r in runs]
    if any(pipelines):
        rows.append(
            {
                "what": "pipeline end to end ms",
                "values": [p["total_ms"]["median_ms"] if p else None for p in pipelines],
            }
        )
        rows.append(
            {
                "what": "share outside the network",
                "values": [p["outside_network_share"] if p else None for p in pipelines],
                "share": True,
            }
        )
    return rows


def render_comparison(runs: list[dict[str, Any]], sources: list[str]) -> str:
    """``compare.md``: several bench runs (e.g. CPU and GPU) side by side."""

    def cell(value: float | None, row: dict[str, Any]) -> str:
        if value is None:
            return "-"
        if row.get("ratio"):
            return f"**{value:.2f}x**"
        return f"{value:.1%}" if row.get("share") else _t(value)

    header = ["", *(_run_label(r) for r in runs)]
    body = [[row["what"], *(cell(v, row) for v in row["values"])] for row in comparison_rows(runs)]
    lines = [
        "# dds_perception benchmark: runs side by side",
        "",
        f"Batch 1, {OURS} on the 1242x375 frame letterboxed to 384x1248, {REFERENCE} on its own "
        "300x300; median ms. `default` = the pipeline's speed-ups for that device (see each "
        "run's bench.md), `plain` = eager PyTorch, `compile` = torch.compile on top of default. "
        "A ratio above 1 means ours is faster.",
        "",
        *_table(header, body),
        "",
        "Runs:",
        "",
    ]
    for results, source in zip(runs, sources, strict=True):
        env = results["environment"]
        machine = env.get("gpu") or env["cpu"]
        lines.append(
            f"- {_run_label(results)}: `{source}`, {env['date_utc']}, {machine}, "
            f"torch {env['torch']}; command: `{' '.join(results.get('command') or [])}`"
        )
    return "\n".join(lines) + "\n"
