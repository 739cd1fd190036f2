"""Tar header bombs, side by side: Python's `tarfile` (what the agent used) against the
bounded reader the agent uses now (`agent.trust.tar`), each in a fresh process: wall time
to the first member or the refusal, and the process's peak RSS (VmHWM).

    .venv/bin/python bench/bench_archive_bombs.py
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_archive_limits import BOMBS  # the bombs the tests refuse

READ = {
    "tarfile": ("import tarfile, gzip\n"
                "with tarfile.open(fileobj=gzip.open(sys.argv[1]), mode='r|') as t:\n"
                "    next(iter(t), None)\n"),
    "agent.trust.tar": ("import gzip, sys\nfrom agent.trust.tar import TarReader\n"
                        "from agent.errors import BundleError\n"
                        "try:\n    next(TarReader(gzip.open(sys.argv[1]), "
                        "max_total_bytes=9 << 20), None)\n"
                        "except BundleError as e:\n    print('refused:', e)\n"),
}
WRAP = ("import re, sys, traceback\ntry:\n    exec(sys.argv[2])\nexcept BaseException as e:\n"
        "    print(f'error: {type(e).__name__}: {e}'[:200])\nfinally:\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])")


def main() -> None:
    print(f"{'bomb':14} {'size':>9}  {'reader':16} {'time':>9} {'peak RSS':>10}  outcome")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gnu_long_name", "pax_huge", "pax_digits", "header_count"):
            path = Path(tmp) / f"{name}.tar.gz"
            path.write_bytes(gzip.compress(BOMBS[name]() + bytes(1024), compresslevel=9))
            for reader, code in READ.items():
                t0 = time.monotonic()
                try:
                    p = subprocess.run([sys.executable, "-c", WRAP, str(path), code],
                                       capture_output=True, text=True, timeout=120,
                                       check=False)
                    took = time.monotonic() - t0
                    lines = p.stdout.strip().split("\n")
                    peak = f"{int(lines[-1]) / 1024:.0f} MiB"
                    outcome = lines[0][:70] if len(lines) > 1 else "parsed"
                except subprocess.TimeoutExpired:
                    took, peak, outcome = time.monotonic() - t0, "-", "killed after 120 s"
                print(f"{name:14} {path.stat().st_size:9,}  {reader:16} {took:8.2f}s "
                      f"{peak:>10}  {outcome}", flush=True)


if __name__ == "__main__":
    main()
