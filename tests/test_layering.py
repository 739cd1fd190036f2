"""The layout holds: agent/ stays light, its subpackages import only downwards, nothing
imports another package's private modules, and no module imports itself back through
others (imports inside functions included: they hide cycles, they do not break them)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent"
PACKAGES = ("agent", "converter", "fleet")
FORBIDDEN = ("torch", "torchao", "onnx", "onnxscript", "litert_torch", "tensorflow",
             "converter", "fleet", "sklearn", "matplotlib")
# What each part of agent/ may import from agent/ (besides itself). The foundation
# (errors, durable, config, profiles, testing, logs, pipes) is open to all; the
# process-level modules (daemon, api, service, cli, client, unit, sdnotify, preflight) to
# none of the subpackages.
FOUNDATION = {"agent", "agent.errors", "agent.durable", "agent.config", "agent.profiles",
              "agent.testing", "agent.logs", "agent.pipes"}
LAYERS = {
    "agent.trust": set(),
    "agent.serving": {"agent.trust"},
    "agent.updates": {"agent.trust", "agent.serving"},
    "agent.link": {"agent.trust", "agent.serving", "agent.updates"},
}
# fleet/: the foundation (errors, the MQTT and process helpers, the broker's config) is
# open to all; the command line and the dashboard (process-level) to none.
FLEET_FOUNDATION = {"fleet", "fleet.errors", "fleet._mqtt", "fleet._proc", "fleet._terminal",
                    "fleet.broker", "fleet.postgres"}
FLEET_LAYERS = {
    "fleet.trust": set(),
    "fleet.store": set(),
    "fleet.sim": set(),
    "fleet.devices": {"fleet.trust", "fleet.store"},
    "fleet.rollout": {"fleet.trust", "fleet.store", "fleet.devices"},
}
#: The fleet's size limits (issue 27): a module a reader takes in at once, a class with
#: one job.
MAX_MODULE_LINES, MAX_CLASS_LINES = 400, 250


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from converter import npu` imports the module converter.npu
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `g` as a path, or None (iterative DFS, white/grey/black)."""
    colour = dict.fromkeys(g, 0)
    for start in sorted(g):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(g[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return [*path[path.index(child):], child]
            elif colour[child] == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(g[child]))))
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_itself_back() -> None:
    g = graph()
    assert len(g) > 60
    assert find_cycle(g) is None


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_agent_subpackages_import_only_downwards() -> None:
    offenders = []
    for module, deps in graph().items():
        part = _part(module)
        if part not in LAYERS:
            continue
        allowed = FOUNDATION | LAYERS[part] | {part}
        offenders += [f"{module} -> {d}" for d in deps
                      if d.startswith("agent") and d not in FOUNDATION
                      and _part(d) not in allowed]
    assert offenders == []


def test_fleet_subpackages_import_only_downwards() -> None:
    offenders = []
    g = graph()
    for module, deps in g.items():
        part = _part(module)
        if not module.startswith("fleet"):
            continue
        if part not in FLEET_LAYERS and module not in FLEET_FOUNDATION:
            continue  # the command line and the dashboard may import any part
        allowed = FLEET_FOUNDATION | FLEET_LAYERS.get(part, set()) | {part}
        offenders += [f"{module} -> {d}" for d in deps
                      if d.startswith("fleet") and d not in FLEET_FOUNDATION
                      and _part(d) not in allowed]
    assert offenders == []
    # every part of fleet/ is placed: a new subpackage needs its row above
    parts = {_part(m) for m in g if m.startswith("fleet.")} - FLEET_FOUNDATION
    assert parts <= {*FLEET_LAYERS, "fleet.cli", "fleet.dashboard"}, parts


def test_fleet_modules_and_classes_stay_readable() -> None:
    offenders = []
    for path in (REPO / "fleet").rglob("*.py"):
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            offenders.append(f"{path.relative_to(REPO)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and (
                    n := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:  # type: ignore[operator]
                offenders.append(f"{path.relative_to(REPO)}: class {node.name} {n} lines")
    assert offenders == []


def test_no_package_imports_another_packages_private_modules() -> None:
    offenders = []
    for module, deps in graph().items():
        for d in deps:
            private = [i for i, p in enumerate(d.split(".")) if p.startswith("_")]
            if private and not module.startswith(".".join(d.split(".")[:private[0]])):
                offenders.append(f"{module} -> {d}")
    assert offenders == []


def test_agent_sources_import_nothing_forbidden() -> None:
    offenders = [f"{p.relative_to(REPO)}: {n}" for p in AGENT.rglob("*.py")
                 for n in imports(p) if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_agent_module_loads_no_forbidden_package() -> None:
    modules = sorted(module_name(p) for p in AGENT.rglob("*.py"))
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    loaded = set(json.loads(out.stdout))
    assert len(modules) >= 40
    assert loaded.isdisjoint(FORBIDDEN), loaded & set(FORBIDDEN)


def test_every_public_exception_lives_in_its_packages_errors_module() -> None:
    """Each package's whole error tree is in its errors.py (drawn in its docstring); a
    private control-flow exception (`_Name`) may stay where it is raised and caught."""
    offenders = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            if path.name == "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                        (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception"))
                                                      or b.id in ("Busy", "Refused")))
                        for b in node.bases):
                    offenders.append(f"{path.relative_to(REPO)}: {node.name}")
    assert offenders == []


def test_the_error_trees_are_drawn_in_full() -> None:
    for pkg in PACKAGES:
        module = (REPO / pkg / "errors.py").read_text()
        doc = ast.get_docstring(ast.parse(module)) or ""
        classes = [n.name for n in ast.walk(ast.parse(module)) if isinstance(n, ast.ClassDef)]
        assert classes and all(c in doc for c in classes), (pkg, classes)
