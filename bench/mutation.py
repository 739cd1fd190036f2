"""Mutation testing of the trust and update cores: does each test suite notice when the code
it guards is changed? An AST mutator (no tool to configure: mutmut and cosmic-ray want a
project layout of their own) makes one small change at a time, writes the mutated module
in place, runs the module's tests in a fresh pytest process (first failure stops it), and
puts the file back, whatever happens.

Changes made, one per mutant: a comparison turned (`<` and `<=`, `>` and `>=`, `==` and
`!=`, `in` and `not in`, `is` and `is not`), `and` and `or` swapped, a `not` dropped, an
integer constant moved by one, `True` and `False` swapped, an `if` test made `False`, a
`raise` or `return` statement removed (`pass`). Every mutant changes the code; some do not
change its behaviour (the mutation is equivalent), and no tool can tell which: the survivors
are listed for a reader to judge.

    .venv/bin/python bench/mutation.py [--module agent/trust/root.py ...] [--limit N]

Prints per module: mutants, killed, survived, the kill rate, and each survivor's line.
Takes minutes per module (one pytest start per mutant): run it alone, not beside a suite,
and from a checkout you are not editing (it rewrites the module under test; a run killed
half way leaves `*.mutation-original` beside it, put back by the next run).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: module -> the tests that are meant to guard it
SUITES: dict[str, list[str]] = {
    "agent/trust/root.py": ["tests/test_trust_edges.py", "tests/test_trust_attacks.py"],
    "agent/trust/signatures.py": ["tests/test_trust_edges.py", "tests/test_trust_attacks.py",
                                  "tests/test_trust_fuzz.py"],
    "agent/trust/verify.py": ["tests/test_trust_edges.py", "tests/test_trust_attacks.py"],
    "agent/trust/tar.py": ["tests/test_tar_reader.py", "tests/test_trust_edges.py",
                           "tests/test_archive_limits.py"],
    "agent/serving/admission.py": ["tests/test_admission.py"],
    "agent/updates/deploy.py": ["tests/test_deploy_flow.py", "tests/test_trust_edges.py"],
    "agent/updates/lifecycle.py": ["tests/test_trust_edges.py", "tests/test_store.py"],
    "fleet/rollout/policy.py": ["tests/test_policy.py"],
}
COMPARE_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
    ast.IsNot: ast.Is}


def _sites(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """Every node a mutant can change, with what the change is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE_SWAP:
                    yield node, f"compare:{i}"
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, "int"
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield node, "bool"
        elif isinstance(node, ast.If):
            yield node, "if"
        elif isinstance(node, ast.Raise | ast.Return) and node.lineno:
            yield node, "drop"


class _Mutate(ast.NodeTransformer):
    def __init__(self, target: int, kind: str) -> None:
        self.target, self.kind, self.n = target, kind, -1

    def _mine(self, node: ast.AST) -> bool:
        return id(node) == self.target

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        if not self._mine(node):
            return node
        kind = self.kind
        if kind.startswith("compare:") and isinstance(node, ast.Compare):
            i = int(kind.split(":")[1])
            node.ops[i] = COMPARE_SWAP[type(node.ops[i])]()
        elif kind == "boolop" and isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif kind == "not" and isinstance(node, ast.UnaryOp):
            return node.operand
        elif kind == "int" and isinstance(node, ast.Constant):
            node.value = node.value + 1
        elif kind == "bool" and isinstance(node, ast.Constant):
            node.value = not node.value
        elif kind == "if" and isinstance(node, ast.If):
            node.test = ast.Constant(False)
        elif kind == "drop":
            return ast.Pass()
        return node


def mutants(source: str) -> Iterator[tuple[int, str, str]]:
    """(line, change, mutated source) for each site of `source`."""
    tree = ast.parse(source)
    sites = list(_sites(tree))
    for index in range(len(sites)):
        copied = copy.deepcopy(tree)
        node, kind = list(_sites(copied))[index]
        line = getattr(node, "lineno", 0)
        if _docstring_or_annotation(copied, node):
            continue
        mutated = ast.fix_missing_locations(_Mutate(id(node), kind).visit(copied))
        yield line, kind, ast.unparse(mutated)


def _docstring_or_annotation(tree: ast.AST, node: ast.AST) -> bool:
    """Constants in annotations and type aliases change nothing at run time; a decorator's
    arguments (`@dataclass(frozen=True, kw_only=True)`) declare how a class may be used,
    and no caller that uses it as declared can tell them apart: both are left alone."""
    for parent in ast.walk(tree):
        for ann in (getattr(parent, "annotation", None), getattr(parent, "returns", None),
                    *getattr(parent, "decorator_list", ())):
            if ann is not None and any(n is node for n in ast.walk(ann)):
                return True
    return False


def run(module: str, tests: list[str], limit: int | None) -> tuple[int, int, list[str]]:
    path = ROOT / module
    backup = path.with_name(path.name + ".mutation-original")
    if backup.exists():  # a run killed before it could put the module back
        backup.replace(path)
    original = path.read_text()
    backup.write_text(original)
    killed = total = 0
    survivors: list[str] = []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    timeout_s = 600.0

    def passes() -> bool:
        """The tests pass; a mutant that makes them hang (a loop that never ends) is caught
        by the timeout: killed."""
        try:
            return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q",
                                   "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env,
                                  capture_output=True, timeout=timeout_s, check=False
                                  ).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    try:
        t0 = time.monotonic()
        if not passes():  # else every mutant would look killed
            raise SystemExit(f"{module}: its tests fail on the unmutated code: {tests}")
        timeout_s = max(30.0, 5 * (time.monotonic() - t0))  # a hang, not a slow machine
        for line, kind, mutated in mutants(original):
            if limit is not None and total >= limit:
                break
            total += 1
            path.write_text(mutated)
            if not passes():
                killed += 1
            else:
                text = original.splitlines()[line - 1].strip() if line else "?"
                survivors.append(f"{module}:{line} {kind}: {text[:100]}")
    finally:
        path.write_text(original)
        backup.unlink()
    return total, killed, survivors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", choices=sorted(SUITES))
    ap.add_argument("--limit", type=int, help="at most this many mutants per module")
    ns = ap.parse_args()
    print(f"mutation run, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for module in ns.module or sorted(SUITES):
        t0 = time.monotonic()
        total, killed, survivors = run(module, SUITES[module], ns.limit)
        rate = 100 * killed / total if total else 100.0
        print(f"{module}: {total} mutants, {killed} killed, {len(survivors)} survived "
              f"= {rate:.0f} % killed ({time.monotonic() - t0:.0f} s)", flush=True)
        for s in survivors:
            print(f"    survived {s}", flush=True)


if __name__ == "__main__":
    main()
