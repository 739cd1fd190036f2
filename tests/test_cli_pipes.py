"""The command lines at their edges: a reader that closes the pipe early (`| head -1`) is
not an error, and unencrypted fleet keys are not written without a word."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _into_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run with stdout a pipe whose read end is already closed: the first write fails
    with EPIPE, as under `| head -1` once head has exited."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], stdout=write,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              timeout=120, check=False)
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("argv", [("agent.cli", "profiles"), ("converter.cli", "profiles"),
                                  ("agent.cli", "schema")])
def test_a_closed_pipe_is_not_an_error(argv: tuple[str, ...]) -> None:
    rc, err = _into_closed_pipe(*argv)
    assert (rc, err) == (0, ""), (rc, err)


def test_keys_init_warns_when_the_keys_are_unencrypted(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_FLEET_PASSPHRASE"}

    def init(where: Path, *extra: str, **more: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "keys", "init", "--dir", str(where),
             "--fleet", "acme", *extra], capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL, env={**env, **more}, check=True)
        return proc.stderr

    assert "written unencrypted" in init(tmp_path / "a")
    assert "--no-passphrase" in init(tmp_path / "b")
    assert init(tmp_path / "c", "--no-passphrase") == ""
    assert init(tmp_path / "d", EDGE_FLEET_PASSPHRASE="correct horse battery") == ""


def _bare(parser: Any, path: str = "") -> list[str]:
    """Options, arguments and subcommands of `parser` without help text."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {c.dest for c in action._choices_actions if c.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    out.append(f"{path} {name}".strip())
                out += _bare(sub, f"{path} {name}")
        elif not action.help:
            out.append(f"{path} {'/'.join(action.option_strings) or action.dest}".strip())
    return out


def test_every_option_and_subcommand_of_the_three_commands_has_help() -> None:
    from agent.cli import build_parser as agent_parser
    from converter.cli import build_parser as convert_parser
    from fleet.cli import _parser as fleet_parser

    for name, parser in (("edge-agent", agent_parser()), ("edge-fleet", fleet_parser()),
                         ("edge-convert", convert_parser())):
        assert _bare(parser) == [], name
