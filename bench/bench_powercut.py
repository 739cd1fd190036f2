"""Power cuts, for real, many times (tests/powercut.py has the harness and says why a copy
of a loop-mounted ext4 image is a power cut):

1. `--cuts` cuts during `edge-agent install` of digits v2 over v1, at moments drawn over
   1.5 x the install's measured duration: after each, e2fsck -p, the agent started on the
   repaired filesystem, and the checks (a verified model serves, staging empty, journal
   and slots agree, an install answered before the cut survived). Split: old / new /
   broken, and how many cuts came after the answer;
2. the same with every fsync of the agent off (`--nosync-cuts`): the count found broken
   must be above 0, or the harness could not see what it exists for;
3. cuts while the outbox and the nonce store take writes, with fsync on and off.

    sudo .venv/bin/python bench/bench_powercut.py [--cuts 200] [--nosync-cuts 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import digits_releases
from powercut import InstallCuts, WriterCuts, available, run_cuts, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", type=int, default=200)
    ap.add_argument("--nosync-cuts", type=int, default=50)
    ap.add_argument("--writer-cuts", type=int, default=50)
    ns = ap.parse_args()
    if (why := available()) is not None:
        print(f"bench_powercut: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-powercut-") as tmp:
        where = Path(tmp)
        keys, (v1, v2) = digits_releases(where, 1, 2)
        for label, no_sync, n in (("fsync on", False, ns.cuts),
                                  ("every fsync off", True, ns.nosync_cuts)):
            harness = InstallCuts(where / label.replace(" ", "-"), keys, v1, v2,
                                  no_sync=no_sync)
            t = time.perf_counter()
            found = summary(run_cuts(harness, n, 1.5 * harness.window_s, seed=1))
            print(f"install cuts, {label}: install {1000 * harness.window_s:.1f} ms, "
                  f"{time.perf_counter() - t:.0f} s")
            print("   " + json.dumps(found))
        for label, no_sync in (("fsync on", False), ("every fsync off", True)):
            t = time.perf_counter()
            found = summary(run_cuts(WriterCuts(where / f"writer-{no_sync}", no_sync=no_sync),
                                     ns.writer_cuts, 0.5, seed=1))
            print(f"outbox and nonce cuts, {label}: {time.perf_counter() - t:.0f} s")
            print("   " + json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
