"""Install dds_perception as a ROS 2 ament_python package or as a plain pip package."""

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "dds_perception"
SAMPLES = "samples/kitti/training"  # the demo's real KITTI frames (CC BY-NC-SA 3.0)

# torch and torchvision are pinned as a tested pair: the registry's torchvision only imports
# against its matching torch build.
INSTALL_REQUIRES = [
    "torch>=2.14,<2.15",
    "torchvision>=0.29,<0.30",
    "numpy>=1.24",
    "opencv-python-headless>=4.8",
    "Pillow>=9.0",  # Caltech JPEG decoding (greyscale/CMYK -> RGB), also needed by torchvision
    "safetensors>=0.4",
    "PyYAML>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "rosbags>=0.10,<0.12",
    "psutil>=5.9",
]
DDS_REQUIRES = ["cyclonedds==11.0.1"]  # pinned: the runtime relies on its serialiser internals
ONNX_REQUIRES = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"]
TEST_REQUIRES = [
    "pytest>=8",
    "ruff>=0.6",
    "mcap>=1.1",
    "mcap-ros2-support>=0.5",
    *DDS_REQUIRES,
    *ONNX_REQUIRES,
]

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Lightweight pyramid-dilated MobileNetV2 vehicle detector for ROS 2",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(exclude=["test", "test.*"]),
    include_package_data=True,
    package_data={PACKAGE: ["ros/msg/*.msg"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/config/train", glob("config/train/*.yaml")),
        (f"share/{PACKAGE}/models", glob("models/*")),
        (f"share/{PACKAGE}/samples/kitti", ["samples/kitti/README.md"]),
        *(
            (f"share/{PACKAGE}/{SAMPLES}/{sub}", glob(f"{SAMPLES}/{sub}/*"))
            for sub in ("image_2", "label_2", "calib")
        ),
    ],
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dds": DDS_REQUIRES,
        "onnx": ONNX_REQUIRES,
        # x86_64 + CUDA 12; on a Jetson TensorRT comes with JetPack (python3-libnvinfer)
        "tensorrt": [*ONNX_REQUIRES, "tensorrt>=8.6"],
        "test": TEST_REQUIRES,
        "dev": [*TEST_REQUIRES, "pytest-xdist>=3"],
    },
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "dds-perception = dds_perception.cli:main",
            "detector_node = dds_perception.ros.node:main",
        ],
    },
)
