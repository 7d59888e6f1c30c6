"""Test images built locally, without any registry: Debian's busybox-static imported as a root filesystem.

`ensure_busybox_image(client)` builds `baaaht-test/busybox:1` once (later calls find it) and returns its tag.
The busybox binary comes from the host package (scripts/ensure-docker.sh installs it).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import threading

import docker

BUSYBOX_IMAGE = "baaaht-test/busybox:1"
BUSYBOX_BINARY = "/bin/busybox"
# Users the hardened containers run as: a name makes `id` output readable, nothing depends on it.
PASSWD = "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/tmp:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1000:\n"

_build_lock = threading.Lock()


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def busybox_rootfs_tar() -> bytes:
    """A root filesystem: /bin/busybox, one symlink per applet, and the directories a container expects."""
    applets = subprocess.run(
        [BUSYBOX_BINARY, "--list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in ("bin", "etc", "proc", "sys", "dev", "run", "var", "root"):
            _add_dir(tar, directory)
        _add_dir(tar, "tmp", 0o1777)
        with open(BUSYBOX_BINARY, "rb") as f:
            _add_file(tar, "bin/busybox", f.read(), 0o755)
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        _add_file(tar, "etc/passwd", PASSWD.encode())
        _add_file(tar, "etc/group", GROUP.encode())
    return buf.getvalue()


def ensure_busybox_image(client: docker.DockerClient) -> str:
    with _build_lock:
        try:
            client.images.get(BUSYBOX_IMAGE)
        except docker.errors.ImageNotFound:
            repository, tag = BUSYBOX_IMAGE.rsplit(":", 1)
            client.api.import_image_from_data(busybox_rootfs_tar(), repository=repository, tag=tag)
            client.images.get(BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE
