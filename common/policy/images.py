"""Image references and image patterns, parsed the way the Docker engine reads them.

`registry:5000/ns/img:tag@sha256:...`: the registry is the first component when it has a `.`
or a `:` or is `localhost`; the tag follows the last `:` of the last component; the digest
follows `@`. Unqualified names are Docker Hub's (`python` is `docker.io/library/python`), so a
pattern and a reference name the same image however either is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REGISTRY = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_PATTERN_TEXT = re.compile(r"[A-Za-z0-9._:/@\-\[\]*]+")


class ImageError(ValueError):
    """A reference or pattern that cannot be parsed; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    registry: str
    path: str  # `library/python`
    tag: str  # "" when the reference names no tag
    digest: str  # "" when the reference is not pinned

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.path}"

    @property
    def pulls_latest(self) -> bool:
        """`:latest`, or no tag and no digest (which the engine reads as `:latest`)."""
        return self.tag == "latest" or (not self.tag and not self.digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _split(text: str) -> tuple[str, str, str]:
    """(name, tag, digest) of a reference or pattern, without judging the name."""
    name, _, digest = text.partition("@")
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _qualify(components: list[str]) -> tuple[str, list[str]]:
    """(registry, path components) with Docker Hub's defaults filled in."""
    first = components[0]
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, components[1:]
    else:
        registry, path = DEFAULT_REGISTRY, components
    if registry in _HUB_ALIASES:
        registry = DEFAULT_REGISTRY
        if len(path) == 1 and "*" not in path[0]:
            path = ["library", *path]
    return registry, path


def parse_reference(text: str) -> ImageRef:
    if not text or text != text.strip():
        raise ImageError(f"image reference {text!r} is empty or has surrounding spaces")
    name, tag, digest = _split(text)
    if not name:
        raise ImageError(f"image reference {text!r} has no name")
    if tag and not _TAG.fullmatch(tag):
        raise ImageError(f"image reference {text!r} has an invalid tag {tag!r}")
    if "@" in text and not _DIGEST.fullmatch(digest):
        raise ImageError(
            f"image reference {text!r} has an invalid digest {digest!r} (expected e.g. sha256:<hex>)"
        )
    registry, path = _qualify(name.split("/"))
    if not _REGISTRY.fullmatch(registry):
        raise ImageError(f"image reference {text!r} has an invalid registry {registry!r}")
    for component in path:
        if not _COMPONENT.fullmatch(component):
            raise ImageError(
                f"image reference {text!r} has an invalid name component {component!r} "
                "(lower-case letters, digits and separators . _ - only)"
            )
    return ImageRef(registry, "/".join(path), tag, digest)


def _glob_regex(glob: str) -> re.Pattern[str]:
    # In image patterns `*` matches any run of characters, `/` included: `ghcr.io/org/*`
    # covers everything the organisation publishes.
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")))


@dataclass(frozen=True)
class ImagePattern:
    """`*`, `ghcr.io/org/*`, `python`, `python:3.*`, `img@sha256:...`: a name glob, and an
    optional tag glob and digest. A pattern without a tag matches every tag of the name."""

    text: str
    name: re.Pattern[str]
    tag: re.Pattern[str] | None
    digest: str

    def matches(self, ref: ImageRef) -> bool:
        if not self.name.fullmatch(ref.name):
            return False
        # The engine reads an untagged reference as `:latest`.
        if self.tag is not None and not self.tag.fullmatch(ref.tag or ("" if ref.digest else "latest")):
            return False
        return not self.digest or self.digest == ref.digest


def parse_pattern(text: str) -> ImagePattern:
    if not text or not _PATTERN_TEXT.fullmatch(text):
        raise ImageError(
            f"image pattern {text!r} is empty or holds characters an image reference cannot have"
        )
    name, tag, digest = _split(text)
    if not name:
        raise ImageError(f"image pattern {text!r} has no name (write `*` for any image)")
    if "@" in text and not _DIGEST.fullmatch(digest):
        raise ImageError(f"image pattern {text!r} has an invalid digest {digest!r}")
    components = name.split("/")
    # A wildcard in the first component stands for any registry, so only literal names are qualified.
    if "*" not in components[0]:
        registry, path = _qualify(components)
        name = "/".join([registry, *path])
    return ImagePattern(text, _glob_regex(name), _glob_regex(tag) if tag else None, digest)


def matching(patterns: list[ImagePattern], ref: ImageRef) -> ImagePattern | None:
    return next((pattern for pattern in patterns if pattern.matches(ref)), None)
