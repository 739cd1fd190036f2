"""A throwaway copy of a fresh Debian 12 root filesystem (scripts/debian-rootfs.sh) to
install packages into and run commands in, as root, with /proc, /sys and /dev mounted."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rootfs(arch: str | None = None) -> Path:
    cmd = ["bash", str(REPO / "scripts/debian-rootfs.sh"), *([arch] if arch else [])]
    return Path(subprocess.run(cmd, capture_output=True, text=True, check=True,
                               timeout=1800).stdout.strip())


class Root:
    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *cmd: str, check: bool = True, timeout: float = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full = ["chroot", str(self.path), "/usr/bin/env", "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                *(f"{k}={v}" for k, v in (env or {}).items()), *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              check=False, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-3000:]}")
        return proc


@contextmanager
def fresh_root(where: Path, arch: str | None = None) -> Iterator[Root]:
    """A copy of the cached fresh root under `where`, with the host's DNS, and the kernel
    file systems mounted while it is in use."""
    target = where / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs(arch)), str(target)],
                   check=True)
    shutil.copy("/etc/resolv.conf", target / "etc/resolv.conf")
    # This machine's view of the network: its CA bundle (a registry proxy may sign with
    # its own CA) for pip and apt inside.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt",
                target / "etc/ssl/certs/ca-certificates.crt")
    mounted: list[Path] = []
    try:
        for fs, opts in (("proc", ["-t", "proc", "proc"]), ("sys", ["-t", "sysfs", "sysfs"]),
                         ("dev", ["--bind", "/dev"]), ("dev/pts", ["--bind", "/dev/pts"])):
            subprocess.run(["mount", *opts, str(target / fs)], check=True)
            mounted.append(target / fs)
        yield Root(target)
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(target)], check=False)


def unpack_release(archive: Path, dest: Path) -> None:
    """A release archive (.tar.zst) as a bundle directory."""
    import tarfile

    import zstandard

    dest.mkdir()
    with archive.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as raw, \
            tarfile.open(fileobj=raw, mode="r|") as tar:
        tar.extractall(dest, filter="data")


def add_onnxruntime(root: Root) -> None:
    """onnxruntime (as `edgekeeper[onnx]` would bring it) into the packaged environment of
    `root`, installed from the host: the device package has no pip of its own."""
    import sys

    (site,) = (root.path / "opt/venvs/edgekeeper/lib").glob("python3*/site-packages")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-deps",
                    "--target", str(site), "onnxruntime>=1.20", "flatbuffers", "packaging",
                    "protobuf"], check=True, capture_output=True, timeout=600)


def second_build(deb: Path, out_dir: Path, tag: str = "build2") -> Path:
    """A second build of the package, as a release after `deb` would be: its version, the
    agent's `__version__` and the unit's Description carry `tag` (the code and the unit an
    upgrade must bring into service)."""
    tree = out_dir / "second-build"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    lines = control.read_text().splitlines()
    lines = [f"{line}+{tag}" if line.startswith("Version: ") else line for line in lines]
    control.write_text("\n".join(lines) + "\n")
    (init,) = tree.glob("opt/venvs/edgekeeper/lib/python3*/site-packages/agent/__init__.py")
    code = init.read_text()
    assert '__version__ = "' in code
    init.write_text(code.replace('__version__ = "', f'__version__ = "{tag}-', 1))
    (unit,) = [u for u in (tree / "lib/systemd/system/edge-agent.service",
                           tree / "usr/lib/systemd/system/edge-agent.service") if u.is_file()]
    text = unit.read_text()
    unit.write_text(text.replace("\nDescription=", f"\nDescription=({tag}) ", 1))
    out = out_dir / f"edgekeeper-{tag}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True,
                   capture_output=True)
    return out
