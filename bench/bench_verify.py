"""Verification figures: throughput on a large bundle against bare hashing, peak memory
against bundle size, and signatures / commands verified per second.

    .venv/bin/python bench/bench_verify.py [--mb 50] [--sizes 5,50,200]

Each memory figure comes from a fresh subprocess (its RSS high-water mark, VmHWM, before and
after the verification, and tracemalloc's peak of Python allocations during it), so sizes
do not share a heap. The bundle's model file is random bytes: incompressible, the worst case
for the archive.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixture_trust import DEVICE, FLEET, KEYS, NOW, make_bundle, root, sign_dir

from agent.trust.archive import unpack_bundle
from agent.trust.bundle import CHUNK_BYTES, verify_bundle_dir
from agent.trust.command import Addressee, verify_command
from agent.trust.signatures import Role, verify_threshold
from fleet.trust.commands import build_command, sign_command
from fleet.trust.release import pack_bundle

MB = 1_000_000


def big_bundle(where: Path, size_mb: int) -> Path:
    bundle = make_bundle(where, model=os.urandom(size_mb * MB), name=f"b{size_mb}")
    sign_dir(bundle)
    return bundle


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bare_sha256(path: Path) -> None:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    h.hexdigest()


def throughput(size_mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = big_bundle(Path(tmp), size_mb)
        total = sum(p.stat().st_size for p in bundle.iterdir()) / MB
        rows = [
            ("bare hashlib.sha256 of the files (the bound)",
             best_of(3, lambda: [bare_sha256(p) for p in bundle.iterdir()])),
            ("verify_bundle_dir: signatures + policy + files",
             best_of(3, lambda: verify_bundle_dir(bundle, root(), device=DEVICE, now=NOW))),
        ]
        archive = pack_bundle(bundle, Path(tmp) / "b.tar.zst")
        n = iter(range(100))
        rows.append(("unpack_bundle from .tar.zst: decompress, verify, write, fsync",
                     best_of(3, lambda: unpack_bundle(archive, Path(tmp) / f"u{next(n)}",
                                                      root(), device=DEVICE, now=NOW))))
        print(f"\nverification throughput on a {total:.1f} MB bundle (page cache warm, "
              "best of 3)")
        print(f"  {'path':64} {'s':>7} {'MB/s':>8}")
        for label, secs in rows:
            print(f"  {label:64} {secs:7.3f} {total / secs:8.0f}")


def memory_verify_only(bundle: Path) -> dict[str, float]:
    code = (
        "import json,re,sys,tracemalloc;from pathlib import Path;"
        f"sys.path.insert(0,{str(Path(__file__).resolve().parents[1] / 'tests')!r});"
        "from fixture_trust import DEVICE,NOW,root;"
        "from agent.trust.bundle import verify_bundle_dir;"
        # VmHWM, not ru_maxrss: Linux carries the parent's maxrss into a forked child.
        "r=root();rss=lambda:int(re.search(r'VmHWM:\\s+(\\d+)',"
        "open('/proc/self/status').read()).group(1))/1024;"
        "b=rss();tracemalloc.start();"
        f"verify_bundle_dir(Path({str(bundle)!r}),r,device=DEVICE,now=NOW);"
        "p=tracemalloc.get_traced_memory()[1];"
        "print(json.dumps({'traced_peak_mb':p/2**20,'rss_growth_mb':rss()-b,'rss_mb':rss()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def memory(sizes: list[int]) -> None:
    print("\npeak memory of verify_bundle_dir against bundle size (fresh process each)")
    print(f"  {'bundle MB':>9} {'peak RSS MB':>12} {'RSS growth MB':>14} "
          f"{'tracemalloc peak MB':>20}")
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = big_bundle(Path(tmp), size)
            m = memory_verify_only(bundle)
        print(f"  {size:9d} {m['rss_mb']:12.1f} {m['rss_growth_mb']:14.1f} "
              f"{m['traced_peak_mb']:20.2f}")


def signatures() -> None:
    msg = os.urandom(2000)
    key = KEYS["release-1"]
    sig = key.sign(msg)
    raw_vk = nacl.signing.VerifyKey(bytes.fromhex(key.public.public))
    raw_sig = bytes.fromhex(sig.sig)
    role = Role(name="release", keyids=frozenset({key.keyid}), threshold=1)
    keys = {key.keyid: key.public}
    me = Addressee(fleet=FLEET, device="pi-0007")
    trusted = root()
    cmd = sign_command(build_command("restart", fleet=FLEET, device="pi-0007", now=NOW),
                       [KEYS["command-1"]])
    n = 5000
    rows = [
        ("bare PyNaCl VerifyKey.verify", lambda: raw_vk.verify(msg, raw_sig)),
        ("verify_threshold (1 signature, key lookup, role)",
         lambda: verify_threshold(msg, [sig], role=role, keys=keys, what="m")),
        ("verify_command (parse envelope, signature, model, checks)",
         lambda: verify_command(trusted, cmd, me=me, now=NOW, seen=set())),
    ]
    print(f"\nsignature verification ({n} iterations each)")
    print(f"  {'path':60} {'per s':>9} {'us each':>8}")
    for label, fn in rows:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        print(f"  {label:60} {n / dt:9.0f} {dt / n * 1e6:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--sizes", default="5,50,200")
    ns = ap.parse_args()
    print(f"bench_verify on {os.cpu_count()} CPU(s), chunk {CHUNK_BYTES // 1024} KiB, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    throughput(ns.mb)
    memory([int(s) for s in ns.sizes.split(",")])
    signatures()


if __name__ == "__main__":
    main()
