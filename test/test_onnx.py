"""ONNX export, onnxruntime/tensorrt backends: same detections as torch, metadata, bad files.

The detector under test is small (width 0.5, 128x416 input: KITTI's aspect ratio) and made
"trained-like" without training: BatchNorm statistics are set from generated road scenes (one
train-mode pass with momentum 1) and the head weights are drawn so that car scores spread over
(0, 1) and depend on the image. Its detections are therefore image-dependent, neither empty nor
saturated, which makes "same count after NMS" a real check.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dds_perception.data.letterbox import boxes_to_source, letterbox_params
from dds_perception.deploy import (
    BackendError,
    OnnxModelError,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    create_backend,
    read_onnx_info,
)
from dds_perception.deploy.backends import engine_path_for, tensorrt_unavailable_reason
from dds_perception.deploy.export import ExportError, export_onnx, network_input, street_scene
from dds_perception.deploy.onnx_meta import META_KEY, file_sha256
from dds_perception.detection import (
    DetectorConfig,
    PostprocessParams,
    build_detector,
    postprocess,
    save_detector,
)

INPUT_SIZE = (128, 416)
TRT_SKIP = tensorrt_unavailable_reason()


def make_detector(
    input_size=INPUT_SIZE,
    width_mult: float = 0.5,
    seed: int = 0,
    refine_top_k: int = 0,
    refine_score: bool = False,
):
    """A small detector with image-dependent, spread-out scores (see the module docstring);
    with ``refine_top_k`` a second stage whose corrections (and with ``refine_score`` IoU
    outputs) depend on the image too."""
    torch.manual_seed(seed)
    config = DetectorConfig(
        input_size=input_size,
        backbone_kwargs={"width_mult": width_mult},
        score_threshold=0.8,
        refine_top_k=refine_top_k,
        refine_score=refine_score,
    )
    model = build_detector(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            module.momentum = 1.0
    for head in model.heads:
        torch.nn.init.normal_(head.conv[0][0].weight, 0.0, 0.05)
        torch.nn.init.normal_(head.cls_logits.weight, 0.0, 0.05)
        torch.nn.init.zeros_(head.cls_logits.bias)  # not the focal prior's p = 0.01
        torch.nn.init.normal_(head.bbox_pred.weight, 0.0, 0.005)
    if model.refiner is not None:
        torch.nn.init.normal_(model.refiner.deltas.weight, 0.0, 0.05)
        if model.refiner.quality is not None:
            torch.nn.init.normal_(model.refiner.quality.weight, 0.0, 0.05)
            torch.nn.init.constant_(model.refiner.quality.bias, 3.0)  # scores stay above 0.8
    frames = [network_input(street_scene(s), model, input_size) for s in range(100, 104)]
    model.train()
    with torch.no_grad():
        model.backbone.forward_features(torch.cat(frames))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads per process spin
    against each other and every test takes ~10x longer; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "detector.safetensors"
    save_detector(path, make_detector(), recipe={"note": "test detector"})
    return path


@pytest.fixture(scope="module")
def exported(weights):
    """The fp32, batch-1, opset-17 export of ``weights`` and its report."""
    out = weights.with_name("detector.onnx")
    report = export_onnx(weights, out)
    return out, report


@pytest.fixture(scope="module")
def backends(weights, exported):
    from dds_perception.detection import load_detector

    torch_backend = TorchBackend(load_detector(weights), device="cpu")
    return torch_backend, OnnxRuntimeBackend(exported[0], device="cpu")


def detect(backend, rgb: np.ndarray):
    """The shared postprocess on one frame: boxes in source pixels, scores."""
    config = backend.config
    x = network_input(rgb, backend, tuple(config.input_size)).to(backend.input_dtype)
    out = backend(x)
    params = PostprocessParams(config.score_threshold, config.nms_iou, config.max_detections)
    ((boxes, scores, _),) = postprocess(
        out["scores"].float().cpu(), out["boxes"].float().cpu(), params, tuple(config.input_size)
    )
    lb = letterbox_params(rgb.shape[:2], config.input_size)
    return boxes_to_source(boxes.numpy(), lb), scores.numpy()


def assert_same_detections(a, b, box_tol: float = 0.05, score_tol: float = 1e-4) -> int:
    (boxes_a, scores_a), (boxes_b, scores_b) = a, b
    assert len(scores_a) == len(scores_b), (len(scores_a), len(scores_b))
    np.testing.assert_allclose(boxes_a, boxes_b, atol=box_tol, rtol=0)
    np.testing.assert_allclose(scores_a, scores_b, atol=score_tol, rtol=0)
    return len(scores_a)


# ------------------------------------------------------------------------------ export
def test_onnx_export_report_and_metadata(weights, exported):
    path, report = exported
    v = report.validation
    assert v["scores_max_abs_diff"] < 1e-4 and v["boxes_max_abs_diff"] < 0.05
    assert v["detections_torch"] == v["detections_onnx"]
    assert report.opset == 17 and report.exporter == "torchscript"
    info = read_onnx_info(path)
    assert info.input_size == INPUT_SIZE and info.input_shape == (1, 3, *INPUT_SIZE)
    assert info.class_names == ["car"] and info.opset == 17 and not info.half
    assert info.config.score_threshold == 0.8
    assert info.config.backbone_kwargs == {"width_mult": 0.5}
    meta = info.meta
    assert meta["normalization"]["mean"] == list(info.config.mean)
    assert meta["source_weights"]["sha256"] == file_sha256(weights)
    # 4 x 13 cells at stride 32, 5 sizes x 3 ratios per cell
    assert meta["anchors"]["count"] == 4 * 13 * 15
    assert meta["validation"]["scores_max_abs_diff"] == v["scores_max_abs_diff"]
    flat = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert flat["class_names"] == ["car"] and flat["input_size"] == list(INPUT_SIZE)


def test_onnx_same_detections_generated_frames(backends):
    torch_backend, ort_backend = backends
    counts = []
    for seed in (1, 2, 3):
        rgb = street_scene(seed)
        counts.append(assert_same_detections(detect(torch_backend, rgb), detect(ort_backend, rgb)))
    assert all(0 < c < 100 for c in counts), counts  # neither empty nor saturated


def test_onnx_same_detections_real_kitti_frames(backends, kitti_sample):
    torch_backend, ort_backend = backends
    images = sorted((kitti_sample / "training" / "image_2").glob("*.png"))[:3]
    assert images
    for path in images:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert rgb.shape[0] in range(370, 377) and rgb.shape[1] in range(1224, 1243)
        assert_same_detections(detect(torch_backend, rgb), detect(ort_backend, rgb))


@pytest.mark.parametrize(("opset", "score"), [(13, True), (17, False)])
def test_onnx_refined_detector_same_detections(tmp_path, opset, score):
    """The second stage (top-k, RoI align, MLP, with or without its IoU output rescoring the
    candidates) exports at the TX2's opset 13 and at 17, with a dynamic batch, and gives the
    torch model's detections (opset 13's RoiAlign has no half-pixel option: the refiner uses
    the unaligned form both sides compute)."""
    model = make_detector(refine_top_k=50, refine_score=score)
    weights = save_detector(tmp_path / "refined.safetensors", model)
    path = tmp_path / "refined.onnx"
    export_onnx(weights, path, opset=opset, dynamic_batch=True)
    from dds_perception.detection import load_detector

    torch_backend = TorchBackend(load_detector(weights), device="cpu")
    ort_backend = OnnxRuntimeBackend(path, device="cpu")
    counts = []
    for seed in (1, 2):
        rgb = street_scene(seed)
        counts.append(assert_same_detections(detect(torch_backend, rgb), detect(ort_backend, rgb)))
    assert all(0 < c < 50 for c in counts), counts
    frames = torch.cat([network_input(street_scene(s), ort_backend, INPUT_SIZE) for s in (1, 2)])
    together, alone = ort_backend(frames), ort_backend(frames[1:])
    assert together["boxes"].shape == (2, 4 * 13 * 15, 4)  # per anchor, the top 50 refined
    torch.testing.assert_close(together["boxes"][1:], alone["boxes"], atol=1e-3, rtol=0)


def test_onnx_export_validates_on_given_images(weights, kitti_sample, tmp_path):
    images = sorted((kitti_sample / "training" / "image_2").glob("*.png"))[:2]
    report = export_onnx(weights, tmp_path / "m.onnx", validation_images=images, opset=13)
    assert report.validation["sources"] == [p.name for p in images]
    assert report.validation["frames"] == 2 and report.opset == 13
    assert read_onnx_info(tmp_path / "m.onnx").opset == 13  # TensorRT 8.2 (TX2) reads <= 13


def test_onnx_dynamic_batch(weights, tmp_path, backends):
    path = tmp_path / "dyn.onnx"
    export_onnx(weights, path, dynamic_batch=True)
    info = read_onnx_info(path)
    assert info.dynamic_batch and info.input_shape[0] == "batch"
    backend = OnnxRuntimeBackend(path)
    frames = [network_input(street_scene(s), backend, INPUT_SIZE) for s in (4, 5, 6)]
    together = backend(torch.cat(frames))
    assert together["scores"].shape == (3, 4 * 13 * 15)
    for i, frame in enumerate(frames):
        alone = backend(frame)
        torch.testing.assert_close(together["boxes"][i : i + 1], alone["boxes"], atol=1e-3, rtol=0)
    with pytest.raises(BackendError, match=r"exported for batch 1.*--dynamic-batch"):
        backends[1](torch.cat(frames[:2]))


def test_onnx_half_export(weights, tmp_path, backends):
    path = tmp_path / "half.onnx"
    report = export_onnx(weights, path, half=True)
    info = read_onnx_info(path)
    assert info.half and info.meta["precision"] == "fp16"
    assert report.size_bytes < 0.6 * (weights.stat().st_size)
    fp16 = report.validation["fp16_vs_fp32"]
    assert fp16["scores_max_abs_diff"] < 2e-2
    backend = create_backend("onnxruntime", path, device="cpu", half=True)
    assert backend.input_dtype == torch.float16
    _, scores = detect(backend, street_scene(1))
    _, ref_scores = detect(backends[0], street_scene(1))
    assert abs(len(scores) - len(ref_scores)) <= 1  # fp16 may move a box across a threshold
    with pytest.raises(BackendError, match=r"fp32 export.*--half"):
        create_backend("onnxruntime", weights.with_name("detector.onnx"), half=True)


def test_onnx_dynamo_exporter(weights, tmp_path):
    report = export_onnx(weights, tmp_path / "dynamo.onnx", opset=18, validate=True)
    assert report.exporter == "dynamo" and read_onnx_info(tmp_path / "dynamo.onnx").opset == 18
    assert report.validation["detections_torch"] == report.validation["detections_onnx"]


@pytest.mark.parametrize("channels", [1, 6])
def test_onnx_decomposed_prelu_is_exact(channels):
    from dds_perception.deploy.export import DecomposedPReLU, decompose_prelu

    prelu = torch.nn.PReLU(channels)
    torch.nn.init.uniform_(prelu.weight, -1.5, 1.5)  # negative and > 1 slopes too
    x = torch.randn(2, 6, 5, 7) * 3
    x[0, :, 0, 0] = 0.0
    torch.testing.assert_close(DecomposedPReLU(prelu)(x), prelu(x), atol=0, rtol=0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.Sequential(prelu))
    assert decompose_prelu(model) == 1 and isinstance(model[1][0], DecomposedPReLU)


def test_onnx_export_rejects_bad_options(weights, tmp_path):
    with pytest.raises(ExportError, match="dynamo exporter needs opset >= 18"):
        export_onnx(weights, tmp_path / "x.onnx", opset=13, exporter="dynamo")
    with pytest.raises(ExportError, match="input size"):
        export_onnx(weights, tmp_path / "x.onnx", input_size=(100, 416))
    with pytest.raises(ExportError, match="cannot be read"):
        export_onnx(weights, tmp_path / "x.onnx", validation_images=[tmp_path / "nope.png"])
    assert not (tmp_path / "x.onnx").exists()  # nothing left under the final name
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ pipeline
def assert_same_pipeline_detections(a, b, box_tol: float = 0.05) -> int:
    assert len(a) == len(b), (len(a), len(b))
    np.testing.assert_allclose(a.boxes, b.boxes, atol=box_tol, rtol=0)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4, rtol=0)
    assert a.class_names == b.class_names and a.image_size == b.image_size
    return len(a)


def test_onnx_pipeline_same_detections(weights, exported, kitti_sample):
    from dds_perception.pipeline import Pipeline

    torch_pipe = Pipeline.from_weights(weights, device="cpu")
    onnx_pipe = Pipeline.from_onnx(exported[0], device="cpu")
    assert onnx_pipe.backend.name == "onnxruntime" and torch_pipe.backend.name == "torch"
    counts = [
        assert_same_pipeline_detections(torch_pipe(rgb), onnx_pipe(rgb))
        for rgb in (street_scene(7), street_scene(8))
    ]
    for path in sorted((kitti_sample / "training" / "image_2").glob("*.png"))[3:5]:
        png = path.read_bytes()  # the node's CompressedImage path: PNG bytes in
        counts.append(
            assert_same_pipeline_detections(torch_pipe(png, "png"), onnx_pipe(png, "png"))
        )
    assert all(0 < c < 100 for c in counts), counts
    assert set(onnx_pipe(street_scene(7)).timings) == {
        "decode", "preprocess", "inference", "postprocess",
    }  # fmt: skip


def test_onnx_pipeline_metadata_round_trip(weights, exported):
    from dds_perception.pipeline import Pipeline

    torch_pipe = Pipeline.from_weights(weights, device="cpu", warmup=False)
    onnx_pipe = Pipeline.from_onnx(exported[0], device="cpu", warmup=False)  # the file alone
    assert onnx_pipe.class_names == torch_pipe.class_names == ["car"]
    assert onnx_pipe.input_size == torch_pipe.input_size == INPUT_SIZE
    assert onnx_pipe.config.mean == torch_pipe.config.mean
    assert onnx_pipe.config.std == torch_pipe.config.std
    np.testing.assert_array_equal(onnx_pipe._lut, torch_pipe._lut)  # normalisation table
    assert onnx_pipe.score_threshold == torch_pipe.score_threshold == 0.8
    assert onnx_pipe.config.to_dict() == torch_pipe.config.to_dict()
    assert onnx_pipe.device.type == "cpu" and not onnx_pipe.half
    tuned = Pipeline.from_onnx(exported[0], device="cpu", score_threshold=0.9, warmup=False)
    assert tuned.score_threshold == 0.9  # run-time settings still override the file
    with pytest.raises(ValueError, match=r"exported for \(128, 416\); re-export"):
        Pipeline.from_onnx(exported[0], device="cpu", input_size=(256, 832), warmup=False)
    with pytest.raises(BackendError, match="backend torch needs a detector weights file"):
        Pipeline.from_weights(exported[0], device="cpu", backend="torch", warmup=False)


def test_onnx_pipeline_from_weights_backend(weights, monkeypatch, tmp_path, caplog):
    from dds_perception.pipeline import Pipeline

    monkeypatch.setenv("DDS_PERCEPTION_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        pipe = Pipeline.from_weights(weights, device="cpu", backend="onnxruntime", warmup=False)
    cached = list(tmp_path.glob("detector-*-128x416-fp32-opset17.onnx"))
    assert len(cached) == 1 and "exporting" in caplog.text
    assert pipe.backend.path == cached[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        again = Pipeline.from_weights(weights, device="cpu", backend="onnxruntime", warmup=False)
    assert "using cached ONNX export" in caplog.text and again.backend.path == cached[0]
    reference = Pipeline.from_weights(weights, device="cpu", warmup=False)
    rgb = street_scene(9)
    assert_same_pipeline_detections(reference(rgb), again(rgb))


def test_onnx_replay_backend(weights, exported, tmp_path, capsys):
    """``replay --backend onnxruntime`` on a real bag: the same KITTI results as torch."""
    from dds_perception.cli import main
    from dds_perception.data import kitti
    from dds_perception.data.scenes import generate_kitti_scenes
    from dds_perception.ros import kitti2bag

    root = generate_kitti_scenes(tmp_path / "scenes", 2, seed=11, val_fraction=0)
    kitti2bag.convert(root, tmp_path / "bag", progress=False)
    results = {}
    for name, args in {
        "torch": ["--weights", str(weights)],
        "onnx": ["--weights", str(exported[0]), "--backend", "onnxruntime"],
    }.items():
        out = tmp_path / name
        code = main(["replay", str(tmp_path / "bag"), *args, "--device", "cpu", "--out",
                     str(out), "--annotate", "0", "--quiet"])  # fmt: skip
        assert code == 0
        files = sorted((out / "results").glob("*.txt"))
        results[name] = {f.name: kitti.read_label_file(f) for f in files}
    capsys.readouterr()
    assert results["torch"].keys() == results["onnx"].keys() and len(results["torch"]) == 2
    for frame, objects in results["torch"].items():
        other = results["onnx"][frame]
        assert len(objects) == len(other)
        for a, b in zip(objects, other, strict=True):
            np.testing.assert_allclose(a.bbox, b.bbox, atol=0.02)  # files hold 2 decimals
    assert sum(len(v) for v in results["onnx"].values()) > 0


# ------------------------------------------------------------------------------ bench
def test_onnx_bench_backends(weights):
    from dds_perception.benchmarks.backends import Settings, get_backend
    from dds_perception.detection import load_detector

    cpu = torch.device("cpu")
    bench = get_backend("onnxruntime")
    assert bench.unavailable(cpu, False) is None
    assert "CUDA only" in bench.unavailable(cpu, True)
    # a torchvision-style network (what ssd300_vgg16 goes through): BN folded, exported, run
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=2, dilation=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1),
    ).eval()
    torch.nn.init.uniform_(net[1].running_var, 0.5, 2.0)
    x = torch.randn(1, 3, 32, 48)
    prepared = bench.prepare(net, x, device=cpu, half=False, settings=Settings(threads=1))
    assert isinstance(prepared.backend, OnnxRuntimeBackend)  # the deploy backend is timed
    (out,) = prepared.run().values()
    np.testing.assert_allclose(out.numpy(), net(x).detach().numpy(), atol=1e-5, rtol=0)
    # our detector goes through export_detector: its check lands in the notes
    detector = load_detector(weights)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    x = network_input(street_scene(3), detector, INPUT_SIZE)
    prepared = bench.prepare(detector, x, device=cpu, half=False, settings=Settings(threads=1))
    assert "onnxruntime vs torch max |diff| scores" in prepared.notes[0]
    scores = prepared.run()["scores"]
    with torch.inference_mode():
        ref = detector(x)["scores"].numpy()
    np.testing.assert_allclose(scores.numpy(), ref, atol=1e-4, rtol=0)
    # exporting left the caller's detector alone (its BatchNorms are still there)
    assert detector.state_dict().keys() == before.keys()
    torch_bench = get_backend("torch").prepare(
        detector, x, device=cpu, half=False, settings=Settings(threads=1)
    )
    assert isinstance(torch_bench.backend, TorchBackend)
    torch.testing.assert_close(
        torch_bench.run()["scores"], torch.from_numpy(ref), atol=1e-4, rtol=0
    )
    reason = get_backend("tensorrt").unavailable(cpu, False)
    assert reason == (TRT_SKIP or "TensorRT runs on CUDA devices only (use --device cuda)")


# ------------------------------------------------------------------------------ bad files
def _edit_meta(src: Path, dst: Path, **changes) -> Path:
    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            for key, value in changes.items():
                if key == "input_size":
                    meta["config"]["input_size"] = value
                else:
                    meta[key] = value
            prop.value = json.dumps(meta)
    onnx.save(proto, str(dst))
    return dst


def test_onnx_bad_files(exported, weights, tmp_path):
    path, _ = exported
    with pytest.raises(OnnxModelError, match="not found"):
        read_onnx_info(tmp_path / "missing.onnx")
    with pytest.raises(OnnxModelError, match="not a readable ONNX model"):
        read_onnx_info(weights)  # a safetensors file is not ONNX
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not really onnx" * 10)
    with pytest.raises(OnnxModelError, match=r"garbage.onnx"):
        read_onnx_info(garbage)
    # another model: a valid ONNX graph without our metadata
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["scores"])],
        "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, producer_name="yolo-export"), str(other))
    with pytest.raises(OnnxModelError, match=r"no 'dds_perception' metadata.*yolo-export"):
        read_onnx_info(other)
    with pytest.raises(OnnxModelError, match="no 'dds_perception' metadata"):
        OnnxRuntimeBackend(other)
    # opset changed after export
    proto = onnx.load(str(path))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 16
    onnx.save(proto, str(tmp_path / "opset.onnx"))
    with pytest.raises(OnnxModelError, match="graph uses opset 16 but was exported with opset 17"):
        read_onnx_info(tmp_path / "opset.onnx")
    cases = {
        "size": ({"input_size": [160, 416]}, r"graph input size \(128, 416\) differs.*160, 416"),
        "task": ({"task": "classification"}, "task 'classification' in metadata"),
        "version": ({"format_version": 99}, "format_version 99"),
        "anchors": ({"anchors": {"count": 5}}, "do not match the metadata's 5 anchors"),
    }
    for name, (changes, message) in cases.items():
        with pytest.raises(OnnxModelError, match=message):
            read_onnx_info(_edit_meta(path, tmp_path / f"{name}.onnx", **changes))


# ------------------------------------------------------------------------------ providers
def test_onnx_missing_cuda_provider(exported, caplog):
    path, _ = exported
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the missing-provider path is moot")
    with pytest.raises(BackendError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeBackend(path, device="cuda")
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        backend = OnnxRuntimeBackend(path, device="auto")
    assert backend.device.type == "cpu" and backend.providers == ["CPUExecutionProvider"]
    assert "running on the CPU" in caplog.text  # a fall-back is logged, never silent


def test_onnx_create_backend_errors(exported, weights):
    path, _ = exported
    with pytest.raises(BackendError, match="unknown backend 'tflite'"):
        create_backend("tflite", path)
    with pytest.raises(BackendError, match="backend torch needs a detector weights file"):
        create_backend("torch", path)
    with pytest.raises(BackendError, match="unknown device"):
        OnnxRuntimeBackend(path, device="tpu")


# ------------------------------------------------------------------------------ tensorrt
@pytest.mark.skipif(TRT_SKIP is None, reason="tensorrt and a GPU are present here")
def test_tensorrt_missing_gives_install_hint(exported):
    with pytest.raises(BackendError, match=r"pip install tensorrt|needs a CUDA GPU"):
        TensorRTBackend(exported[0])
    with pytest.raises(BackendError, match="JetPack"):
        create_backend("tensorrt", exported[0], device="cuda")


@pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT test skipped: {TRT_SKIP}")
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime(exported, tmp_path, half, caplog):
    import shutil

    path = tmp_path / "trt.onnx"
    shutil.copy(exported[0], path)
    engine = engine_path_for(path, half)
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        backend = TensorRTBackend(path, half=half)
    assert engine.is_file() and "building" in caplog.text
    key = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert key["onnx_sha256"] == file_sha256(path) and key["fp16"] is half
    ort_backend = OnnxRuntimeBackend(path, device="cpu")
    # TensorRT computes fp32 convolutions in TF32 on Ampere and newer GPUs by default
    box_tol, score_tol = (4.0, 2e-2) if half else (0.5, 5e-3)
    for seed in (1, 2):
        rgb = street_scene(seed)
        (boxes_a, scores_a), (boxes_b, scores_b) = detect(ort_backend, rgb), detect(backend, rgb)
        assert abs(len(scores_a) - len(scores_b)) <= 1  # a box may cross the threshold
        if len(scores_a) == len(scores_b):
            np.testing.assert_allclose(boxes_a, boxes_b, atol=box_tol, rtol=0)
            np.testing.assert_allclose(scores_a, scores_b, atol=score_tol, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        TensorRTBackend(path, half=half)
    assert "loaded cached engine" in caplog.text
    key["tensorrt"] = "0.0.0"  # as if built by another TensorRT: stale, rebuilt, logged
    engine.with_name(engine.name + ".json").write_text(json.dumps(key))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dds_perception"):
        TensorRTBackend(path, half=half)
    assert "stale (tensorrt changed); rebuilding" in caplog.text
    from dds_perception.pipeline import Pipeline

    pipe = Pipeline.from_onnx(path, backend="tensorrt", half=half)  # the cached engine
    detections = pipe(street_scene(1))
    assert pipe.device.type == "cuda" and detections.class_names == ["car"] * len(detections)


# ------------------------------------------------------------------------------ cli
def test_onnx_export_cli(cli, weights, tmp_path, capsys):
    from dds_perception.cli import main

    out = tmp_path / "cli.onnx"
    result = cli("export", "--weights", str(weights), "--out", str(out), "--report",
                 str(tmp_path / "r.json"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert "max |diff| scores" in result.stdout and out.is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["detections_torch"] == report["validation"]["detections_onnx"]
    assert report["input_size"] == list(INPUT_SIZE) and report["opset"] == 17
    # usage errors and --help in-process (a subprocess each would only re-import torch)
    assert main(["export", "--weights", str(weights), "--out", "x.onnx", "--height", "64"]) == 1
    assert "give both --height and --width" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--opset 13" in capsys.readouterr().out


def test_export_weights_at_another_input_size(weights, tmp_path, capsys):
    """A .safetensors --out writes the same tensors set to run at --height/--width, with the
    recipe and the size its metrics were measured at; ONNX-only options are refused."""
    from dds_perception.cli import main
    from dds_perception.detection import load_detector

    out = tmp_path / "resized.safetensors"
    height, width = INPUT_SIZE[0] + 32, INPUT_SIZE[1] + 64
    args = ["export", "--weights", str(weights), "--out", str(out)]
    assert main([*args, "--height", str(height), "--width", str(width)]) == 0
    assert f"at input {height}x{width}" in capsys.readouterr().out
    model, original = load_detector(out), load_detector(weights)
    assert model.config.input_size == (height, width)
    assert model.meta["recipe"] == {"note": "test detector"}
    assert model.meta["exported_from"]["input_size"] == list(INPUT_SIZE)
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert main(args) == 1
    assert "needs --height and --width" in capsys.readouterr().err
    assert main([*args, "--height", "64", "--width", "128", "--half"]) == 1
    assert "--half: ONNX options" in capsys.readouterr().err


def test_export_weights_with_post_processing_settings(weights, tmp_path, capsys):
    """--vote-iou / --nms-iou store the post-processing in the weights file (the node, replay
    and demo read it from there); out-of-range values and ONNX outputs are refused by name."""
    from dds_perception.cli import main
    from dds_perception.detection import load_detector

    out = tmp_path / "voted.safetensors"
    args = ["export", "--weights", str(weights), "--out", str(out)]
    assert main([*args, "--vote-iou", "0.6", "--nms-iou", "0.45"]) == 0
    assert "nms_iou 0.45, vote_iou 0.6" in capsys.readouterr().out
    model, original = load_detector(out), load_detector(weights)
    assert (model.config.vote_iou, model.config.nms_iou) == (0.6, 0.45)
    assert model.config.input_size == original.config.input_size == INPUT_SIZE
    assert original.config.vote_iou == 0.0  # the source file is not touched
    assert main([*args, "--vote-iou", "1.5"]) == 1
    assert "vote_iou 1.5: must lie in [0, 1]" in capsys.readouterr().err
    onnx = ["export", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]
    assert main([*onnx, "--vote-iou", "0"]) == 1
    assert "--vote-iou: set in a .safetensors export first" in capsys.readouterr().err
    # the second stage's top-k: only for a file that has one, named when it does not
    assert main([*args, "--refine-top-k", "8"]) == 1
    assert "detector.safetensors: refine_top_k 8" in capsys.readouterr().err
    refined = save_detector(tmp_path / "refined.safetensors", make_detector(refine_top_k=32))
    out = tmp_path / "refined64.safetensors"
    assert (
        main(["export", "--weights", str(refined), "--out", str(out), "--refine-top-k", "8"]) == 0
    )
    assert "refine_top_k 8" in capsys.readouterr().out
    assert load_detector(out).config.refine_top_k == 8
    # the weight of the second stage's IoU output: only for a stage that has one
    weight = ["--refine-score-weight", "0.75"]
    assert main(["export", "--weights", str(refined), "--out", str(out), *weight]) == 1
    assert "refined.safetensors: refine_score_weight 0.75" in capsys.readouterr().err
    scoring = make_detector(refine_top_k=32, refine_score=True)
    scoring = save_detector(tmp_path / "scoring.safetensors", scoring)
    assert main(["export", "--weights", str(scoring), "--out", str(out), *weight]) == 0
    assert load_detector(out).config.refine_score_weight == 0.75
    assert (
        main(
            ["export", "--weights", str(scoring), "--out", str(out), "--refine-score-weight", "2"]
        )
        == 1
    )
    assert "refine_score_weight 2" in capsys.readouterr().err
