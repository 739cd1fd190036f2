"""Rollouts under injected faults, several seeds (`tests/chaos.py`; the suite runs one).

    .venv/bin/python bench/bench_chaos.py [--seeds 1,2,3] [--devices 300] [--agents 2]
                                          [--faulty 2]

Prints per seed: the faults injected by kind, the outcome and exit code, how many
controllers ran, the execution statuses, and the mismatches between the rollout's record
and what each device runs (target 0); then the totals.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from chaos import Chaos, ChaosResult  # noqa: E402  # tests/ holds the harness
from fixture_agent import make_releases  # noqa: E402

from converter.cli import main as convert  # noqa: E402
from converter.examples.digits import write_example  # noqa: E402


def releases(where: Path) -> dict[str, Path]:
    """The digits releases the suite uses, converted into `where` (a quick run, as the
    suite's: the model's accuracy does not matter here)."""
    example = where / "example"
    write_example(example, epochs=8)
    rc = convert(["run", str(example / "recipe.toml"), "--out", str(where / "run"),
                  "--distill-epochs", "12", "--distill-progress", "false",
                  "--evaluate-latency-runs", "5", "--data-calibration-samples", "64",
                  "--distill-max-gap-points", "25"])
    if rc != 0:
        raise SystemExit("the conversion failed")
    return make_releases(where / "run", where / "releases")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--devices", type=int, default=300, help="simulated devices")
    ap.add_argument("--agents", type=int, default=2, help="real agents")
    ap.add_argument("--extra-faults", type=int, default=6,
                    help="faults beyond one of each kind")
    ap.add_argument("--faulty", type=float, default=0.0,
                    help="percent of simulated devices whose self-test fails the release "
                         "(the rollout must halt and every device end on the old one)")
    ns = ap.parse_args()
    results: list[ChaosResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        rel = releases(Path(tmp) / "build")
        for seed in (int(s) for s in ns.seeds.split(",")):
            where = Path(tmp) / f"seed-{seed}"
            where.mkdir()
            print(f"seed {seed}: {ns.devices} simulated devices + {ns.agents} agents",
                  flush=True)
            chaos = Chaos(where, rel, devices=ns.devices, agents=ns.agents, seed=seed,
                          extra_faults=ns.extra_faults, faulty_percent=ns.faulty,
                          say=lambda s: print(s, flush=True))
            try:
                r = chaos.run()
            finally:
                chaos.close()
            results.append(r)
            print(f"  {r.status} (exit {r.exit_code}) in {r.seconds:.0f} s; faults "
                  + ", ".join(f"{k} {n}" for k, n in sorted(r.faults.items()))
                  + f"; {r.controller_runs} controller runs; statuses "
                  + ", ".join(f"{k} {n}" for k, n in sorted(r.statuses.items()))
                  + f"; mismatches {len(r.mismatches)}; problems {r.problems()}; load "
                  "average " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
                  flush=True)
    faults: Counter[str] = Counter()
    for r in results:
        faults.update(r.faults)
    print(f"\n{len(results)} seeds: {sum(r.status == 'completed' for r in results)} completed, "
          f"{sum(r.status == 'halted' for r in results)} halted; faults "
          + ", ".join(f"{k} {n}" for k, n in sorted(faults.items()))
          + f"; mismatches {sum(len(r.mismatches) for r in results)}; runs with problems "
          f"{sum(bool(r.problems()) for r in results)}")
    return 1 if any(r.problems() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
