"""Every command in the README's shell blocks, checked as written: the three programs'
command lines are parsed by the programs' own parsers (an unknown option, a missing
argument or a pseudo-syntax such as `a | b NAME` fails), the cheap ones run for real in a
scratch directory (profiles, keys, PKI, the broker's configuration), each bench's options
are the ones its `--help` lists, each script exists; what needs a device's root, a broker
or hardware is listed below with the reason, and a command of a kind not listed fails the
test (a new README example must be placed in one of these)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: `[ID]`, `[--devices 1000]`: a usage line's optional parts (a JSON list is a value).
OPTIONAL = re.compile(r"^\[(--|[A-Z])")
BLOCK = re.compile(r"(<!--(?P<note>[^>]*)-->\n)?```(?:sh|bash)\n(?P<body>.*?)```", re.S)
#: The first words of commands the test does not run, and why. Pinned: a command whose
#: first word is not here, not a program, a bench or a script fails the test.
NOT_RUN = {
    "apt": "installs the .deb on a device's root: tests/test_deb.py and "
           "tests/test_systemd_boot.py do it in a fresh Debian 12",
    "editor": "an operator editing the device's configuration",
    "cp": "copies the fleet's root.json onto a device (tests/test_systemd_boot.py does)",
    "systemctl": "the device's systemd: tests/test_systemd_boot.py boots one",
    "mosquitto_pub": "publishes to a real fleet's broker with its client certificate "
                     "(tests/test_fleet_mqtt.py publishes commands to a real mosquitto)",
}
#: Program commands parsed but not run here: they need a broker, a device or files a
#: previous step of a real deployment made; the tests named run each for real.
PROGRAMS = ("edge-convert", "edge-agent", "edge-fleet")
#: Commands run for real in a scratch directory, in this order (cheap, no broker).
RUN = (
    "edge-agent profiles",
    "edge-agent profile raspberry-pi-4",
    "edge-fleet keys init --dir fleetkeys --fleet acme",
    "edge-fleet pki init --dir pki --server-host broker.example.com",
    "edge-fleet pki issue --dir pki fleet-controller fleet-monitor pi-0007",
)


def _blocks() -> list[tuple[str, str, int]]:
    text = (ROOT / "README.md").read_text()
    return [(m.group("note") or "", m.group("body"), text[:m.start("body")].count("\n") + 1)
            for m in BLOCK.finditer(text)]


def _commands(body: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in body.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        for i in range(len(words) - 2, -1, -1):  # `> file`: the shell's, not the command's
            if words[i] in (">", ">>", "<", "2>"):
                del words[i:i + 2]
        if words:
            out.append(shlex.join(words))
    return out


def _parsers() -> dict[str, Callable[[list[str]], object]]:
    from agent.cli import build_parser as agent_parser
    from converter.cli import build_parser as convert_parser
    from fleet.cli import _parser as fleet_parser

    return {"edge-agent": agent_parser().parse_args,
            "edge-convert": convert_parser().parse_args,
            "edge-fleet": fleet_parser().parse_args}


def _bench_options(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, f"{script} --help: {proc.stderr[-2000:]}"
    return proc.stdout


def _kind(words: list[str], parse: dict[str, Callable[[list[str]], object]],
          helps: dict[str, str]) -> str:
    """What the command is ("program", "bench", "script" or "not run") once checked.

    Raises:
        AssertionError: the command is not valid as written; the message says why.
    """
    assert not {"|", "…", "..."} & set(words) and not any(
        OPTIONAL.match(w) for w in words), "pseudo-syntax, not a command"
    if words[0] in PROGRAMS:
        try:
            parse[words[0]](words[1:])
        except SystemExit as exc:  # argparse's refusal (its message is on stderr)
            raise AssertionError(f"{words[0]} refuses it") from exc
        return "program"
    if words[:1] == [".venv/bin/python"] and words[1].startswith("bench/"):
        helps.setdefault(words[1], _bench_options(words[1]))
        for opt in (w.split("=", 1)[0] for w in words[2:] if w.startswith("--")):
            assert re.search(rf"{re.escape(opt)}\b", helps[words[1]]), \
                f"{words[1]} has no option {opt}"
        return "bench"
    if words[0].startswith("scripts/"):
        assert (ROOT / words[0]).is_file() and (ROOT / words[0]).stat().st_mode & 0o111, \
            "no such script"
        return "script"
    assert words[0] in NOT_RUN, "a README command of a new kind (run it, or say why not)"
    return "not run"


def test_every_readme_command_is_valid_as_written() -> None:
    parse, helps = _parsers(), {}
    checked = {"program": 0, "bench": 0, "script": 0, "not run": 0, "run elsewhere": 0}
    for note, body, line in _blocks():
        if "runs this block as written" in note:  # e.g. the curl block: a live agent
            (test_file,) = re.findall(r"tests/\w+\.py", note)
            assert "README.md" in (ROOT / test_file).read_text(), (line, test_file)
            checked["run elsewhere"] += 1
            continue
        for cmd in _commands(body):
            try:
                checked[_kind(shlex.split(cmd), parse, helps)] += 1
            except AssertionError as exc:
                raise AssertionError(f"README.md:{line}: {cmd}: {exc}") from None
    # what the README holds today, so that a block the parser stops seeing fails here
    assert checked["program"] >= 50 and checked["bench"] >= 15, checked
    assert checked["script"] >= 3 and checked["run elsewhere"] == 1, checked


def test_the_cheap_readme_commands_run_as_written(tmp_path: Path) -> None:
    """Run for real, in order, in a scratch directory; each must be in the README as is."""
    text = (ROOT / "README.md").read_text()
    listed = {c for _, body, _ in _blocks() for c in _commands(body)}
    bin_dir = Path(sys.executable).parent
    for cmd in RUN:
        assert cmd in listed, f"no longer in the README: {cmd}"
        words = shlex.split(cmd)
        proc = subprocess.run([str(bin_dir / words[0]), *words[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)})
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
        if cmd == "edge-agent profiles":
            assert "raspberry-pi-4" in proc.stdout and "arm-ethos-u55-128" in proc.stdout
    assert (tmp_path / "fleetkeys/root.json").is_file()
    assert (tmp_path / "pki/pi-0007.crt").is_file() or list((tmp_path / "pki").rglob("pi-0007*"))
    assert "edge-agent profiles" in text


@pytest.mark.parametrize("bad", ["edge-agent profiles | profile NAME",
                                 "edge-fleet rollout status [ID] --every-device",
                                 "edge-fleet command rollback --model digits --key …",
                                 "edge-convert run --no-such-option 1",
                                 "edge-agent profile",
                                 ".venv/bin/python bench/bench_fleet.py --no-such 1",
                                 "scripts/no-such.sh",
                                 "sudo edge-agent status"])
def test_what_the_check_refuses(bad: str) -> None:
    """The check can fail: README lines like the ones this test was written against."""
    with pytest.raises(AssertionError):
        _kind(shlex.split(bad), _parsers(), {})
