"""The one entry point: every command is registered, imports, and documents examples."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from dds_perception.cli import COMMANDS, _command_parser, build_parser, main
from dds_perception.utils.errors import DdsPerceptionError

REPO = Path(__file__).resolve().parents[1]
# a repository path in help text: models/... or config/..., not part of a longer path
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:models|config)/[\w.*/-]*[\w*])")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_every_command_has_help_with_an_example(name):
    parser, module = _command_parser(name)
    assert callable(module.run)
    assert parser.description
    assert f"dds-perception {name}" in (parser.epilog or ""), f"{name}: no example in --help"


def _help_paths() -> list[tuple[str, str]]:
    """(command, path) for every models/... or config/... path in any command's --help."""
    found = []
    for name in sorted(COMMANDS):
        parser, _ = _command_parser(name)
        found += [(name, path) for path in REPO_PATH.findall(parser.format_help())]
    return found


def test_cli_help_examples_name_files_that_exist():
    """Copying an example from --help must not fail on a file the repository does not have
    (replay's example named models/dds_rpn_car.safetensors, a model that was never shipped)."""
    found = _help_paths()
    assert {"replay", "export", "node", "train-detector"} <= {name for name, _ in found}
    missing = [
        f"dds-perception {name} --help: {path}"
        for name, path in found
        if not (any(REPO.glob(path)) if "*" in path else (REPO / path).exists())
    ]
    assert not missing, "\n".join(missing)


def test_cli_help_path_pattern():
    text = "--weights models/a.safetensors, (config/detector.yaml) ~/models/x runs/config/y"
    assert REPO_PATH.findall(text) == ["models/a.safetensors", "config/detector.yaml"]


def test_cli_top_level_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_cli_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_exit_1(capsys, tmp_path):
    missing = tmp_path / "nope"
    assert main(["evaluate", "--labels", str(missing), "--results", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dds-perception evaluate: error:")
    assert str(missing) in err[0]


def test_every_package_error_derives_from_the_root():
    import dds_perception

    missing = []
    for path in Path(dds_perception.__file__).parent.rglob("*.py"):
        name = ".".join(path.relative_to(Path(dds_perception.__file__).parents[1]).parts)[:-3]
        if "ros.node" in name or name.endswith("__main__"):
            continue  # the rclpy adapter needs ROS 2
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # an optional dependency (cyclonedds, tensorrt) is absent
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == name
                and not issubclass(value, DdsPerceptionError)
            ):
                missing.append(f"{name}.{attr}")
    assert not missing, missing


def test_cli_a_bug_keeps_its_traceback(monkeypatch):
    """Only the package's errors become one line; anything else propagates with its stack."""
    _, module = _command_parser("evaluate")

    def broken(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(module, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["evaluate", "--labels", "x", "--results", "y"])


def test_cli_package_error_keeps_its_cause(capsys, tmp_path):
    bad = tmp_path / "000000.txt"
    bad.write_text("Car 0 0 0 x 1 2 3 1 1 1 0 0 0 0\n")
    from dds_perception.data.kitti import KittiFormatError, read_label_file

    with pytest.raises(KittiFormatError) as info:
        read_label_file(bad)
    assert isinstance(info.value, DdsPerceptionError)
    assert isinstance(info.value.__cause__, ValueError)  # raise ... from error, not from None


def test_every_command_is_in_the_command_table():
    table = (Path(__file__).resolve().parents[1] / "docs" / "commands.md").read_text()
    missing = [name for name in COMMANDS if f"`dds-perception {name}" not in table]
    assert not missing, f"docs/commands.md lacks {missing}"
