"""Benchmarks: size, speed and memory of the backbones, the detectors and the pipeline.

``dds-perception bench`` (:mod:`dds_perception.benchmarks.command`) runs the sections of
:mod:`dds_perception.benchmarks.suites`; timing method in :mod:`.timing`, MAC counting in
:mod:`.flops`, peak memory in :mod:`.memory`, backends (torch, onnxruntime, ...) in
:mod:`.backends`, the report in :mod:`.report`.
"""
