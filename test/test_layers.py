"""Imports point downward only (README 'Layers'); only ros/node.py imports rclpy."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dds_perception"

# Lower rank = lower layer. Equal ranks may not import each other, except where listed.
RANK = {
    "utils": 0,
    "data": 1,
    "models": 2,
    "detection": 3,
    "deploy": 4,  # network backends: only the network call differs
    "evaluation": 4,
    "engine": 5,
    "pipeline": 6,
    "ros": 7,
    "demo": 8,
    "benchmarks": 8,
    "cli": 9,
}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dds_perception":  # from dds_perception import pipeline
                found += [f"dds_perception.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_layers_import_downward_only():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = _area(".".join(relative.parts))
        if source in ("package", "__init__"):
            continue
        for module in _imports(path):
            if not module.startswith("dds_perception."):
                continue
            target = _area(module)
            if target != source and RANK[target] >= RANK[source]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} ({source}) imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_area_has_a_layer():
    areas = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    areas -= {"__init__", "__pycache__", "__main__"}
    assert areas <= set(RANK), areas - set(RANK)


def test_only_the_node_adapter_imports_rclpy():
    importers = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if any(m == "rclpy" or m.startswith("rclpy.") for m in _imports(path))
    ]
    assert importers == ["dds_perception/ros/node.py"]


def test_code_and_docs_name_no_document_outside_the_repository():
    """A reader has only the repository: no pointers to the original design notes."""
    repo = PACKAGE.parent
    outside = ("design" + ".md", "shared" + "/docs/")
    found = []
    for folder in ("dds_perception", "docs", "config", "test", "scripts", "launch", "models"):
        for path in (repo / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".sh") and path.is_file():
                text = path.read_text(encoding="utf-8")
                found += [f"{path.relative_to(repo)}: {name}" for name in outside if name in text]
    for path in repo.glob("*.md"):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.name}: {name}" for name in outside if name in text]
    assert not found, found
