"""Build the tiny local image the docker tests run in.

No registry is reachable from the test machines, so nothing can be pulled: the image is made
from Debian's statically linked busybox (package ``busybox-static``) and ``docker import``-ed.
Only the standard library and the docker CLI are used, so scripts/docker-engine.sh can run this
file with any python3.

    python3 tests/docker_image.py        # prints the image name
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

TEST_IMAGE = "bonjourgrid/busybox:test"
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "work", "root")


def _docker() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise RuntimeError("no docker client on PATH")
    return exe


def image_present(image: str = TEST_IMAGE) -> bool:
    r = subprocess.run([_docker(), "image", "inspect", image], capture_output=True, check=False, timeout=60)
    return r.returncode == 0


def _static_busybox() -> str:
    for path in _BUSYBOX_CANDIDATES:
        if os.path.exists(path):
            out = subprocess.run(["file", "-b", path], capture_output=True, text=True, check=False).stdout
            if "statically linked" in out or not shutil.which("file"):
                return path
    if os.geteuid() != 0:
        raise RuntimeError("a static busybox is needed: apt-get install busybox-static (as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "busybox-static"], check=True, env=env, timeout=600)
    return "/bin/busybox"


def _rootfs_tar(busybox: str) -> bytes:
    """An in-memory rootfs: /bin/busybox, one relative symlink per applet, a few empty dirs, /etc/passwd."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in _DIRS:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d in ("tmp", "work") else 0o755
            tar.addfile(info)
        with open(busybox, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for name in sorted(set(applets) - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(raw), 0o644
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def ensure_test_image(image: str = TEST_IMAGE) -> str:
    """Return ``image``, importing it into the local engine first if it is not there yet."""
    if image_present(image):
        return image
    tar = _rootfs_tar(_static_busybox())
    subprocess.run(
        [_docker(), "import", "--change", "ENV PATH=/bin", "--change", 'CMD ["/bin/sh"]', "-", image],
        input=tar,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return image


if __name__ == "__main__":
    print(ensure_test_image(sys.argv[1] if len(sys.argv) > 1 else TEST_IMAGE))
