"""The one entry point: every command is registered, imports, and documents examples."""

from __future__ import annotations

import pytest

from dds_perception.cli import COMMANDS, _command_parser, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_every_command_has_help_with_an_example(name):
    parser, module = _command_parser(name)
    assert callable(module.run)
    assert parser.description
    assert f"dds-perception {name}" in (parser.epilog or ""), f"{name}: no example in --help"


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
