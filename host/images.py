"""The local images, built without any registry and tagged by a hash of their inputs (never `:latest`),
so the default policy allows them and a changed input gives a new tag:

- `baaaht/busybox:<hash>`: Debian's busybox-static as a root filesystem (this module);
- `baaaht/agent:<hash>` and `baaaht/orchestrator:<hash>`: this project's Python images over an offline
  Debian base (host/agent_images.py, host/debian_base.py).

`python -m baaaht.host.images [busybox|agent|orchestrator|all]` builds what is missing or stale and prints
the tags (busybox when none is named); the tests build them the same way.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading

import docker

from baaaht.host import agent_images, debian_base, wheelhouse

REPOSITORY = "baaaht/busybox"
BUSYBOX_BINARY = "/bin/busybox"
TAG_LENGTH = 12  # hex digits of the content hash
# Users the hardened containers run as: a name makes `id` output readable, nothing depends on it.
PASSWD = "root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/tmp:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1000:\n"

_build_lock = threading.Lock()


def _add(tar: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
    # Fixed owner and mtime (0): the same busybox always gives the same bytes, hence the same tag.
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
    tar.addfile(info, io.BytesIO(data) if data else None)


def busybox_rootfs_tar() -> bytes:
    """A root filesystem: /bin/busybox, one symlink per applet, and the directories a container expects."""
    applets = subprocess.run(
        [BUSYBOX_BINARY, "--list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("bin", "etc", "proc", "sys", "dev", "run", "var", "root"):
            _add(tar, directory, tarfile.DIRTYPE, 0o755)
        _add(tar, "tmp", tarfile.DIRTYPE, 0o1777)
        with open(BUSYBOX_BINARY, "rb") as binary:
            _add(tar, "bin/busybox", tarfile.REGTYPE, 0o755, binary.read())
        for applet in sorted(set(applets) - {"busybox"}):
            _add(tar, f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        _add(tar, "etc/passwd", tarfile.REGTYPE, 0o644, PASSWD.encode())
        _add(tar, "etc/group", tarfile.REGTYPE, 0o644, GROUP.encode())
    return buf.getvalue()


def ensure_busybox_image(client: docker.DockerClient) -> str:
    """The image's tag, imported into the engine first if it is not there yet."""
    rootfs = busybox_rootfs_tar()
    tag = hashlib.sha256(rootfs).hexdigest()[:TAG_LENGTH]
    reference = f"{REPOSITORY}:{tag}"
    with _build_lock:
        try:
            client.images.get(reference)
        except docker.errors.ImageNotFound:
            client.api.import_image_from_data(rootfs, repository=REPOSITORY, tag=tag)
            client.images.get(reference)
    return reference


BUILDERS = {
    "busybox": ensure_busybox_image,
    "agent": agent_images.ensure_agent_image,
    "orchestrator": agent_images.ensure_orchestrator_image,
}
BUILD_ERRORS = (
    docker.errors.DockerException,
    OSError,
    subprocess.SubprocessError,
    agent_images.ImageBuildError,
    debian_base.BaseImageError,
    wheelhouse.WheelhouseError,
)


def main(argv: list[str] | None = None) -> None:
    names = (sys.argv[1:] if argv is None else argv) or ["busybox"]
    if names == ["all"]:
        names = list(BUILDERS)
    if unknown := [name for name in names if name not in BUILDERS]:
        sys.exit(f"unknown image {', '.join(unknown)}: expected {', '.join(BUILDERS)} or all")
    client = docker.from_env(timeout=agent_images.BUILD_TIMEOUT)
    try:
        for name in names:
            print(BUILDERS[name](client), flush=True)
    except BUILD_ERRORS as exc:
        sys.exit(f"cannot build the local image {name}: {exc}")
    finally:
        client.close()


if __name__ == "__main__":
    main()
