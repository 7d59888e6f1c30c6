"""The offline Debian base every Python image of baaaht derives from: `debootstrap --variant=minbase`
(python3, ca-certificates) against the mirror apt already uses, imported with `docker import`.

No registry is involved. The tag is a hash of what decides the content (suite, variant, packages, mirror,
this recipe's version), not of the bytes, which differ from one debootstrap to the next: the base is
made once per machine and kept, and a changed recipe gives a new tag.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker

REPOSITORY = "baaaht/base"
SUITE = "bookworm"  # the host's own Debian: its python3 (3.11) takes the host's cp311 wheels
VARIANT = "minbase"
PACKAGES = ("python3", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Bumped when what is done to the tree after debootstrap changes (the tag must change with it).
RECIPE_VERSION = "1"
DEBOOTSTRAP_TIMEOUT = 900.0  # seconds; about 40 s on a warm mirror
IMPORT_TIMEOUT = 300.0
TAG_LENGTH = 12
# Left by debootstrap and apt, needed by no image: package lists and caches, logs, documentation.
PRUNED = ("var/cache/apt", "var/lib/apt/lists", "var/log", "usr/share/doc", "usr/share/man", "usr/share/info")
_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class BaseImageError(RuntimeError):
    """The base cannot be made here; the message says what is missing."""


def apt_mirror(sources: tuple[Path, ...] = _SOURCES) -> str:
    """The Debian mirror apt uses (the first `deb` source of the main archive), else deb.debian.org."""
    for path in _source_files(sources):
        text = path.read_text(errors="replace")
        for uri in _deb822_uris(text) + _one_line_uris(text):
            if not uri.rstrip("/").endswith(("-security", "debian-security")):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _source_files(sources: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".sources", ".list"))
        elif source.is_file():
            files.append(source)
    return files


def _deb822_uris(text: str) -> list[str]:
    uris = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
        if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
            uris += fields.get("URIs", "").split()
    return uris


def _one_line_uris(text: str) -> list[str]:
    # "deb [options] URI suite components"
    found = re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.MULTILINE)
    return [uri for uri in found if "://" in uri]


def base_reference(mirror: str) -> str:
    recipe = "\n".join([SUITE, VARIANT, ",".join(PACKAGES), mirror, RECIPE_VERSION, *PRUNED])
    return f"{REPOSITORY}:{hashlib.sha256(recipe.encode()).hexdigest()[:TAG_LENGTH]}"


def ensure_base_image(client: docker.DockerClient, mirror: str) -> str:
    """The base's reference; debootstrapped from `mirror` and imported first when the engine lacks it."""
    reference = base_reference(mirror)
    try:
        client.images.get(reference)
        return reference
    except docker.errors.ImageNotFound:
        pass
    repository, tag = reference.split(":")
    with tempfile.TemporaryDirectory(prefix="baaaht-base-") as work:
        root = Path(work) / "root"
        _debootstrap(root, mirror)
        for pruned in PRUNED:
            shutil.rmtree(root / pruned, ignore_errors=True)
        archive = Path(work) / "rootfs.tar"
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive), "."], IMPORT_TIMEOUT)
        client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    client.images.get(reference)
    return reference


def _debootstrap(root: Path, mirror: str) -> None:
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap is not installed (scripts/ensure-docker.sh installs it)")
    if os.geteuid() != 0:
        raise BaseImageError("debootstrap needs root to make the base image's root filesystem")
    include = ",".join(PACKAGES)
    _run(["debootstrap", f"--variant={VARIANT}", f"--include={include}", SUITE, str(root), mirror])


def _run(argv: list[str], timeout: float = DEBOOTSTRAP_TIMEOUT) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BaseImageError(f"{' '.join(argv[:2])} failed (exit {done.returncode}):\n{tail}")
