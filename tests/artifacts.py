"""Build what the device-side tests need from the host toolchain, once, into a directory:
a converted digits run and signed releases. The lean device environments (no torch, no
converter tooling) then run the agent's tests against these files.

    .venv/bin/python tests/artifacts.py build/test-artifacts
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import FAST
from fixture_agent import make_releases

from converter.cli import main as convert
from converter.examples.digits import write_example

PI4 = "raspberry-pi-4"


def build(out: Path) -> dict[str, str]:
    """The converted run in out/run and releases; returns name -> path (as conftest uses)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_example(out / "example", profile=PI4, epochs=8)
    assert convert(["run", str(out / "example/recipe.toml"), "--out", str(out / "run"),
                    *FAST]) == 0
    rel = out / "releases"
    rel.mkdir()
    made = make_releases(out / "run", rel)
    for work in rel.glob("**/work-*"):  # only the archives travel
        shutil.rmtree(work)
    index = {k: str(v.relative_to(out)) for k, v in made.items()}
    (out / "releases.json").write_text(json.dumps(index, indent=2))
    return index


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]).resolve()), indent=2))
