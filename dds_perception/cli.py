"""The ``dds-perception`` command: one entry point, one module per sub-command.

Each sub-command lives in the layer that owns it and exposes ``add_arguments(parser)``,
``run(args) -> int``, optionally ``parse_arguments(parser, argv) -> args`` (else the parser's
own ``parse_args``), and a module docstring whose text after the first line becomes the
command's ``--help`` epilog (examples). Modules are imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dds_perception.utils.errors import INPUT_ERRORS

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("dds_perception.models.summary", "list the model zoo: parameters, MACs, RF"),
    "train-detector": ("dds_perception.engine.train_detector", "train the car detector (RPN)"),
    "train-classifier": ("dds_perception.engine.train_classifier", "train a Caltech classifier"),
    "evaluate-classifier": ("dds_perception.engine.evaluate_classifier", "classifier top-1/5"),
    "crossval": ("dds_perception.engine.crossval", "k-fold cross-validation of a detector recipe"),
    "import-weights": (
        "dds_perception.engine.import_weights",
        "torchvision MobileNetV2 .pth -> backbone weights file",
    ),
    "compare-backbones": ("dds_perception.engine.compare_backbones", "paper's backbone table"),
    "plot-accuracy": ("dds_perception.engine.plot_accuracy", "accuracy vs steps PNG"),
    "bench": ("dds_perception.benchmarks.command", "benchmark backbones, detectors, pipeline"),
    "demo": ("dds_perception.demo", "the main job: detect vehicles end to end and report AP"),
    "detector_node": ("dds_perception.ros.node", "the ROS 2 detector node (needs rclpy)"),
    "node": ("dds_perception.ros.dds.node", "the detector node on Cyclone DDS, without ROS 2"),
    "play": ("dds_perception.ros.dds.play", "publish a bag's topics over DDS (ROS 2 wire format)"),
    "record": ("dds_perception.ros.dds.record", "record DDS/ROS 2 topics into a ROS 2 bag"),
    "make-scenes": ("dds_perception.data.scenes", "write generated KITTI-format road scenes"),
    "anchors": ("dds_perception.data.anchor_stats", "anchor sizes/ratios from KITTI car boxes"),
    "export": ("dds_perception.deploy.cli", "ONNX export with metadata, checked by ONNX Runtime"),
    "evaluate": ("dds_perception.evaluation.cli", "KITTI 2D AP (AP_11, AP_40), devkit semantics"),
    "kitti2bag": ("dds_perception.ros.kitti2bag", "convert KITTI frames into a ROS 2 bag (10 Hz)"),
    "replay": ("dds_perception.ros.replay", "run a bag through the detector: AP + latency"),
    "evaluate-bag": ("dds_perception.ros.evaluate_bag", "AP of a recorded /detections bag"),
    "pseudo-label": ("dds_perception.ros.pseudo_label", "KITTI labels from a teacher ONNX"),
    "distance-eval": (
        "dds_perception.ros.distance_eval",
        "ground-plane distance error against KITTI's labelled car locations",
    ),
    "track-eval": ("dds_perception.ros.track_eval", "id switches of the tracker on a clip"),
}


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="dds-perception",
        description="Lightweight vehicle detection for ROS 2 (pyramid dilated MobileNetV2 + RPN).",
        epilog="Run 'dds-perception COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def _command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    doc = (module.__doc__ or "").strip().split("\n", 1)
    parser = argparse.ArgumentParser(
        prog=f"dds-perception {name}",
        description=doc[0] if doc[0] else summary,
        epilog=doc[1].strip() if len(doc) > 1 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help / usage errors and exits
        return 2
    parser, module = _command_parser(argv[0])
    # a command may parse its own way (training commands apply a --config recipe first)
    parse = getattr(module, "parse_arguments", None)
    try:
        args = parse(parser, argv[1:]) if parse else parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except INPUT_ERRORS as error:  # bad input: one clear line; a bug keeps its traceback
        print(f"dds-perception {argv[0]}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
