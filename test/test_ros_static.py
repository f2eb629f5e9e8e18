"""Static checks of the ROS 2 packaging that run without ROS: package.xml, launch file, setup.py.

On a ROS machine colcon and rosdep rely on these files; here nothing else would notice a missing
dependency or an uninstalled launch file.
"""

from __future__ import annotations

import ast
import os
import py_compile
import runpy
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "detector.launch.py"

# ROS 2 packages that are imported as Python modules of the same name
ROS_PACKAGES = {
    "rclpy",
    "rcl_interfaces",
    "builtin_interfaces",
    "ament_index_python",
    "cv_bridge",
    "diagnostic_updater",
    "launch",
    "launch_ros",
    "launch_testing",
    "launch_testing_ros",
    "message_filters",
    "image_transport",
    "rosbag2_py",
    "ros2bag",
    "tf2_ros",
}
# Python modules whose rosdep key differs from the module name
ROSDEP_KEYS = {
    "numpy": "python3-numpy",
    "cv2": "python3-opencv",
    "yaml": "python3-yaml",
    "torch": "python3-torch",
    "torchvision": "python3-torchvision",
    "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib",
    "pytest": "python3-pytest",
    "safetensors": "python3-safetensors-pip",
    "PIL": "python3-pil",
}
# Third-party modules the node's code reaches that the node does not need, each with the reason;
# they may be imported only inside functions (never when the node loads) and need no rosdep key.
NOT_NEEDED_BY_THE_NODE = {
    "rosbags": "rosbags message classes: bags and the Cyclone DDS runtime, never the rclpy node",
    "onnx": "backend:=onnxruntime/tensorrt only (pip extra 'onnx')",
    "onnxruntime": "backend:=onnxruntime only (pip extra 'onnx')",
    "tensorrt": "backend:=tensorrt only (JetPack's python3-libnvinfer or pip extra 'tensorrt')",
}
NODE_MODULE = "dds_perception.ros.node"  # console script detector_node, the colcon install's


