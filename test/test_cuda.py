"""The CUDA paths: graph replay, on-device normalisation, fp16 and the bench on a GPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest test/test_cuda.py``. The CPU-side logic of the same options (their
resolution per device, the switches the bench measures per device) is tested on every run.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dds_perception.benchmarks.suites import CPU_ONLY, CUDA_ONLY, SWITCHES, BenchConfig, _applies
from dds_perception.detection import DetectorConfig, build_detector
from dds_perception.detection.optimize import (
    CUDAGraphModule,
    InferenceOptions,
    OptimizeError,
    has_depthwise_conv,
    optimize_for_inference,
)
from dds_perception.detection.postprocess import match_detections
from dds_perception.models import get_model, list_models
from dds_perception.pipeline import SYNTHETIC_WEIGHTS, Pipeline, default_weights

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CI has none)")


def _detector() -> torch.nn.Module:
    torch.manual_seed(0)
    config = DetectorConfig(backbone_kwargs={"width_mult": 0.25}, input_size=(192, 640))
    return build_detector(config).eval()


# ----------------------------------------------------------------------------- everywhere
def test_options_resolve_per_device():
    """The measured winners per device (H200 and 2-core CPU numbers in the README)."""

    def picks(options: InferenceOptions) -> tuple[bool, ...]:
        return (
            options.channels_last,
            options.split_pyramid,
            options.cudnn_benchmark,
            options.cuda_graphs,
        )

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    detector, dense = _detector(), torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    assert picks(InferenceOptions().resolved(cpu, False, detector)) == (True, True, False, False)
    assert picks(InferenceOptions().resolved(cuda, False, detector)) == (False, False, True, True)
    # NHWC on CUDA only in fp16 and only without depthwise convolutions
    assert InferenceOptions().resolved(cuda, True, detector).channels_last is False
    assert InferenceOptions().resolved(cuda, True, dense).channels_last is True
    assert InferenceOptions().resolved(cuda, False, dense).channels_last is False
    assert InferenceOptions().resolved(cuda, True).channels_last is False  # model unknown
    # an explicit True cannot switch a CUDA-only option on for the CPU; False is kept
    forced = InferenceOptions(cuda_graphs=True, cudnn_benchmark=True)
    assert forced.resolved(cpu, False).cuda_graphs is False
    assert InferenceOptions(cuda_graphs=False).resolved(cuda, False).cuda_graphs is False
    assert InferenceOptions(channels_last=True).resolved(cuda, False).channels_last is True
    assert has_depthwise_conv(detector) and not has_depthwise_conv(dense)


def test_bench_switches_per_device():
    cpu = BenchConfig(device=torch.device("cpu"))
    cuda = BenchConfig(device=torch.device("cuda"), half=True)
    cuda32 = BenchConfig(device=torch.device("cuda"), half=False)
    names = [s for s, _, _ in SWITCHES]
    assert [s for s in names if _applies(s, cpu)] == [s for s in names if s not in CUDA_ONLY]
    assert [s for s in names if _applies(s, cuda)] == [s for s in names if s not in CPU_ONLY]
    assert not _applies("half", cuda32) and _applies("cuda_graphs", cuda32)


def test_cuda_graph_module_refuses_a_cpu_input():
    with pytest.raises(OptimizeError, match="CUDA input"):
        CUDAGraphModule(_detector(), torch.zeros(1, 3, 192, 640))


def test_cpu_optimisation_captures_no_graph():
    model = optimize_for_inference(_detector(), "cpu", example=torch.zeros(1, 3, 192, 640))
    assert not isinstance(model, CUDAGraphModule)


# ----------------------------------------------------------------------------- on a GPU
@needs_cuda
def test_cuda_graph_replay_matches_eager_and_follows_new_inputs():
    model = _detector()
    example = torch.randn(1, 3, 192, 640)
    eager = optimize_for_inference(
        model, "cuda", example=example, options=InferenceOptions(cuda_graphs=False)
    )
    graphed = optimize_for_inference(model, "cuda", example=example)
    assert isinstance(graphed, CUDAGraphModule)
    for seed in (1, 2):  # fresh inputs: the replay must read the new data
        x = torch.randn(1, 3, 192, 640, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.inference_mode():
            want = eager(x)
            got = {k: v.clone() for k, v in graphed(x).items()}
        for key in ("scores", "boxes"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3)
    with torch.inference_mode():  # another shape runs eagerly instead of replaying
        other = graphed(torch.randn(1, 3, 128, 416).cuda())
    assert other["scores"].shape[1] < got["scores"].shape[1]


def _same_network_outputs(want: dict, got: dict, score_atol: float) -> None:
    """Per-anchor outputs of one input on two devices / precisions: every score within
    ``score_atol``; the boxes of the anchors that score at all within 2 % of their size + 1 px
    (a background anchor's box can be anywhere and is never kept)."""
    scores, other = want["scores"].float().cpu(), got["scores"].float().cpu()
    assert scores.shape == other.shape
    assert (scores - other).abs().max() <= score_atol, (scores - other).abs().max()
    boxes, other_boxes = want["boxes"].float().cpu(), got["boxes"].float().cpu()
    scoring = scores > 0.05
    size = (boxes[..., 2:] - boxes[..., :2]).abs().amax(-1, keepdim=True)
    error = (boxes - other_boxes).abs()[scoring]
    assert (error <= 0.02 * size[scoring] + 1.0).all(), error.max()


def _same_detections(want, got, operating: float) -> None:
    """The detections of one frame at the model's operating threshold, one to one: every box
    scoring ``operating + 0.05`` or more on either side found on the other (IoU >= 0.7, the
    KITTI car criterion), scores within 0.05. Boxes near the threshold may exist on one side;
    where several anchors of one car score alike, NMS may keep a neighbour (IoU 0.7-0.9)."""
    match = match_detections(want.boxes, want.scores, got.boxes, got.scores, iou=0.7)
    confident = operating + 0.05
    assert all(want.scores[i] < confident for i in match.unmatched_a), match
    assert all(got.scores[j] < confident for j in match.unmatched_b), match
    assert max(match.score_gaps(want.scores, got.scores), default=0.0) < 0.05, match


def _cuda_form_on_the_cpu(model: torch.nn.Module) -> Pipeline:
    """A CPU pipeline built the way a CUDA one is: the options CUDA resolves to (graphs and
    cuDNN aside) and letterbox / NMS as torch ops on the device."""
    from dds_perception.deploy.backends import TorchBackend

    cuda = InferenceOptions().resolved(torch.device("cuda"), False, model)
    options = InferenceOptions(**{**cuda.__dict__, "cuda_graphs": False, "cudnn_benchmark": False})
    backend = TorchBackend(model, device="cpu", options=options)
    return Pipeline(backend, on_device=True, score_threshold=0.01)


def test_the_cuda_checks_on_the_cpu(tmp_path):
    """The per-frame checks of the CUDA test where CI runs them: the CPU pipeline against a
    CPU pipeline in CUDA's form passes them; a network with one layer changed fails them."""
    from dds_perception.data.images import to_rgb
    from dds_perception.data.scenes import generate_kitti_scenes
    from dds_perception.detection.weights import load_detector

    root = generate_kitti_scenes(tmp_path / "scenes", 2, seed=77, val_fraction=0.0)
    frame = sorted((root / "training" / "image_2").glob("*.png"))[0].read_bytes()
    model = load_detector(default_weights(SYNTHETIC_WEIGHTS))
    cpu = Pipeline.from_weights(default_weights(SYNTHETIC_WEIGHTS), device="cpu")
    like_cuda = _cuda_form_on_the_cpu(model)
    x, _ = cpu.preprocess(to_rgb(frame, "png"))
    x = x.clone()
    want = {k: v.clone() for k, v in cpu.infer(x).items()}
    _same_network_outputs(want, like_cuda.infer(x.contiguous()), score_atol=1e-4)
    like_cuda.score_threshold = operating = cpu.score_threshold
    reference = cpu(frame, "png")
    assert len(reference) > 0
    _same_detections(reference, like_cuda(frame, "png"), operating)
    broken = load_detector(default_weights(SYNTHETIC_WEIGHTS))
    with torch.no_grad():  # one layer's weights off by 30 %: a wrong layout or kernel
        broken.heads[0].cls_logits.weight.mul_(1.3)
    wrong = _cuda_form_on_the_cpu(broken)
    with pytest.raises(AssertionError):
        _same_network_outputs(want, wrong.infer(x.contiguous()), score_atol=0.06)
    wrong.score_threshold = operating
    with pytest.raises(AssertionError):
        _same_detections(reference, wrong(frame, "png"), operating)


@needs_cuda
def test_cuda_pipeline_matches_cpu_and_fp16_keeps_the_accuracy(tmp_path, scene_ap):
    """The synthetic-scene weights on 24 unseen scenes: CPU fp32, CUDA fp32 and fp16 AP_40,
    the per-anchor network outputs of one frame, and its detections at the operating threshold.

    The earlier form of this test compared the detections kept at score 0.01 (100 boxes, the
    cap) by their count and by the top 10 CPU boxes each being found again with IoU > 0.98 /
    0.95. At 0.01 NMS keeps many overlapping background boxes whose survival flips with any
    rounding change: perturbing the CPU logits by N(0, 0.02) (fp16-sized) failed those checks
    in 61 of 80 trials on these scenes, N(0, 0.005) (TF32-sized) in 8 of 80. It passed with
    the first CUDA defaults and failed once NCHW and the unsplit pyramid (other cuDNN kernels,
    other rounding) became the defaults, while the APs stayed equal. These checks (network
    outputs to a tolerance, detections at the operating threshold matched one to one) failed
    0 of 80 trials at both sizes and still fail for a wrong network (tested on the CPU in
    test_inference_forms and test_pipeline).
    """
    from dds_perception.data.images import to_rgb
    from dds_perception.data.scenes import generate_kitti_scenes

    root = generate_kitti_scenes(tmp_path / "scenes", 24, seed=77, val_fraction=0.0)
    frame = sorted((root / "training" / "image_2").glob("*.png"))[0].read_bytes()
    aps, outputs, detections = {}, {}, {}
    runs = (("cpu", "cpu", False), ("cuda", "cuda", False), ("fp16", "cuda", True))
    reference_input = None
    benchmark_flag = torch.backends.cudnn.benchmark
    for label, device, half in runs:
        pipeline = Pipeline.from_weights(
            default_weights(SYNTHETIC_WEIGHTS), device=device, half=half, score_threshold=0.01
        )
        assert torch.backends.cudnn.benchmark == benchmark_flag  # no process-wide change
        assert pipeline.on_device == (device == "cuda")
        result = scene_ap(pipeline, root)
        aps[label] = {d: result.ap("Car", d, "AP_40") for d in ("easy", "moderate", "hard")}
        if reference_input is None:  # the CPU's input tensor, fed to every network
            reference_input, _ = pipeline.preprocess(to_rgb(frame, "png"))
            reference_input = reference_input.clone()
        layout = torch.channels_last if pipeline.channels_last else torch.contiguous_format
        x = reference_input.to(device, pipeline.backend.input_dtype)
        outputs[label] = {
            k: v.clone() for k, v in pipeline.infer(x.contiguous(memory_format=layout)).items()
        }
        operating = pipeline.config.score_threshold  # the file's: what the node runs at
        pipeline.score_threshold = operating
        detections[label] = pipeline(frame, "png")
    print(json.dumps(aps))
    assert len(detections["cpu"]) > 0
    for label, score_atol in (("cuda", 0.03), ("fp16", 0.06)):  # cuDNN's TF32, then fp16
        _same_network_outputs(outputs["cpu"], outputs[label], score_atol)
        _same_detections(detections["cpu"], detections[label], operating)
    for difficulty in ("easy", "moderate", "hard"):
        assert abs(aps["cuda"][difficulty] - aps["cpu"][difficulty]) < 0.5, aps
        assert abs(aps["fp16"][difficulty] - aps["cpu"][difficulty]) < 2.0, aps


@needs_cuda
@pytest.mark.parametrize("half", [False, True])
def test_cuda_bench_quick_measures_the_cuda_switches(tmp_path, half):
    from dds_perception.benchmarks.suites import run_bench

    config = BenchConfig.quick_config(
        device=torch.device("cuda"), half=half, sections=("detectors", "speedups", "pipeline")
    )
    results = run_bench(config)
    variants = {e["variant"] for e in results["speedups"]["table"]}
    assert {"cuda_graphs=off", "cudnn_benchmark=off"} <= variants
    assert ("half=off" in variants) == half
    assert not results["speedups"]["errors"]
    defaults = [r for r in results["speedups"]["runs"] if r["variant"] == "default"]
    assert len(defaults) == 2
    assert all("replayed as one CUDA graph" in r["notes"] for r in defaults), defaults
    assert results["environment"]["gpu"]
    assert results["pipeline"]["device"].startswith("cuda")


@needs_cuda
def test_cuda_pipeline_replays_a_graph_at_its_input_size():
    pipeline = Pipeline.from_weights(default_weights(), device="cuda", input_size=(384, 1248))
    assert isinstance(pipeline.model, CUDAGraphModule)
    assert tuple(pipeline.model.static_input.shape[-2:]) == (384, 1248)
    frame = torch.randint(0, 255, (375, 1242, 3), dtype=torch.uint8).numpy()
    tensor, _ = pipeline.preprocess(frame)
    assert pipeline.model._matches(tensor)  # frames replay the graph, not the eager fallback


def test_decode_matches_torchvision_box_coder():
    """The written-out decoding is torchvision's ``decode_single``, clip included."""
    model = _detector()
    generator = torch.Generator().manual_seed(3)
    xy = torch.rand(500, 2, generator=generator) * 600
    anchors = torch.cat([xy, xy + 8 + torch.rand(500, 2, generator=generator) * 200], 1)
    deltas = torch.randn(500, 4, generator=generator) * 2
    deltas[0, 2] = 50.0  # beyond bbox_xform_clip
    torch.testing.assert_close(
        model.decode(deltas, anchors), model.box_coder.decode_single(deltas, anchors)
    )


class _HostTensors(TorchFunctionMode):
    """Records tensors built from Python values (a host-to-device copy on a GPU)."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.from_numpy)

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FACTORIES:
            self.made.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _host_tensors(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Tensors the second forward pass builds from host values (the first caches anchors)."""
    with torch.inference_mode():
        model.eval()(x)
        with _HostTensors() as mode:
            model(x)
    return mode.made


def test_eval_forward_builds_no_tensor_from_host_values():
    """A CUDA graph cannot capture a host-to-device copy, so the detector's eval forward must
    not build tensors from Python values."""
    assert not _host_tensors(_detector(), torch.randn(1, 3, 192, 640))


@pytest.mark.parametrize("name", list_models())
def test_backbones_build_no_tensor_from_host_values(name):
    assert not _host_tensors(get_model(name, num_classes=10), torch.randn(1, 3, 64, 64))


@needs_cuda
@pytest.mark.parametrize("half", [False, True])
def test_cuda_detect_batch_replays_a_graph_per_batch_size(tmp_path, half):
    """Multi-camera batches on the GPU: a graph per batch size, each frame's detections what
    it gets alone (within the device's rounding)."""
    import cv2

    from dds_perception.data.scenes import generate_kitti_scenes

    root = generate_kitti_scenes(tmp_path / "scenes", 2, seed=77, val_fraction=0.0)
    images = sorted((root / "training" / "image_2").glob("*.png"))
    scenes = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in images]
    frames = [scenes[0], scenes[1], scenes[0][40:340, 200:800].copy()]  # two sizes, a crop
    pipeline = Pipeline.from_weights(default_weights(SYNTHETIC_WEIGHTS), device="cuda", half=half)
    alone = [pipeline(frame) for frame in frames]
    together = pipeline.detect_batch(frames)
    assert isinstance(pipeline.model, CUDAGraphModule)
    assert {1, 3} <= {shape[0] for shape in pipeline.model.graphs}
    assert sum(len(d) for d in alone) > 0
    for want, got in zip(alone, together, strict=True):
        _same_detections(want, got, pipeline.score_threshold)
