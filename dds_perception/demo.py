"""The main job of `make demo`: show what the package builds.

examples:
  dds-perception demo
"""

from __future__ import annotations

import argparse

from dds_perception.models import summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    summary.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return summary.run(args)
