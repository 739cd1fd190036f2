"""agent/ stays light: no torch, no onnx tooling, nothing from converter/ or fleet/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"
FORBIDDEN = ("torch", "torchao", "onnx", "onnxscript", "litert_torch", "tensorflow",
             "converter", "fleet", "sklearn", "matplotlib")


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def test_agent_sources_import_nothing_forbidden() -> None:
    offenders = []
    for path in AGENT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if _top(n) in FORBIDDEN]
    assert offenders == []


def test_importing_every_agent_module_loads_no_forbidden_package() -> None:
    modules = sorted(f"agent.{p.stem}" for p in AGENT.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = set(json.loads(out.stdout))
    assert len(modules) >= 5
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)