def _is_ros_package(module: str) -> bool:
    return module in ROS_PACKAGES or module.endswith(("_msgs", "_interfaces", "_srvs"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file (inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _package_xml() -> ET.Element:
    return ET.parse(REPO / "package.xml").getroot()


def _depends(root: ET.Element, *tags: str) -> set[str]:
    return {(element.text or "").strip() for tag in tags for element in root.iter(tag)}


def test_ros_static_package_xml_format3():
    root = _package_xml()
    assert root.tag == "package" and root.get("format") == "3"
    for tag in ("name", "version", "description", "maintainer", "license"):
        element = root.find(tag)
        assert element is not None and (element.text or "").strip(), f"package.xml lacks <{tag}>"
    assert root.findtext("name") == "dds_perception"
    assert root.find("export/build_type").text == "ament_python"
    setup_source = (REPO / "setup.py").read_text()
    assert f'version="{root.findtext("version")}"' in setup_source, "versions disagree"
    allowed = {
        "name",
        "version",
        "description",
        "maintainer",
        "license",
        "url",
        "author",
        "depend",
        "build_depend",
        "build_export_depend",
        "buildtool_depend",
        "exec_depend",
        "test_depend",
        "doc_depend",
        "conflict",
        "replace",
        "group_depend",
        "member_of_group",
        "export",
    }
    assert {child.tag for child in root} <= allowed


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_ros_static_package_xml_declares_every_ros_import():
    root = _package_xml()
    run_deps = _depends(root, "depend", "exec_depend")
    test_deps = run_deps | _depends(root, "test_depend")
    missing: dict[str, list[str]] = {}
    groups = (
        (_python_files("dds_perception", "launch"), run_deps),
        (_python_files("test"), test_deps),
    )
    for files, declared in groups:
        for path in files:
            for module in _imports(path):
                key = module if _is_ros_package(module) else ROSDEP_KEYS.get(module)
                if key and key not in declared:
                    missing.setdefault(key, []).append(str(path.relative_to(REPO)))
    assert not missing, f"package.xml does not declare: {missing}"


def test_ros_static_only_node_imports_rclpy():
    importers = [
        str(p.relative_to(REPO)) for p in _python_files("dds_perception") if "rclpy" in _imports(p)
    ]
    assert importers == ["dds_perception/ros/node.py"]


def test_ros_static_launch_file_compiles_and_declares_arguments(tmp_path):
    py_compile.compile(str(LAUNCH_FILE), cfile=str(tmp_path / "launch.pyc"), doraise=True)
    tree = ast.parse(LAUNCH_FILE.read_text())
    assert any(
        isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description"
        for n in tree.body
    )
    namespace = _load_launch_with_standins()
    names = [name for name, _default, _description in namespace["ARGUMENTS"]]
    for required in (
        "params_file",
        "image_topic",
        "weights",
        "device",
        "use_compressed",
        "namespace",
        "camera_info_topic",
        "camera_height",
        "image_topics",
    ):
        assert required in names
    assert all(description for _n, _d, description in namespace["ARGUMENTS"])


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("launch", "launch_ros")),
    reason="ROS 2 'launch'/'launch_ros' are not installed here (no ROS 2 on this machine)",
)
def test_ros_static_launch_description_builds():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument

    namespace = runpy.run_path(str(LAUNCH_FILE))
    description = namespace["generate_launch_description"]()
    assert isinstance(description, LaunchDescription)
    declared = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert {"params_file", "image_topic", "weights", "device", "use_compressed"} <= declared


class _Recorder:
    """Stand-in for a launch class: keeps its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _load_launch_with_standins() -> dict:
    """Run the launch file against recording stand-ins of launch/launch_ros (absent here), so
    that its own logic (argument table, parameter overrides, remappings) is exercised."""
    if all(__import__("importlib").util.find_spec(m) for m in ("launch", "launch_ros")):
        return runpy.run_path(str(LAUNCH_FILE))
    modules = {
        name: types.ModuleType(name)
        for name in (
            "launch",
            "launch.actions",
            "launch.substitutions",
            "launch_ros",
            "launch_ros.actions",
            "launch_ros.substitutions",
        )
    }

    class LaunchConfiguration(_Recorder):
        def perform(self, context):
            return context[self.args[0]]

    modules["launch"].LaunchDescription = _Recorder
    modules["launch.actions"].DeclareLaunchArgument = _Recorder
    modules["launch.actions"].OpaqueFunction = _Recorder
    modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    modules["launch.substitutions"].PathJoinSubstitution = _Recorder
    modules["launch_ros.actions"].Node = _Recorder
    modules["launch_ros.substitutions"].FindPackageShare = _Recorder
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        return runpy.run_path(str(LAUNCH_FILE))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_ros_static_launch_overrides_and_remaps():
    namespace = _load_launch_with_standins()
    if "_Recorder" not in repr(namespace["LaunchDescription"]):
        pytest.skip("real launch installed: covered by test_ros_static_launch_description_builds")
    description = namespace["generate_launch_description"]()
    entities = description.args[0]
    declared = {e.kwargs["name"] if "name" in e.kwargs else e.args[0]: e for e in entities[:-1]}
    assert all(e.kwargs["description"] for e in declared.values())
    context = {
        "params_file": "/share/detector.yaml",
        "image_topic": "/cam/image_raw",
        "weights": "",
        "device": "",
        "use_compressed": "",
        "namespace": "front",
        "camera_info_topic": "",
        "camera_height": "",
        "image_topics": "",
    }
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["executable"] == "detector_node" and node.kwargs["name"] == "dds_detector"
    assert node.kwargs["parameters"] == ["/share/detector.yaml", {}]  # empty args: file values
    assert node.kwargs["remappings"] == [
        ("image", "/cam/image_raw"),
        ("image/compressed", "/cam/image_raw/compressed"),
        ("camera_info", "/cam/camera_info"),  # beside the image topic
    ]
    assert node.kwargs["namespace"] == "front"
    context.update(weights="/w.safetensors", device="cpu", use_compressed="True")
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["parameters"][1] == {
        "weights": "/w.safetensors",
        "device": "cpu",
        "use_compressed": True,
    }
    context.update(camera_info_topic="/calib/info", camera_height="1.65", use_compressed="")
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["remappings"][-1] == ("camera_info", "/calib/info")
    assert node.kwargs["parameters"][1]["camera_height"] == 1.65
    context.update(camera_height="tall")
    with pytest.raises(ValueError, match="camera_height 'tall'"):
        entities[-1].kwargs["function"](context)
    context.update(camera_height="", use_compressed="maybe")
    with pytest.raises(ValueError, match="use_compressed 'maybe'"):
        entities[-1].kwargs["function"](context)
    # several cameras: a list parameter; the node checks the entries (empty ones too)
    context.update(use_compressed="", camera_info_topic="", image_topics=" /a/image_raw,/b/img")
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["parameters"][1]["image_topics"] == ["/a/image_raw", "/b/img"]
    context.update(image_topics="[/a/image_raw, '/b/img']")
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["parameters"][1]["image_topics"] == ["/a/image_raw", "/b/img"]
    context.update(image_topics="/a/image_raw,,/b/img")
    (node,) = entities[-1].kwargs["function"](context)
    assert node.kwargs["parameters"][1]["image_topics"] == ["/a/image_raw", "", "/b/img"]
    context.update(image_topics="[/a, 3]")
    with pytest.raises(ValueError, match=r"image_topics '\[/a, 3\]': a list of topic names"):
        entities[-1].kwargs["function"](context)
    context.update(image_topics="/a/image_raw", camera_info_topic="/calib/info")
    with pytest.raises(ValueError, match="camera_info_topic '/calib/info': with image_topics"):
        entities[-1].kwargs["function"](context)


def _setup_kwargs(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (run for real, setup() caught)."""
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return captured


def test_ros_static_setup_installs_launch_config_models(monkeypatch):
    kwargs = _setup_kwargs(monkeypatch)
    installed = {
        os.path.normpath(source): destination
        for destination, sources in kwargs["data_files"]
        for source in sources
    }
    assert installed["launch/detector.launch.py"] == "share/dds_perception/launch"
    assert installed["config/detector.yaml"] == "share/dds_perception/config"
    assert installed["package.xml"] == "share/dds_perception"
    assert installed["resource/dds_perception"] == "share/ament_index/resource_index/packages"
    shipped = sorted(str(p.relative_to(REPO)) for p in (REPO / "models").iterdir() if p.is_file())
    assert shipped and all(installed.get(p) == "share/dds_perception/models" for p in shipped)
    scripts = kwargs["entry_points"]["console_scripts"]
    assert "detector_node = dds_perception.ros.node:main" in scripts
    # ros2 run looks for executables in lib/<package>
    assert "install_scripts=$base/lib/dds_perception" in (REPO / "setup.cfg").read_text()


def test_ros_static_docs_parameter_table_matches_params():
    """docs/node.md's parameter table lists every node parameter with its real default."""
    from dds_perception.ros import params as node_params

    text = (REPO / "docs" / "node.md").read_text(encoding="utf-8")
    start = text.index("### Parameters")
    section = text[start : text.index("\n### ", start + 1)]
    rows = {
        cells[0].strip("` "): cells[2].strip("` ")
        for line in section.splitlines()
        if line.startswith("| `") and len(cells := line.strip("|").split("|")) == 5
    }
    assert set(rows) == set(node_params.parameter_names())
    for spec in node_params.parameter_specs():
        default = str(spec.default).lower() if isinstance(spec.default, bool) else spec.default
        if isinstance(spec.default, tuple):  # a string array: [] in the table
            default = f"[{', '.join(spec.default)}]"
        assert spec.name in rows, f"docs/node.md parameters table lacks {spec.name}"
        assert rows[spec.name] == (str(default) or '""'), spec.name


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _node_third_party_imports() -> dict[str, dict[str, bool]]:
    """Top-level third-party module -> {importing package module: imported at module level?}
    for every module the node can run: the transitive closure of the package modules that
    ``ros/node.py`` imports, imports inside functions (lazy ones, e.g. the pipeline) included."""
    found: dict[str, dict[str, bool]] = {}
    seen: set[str] = set()
    stack = [NODE_MODULE]
    while stack:
        name = stack.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            eager = id(node) in top_level or any(  # module level, or in a top-level try/if
                id(node) in {id(n) for n in ast.walk(stmt)}
                for stmt in tree.body
                if isinstance(stmt, (ast.Try, ast.If))
            )
            for module in modules:
                if module.startswith("dds_perception"):
                    stack.append(module)
                    continue
                top = module.split(".")[0]
                if top in sys.stdlib_module_names:
                    continue
                sites = found.setdefault(top, {})
                sites[name] = sites.get(name, False) or eager
    return found


def test_ros_static_package_xml_declares_what_the_node_imports():
    """Every third-party module the node imports while running (found by walking its imports,
    lazy ones included) has its rosdep key in package.xml, or is listed, with the reason, as not
    needed by the node and then imported only inside functions."""
    declared = _depends(_package_xml(), "depend", "exec_depend")
    imports = _node_third_party_imports()
    assert {"rclpy", "torch", "safetensors", "yaml"} <= set(imports)  # the walk reaches them
    problems = []
    for module, sites in sorted(imports.items()):
        if module in NOT_NEEDED_BY_THE_NODE:
            eager = sorted(site for site, at_load in sites.items() if at_load)
            if eager:
                problems.append(
                    f"{module} ({NOT_NEEDED_BY_THE_NODE[module]}) is imported when "
                    f"{', '.join(eager)} loads: import it inside the function"
                )
            continue
        key = module if _is_ros_package(module) else ROSDEP_KEYS.get(module)
        if key is None:
            problems.append(
                f"{module} (imported by {', '.join(sorted(sites))}): add its rosdep "
                "key to ROSDEP_KEYS and package.xml, or to NOT_NEEDED_BY_THE_NODE"
            )
        elif key not in declared:
            problems.append(
                f"{module}: package.xml lacks <exec_depend>{key}</exec_depend> "
                f"(imported by {', '.join(sorted(sites))})"
            )
    stale = sorted(set(NOT_NEEDED_BY_THE_NODE) - set(imports))
    assert not problems and not stale, "\n".join(problems + [f"stale entry {m}" for m in stale])


def test_ros_static_node_import_walk_finds_a_missing_dependency(monkeypatch):
    """The check above can fail: without safetensors in package.xml it names the module."""
    root = _package_xml()
    for element in list(root):
        if (element.text or "").strip() == "python3-safetensors-pip":
            root.remove(element)
    monkeypatch.setattr(sys.modules[__name__], "_package_xml", lambda: root)
    with pytest.raises(AssertionError, match=r"safetensors: package.xml lacks <exec_depend>"):
        test_ros_static_package_xml_declares_what_the_node_imports()
