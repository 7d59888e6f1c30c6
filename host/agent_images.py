"""baaaht's Python images, built offline from a source checkout: `baaaht/agent:<hash>` (what agent
containers run: this project's venv, uid 1000, no package tooling) and `baaaht/orchestrator:<hash>`
(the whole host, run with the Docker socket mounted), both targets of images/Dockerfile over the
Debian base of host/debian_base.py.

A tag is a hash of everything its image is made of: the base's recipe, the Dockerfile, the project's
source (pyproject.toml and every file of its package folders), the pinned dependency versions and pip's.
An image whose tag the engine has is never built again, so a cached run costs hashing the source
(milliseconds); only a changed input pays a build. One build at a time per machine (a file lock), so
test sessions started together do not debootstrap twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import docker

from baaaht.host import debian_base, wheelhouse

AGENT_REPOSITORY = "baaaht/agent"
ORCHESTRATOR_REPOSITORY = "baaaht/orchestrator"
TAG_LENGTH = 12
BUILD_TIMEOUT = 600  # seconds for the engine's build call
# Which checkout built an image: a new build replaces that checkout's older ones of the same repository.
SOURCE_LABEL = "baaaht.source"
_SKIPPED_PARTS = {"__pycache__"}
README = "README.md"  # the wheel's description: copied into the build, not part of the tag
IMAGE_EXTRAS = ("llm",)  # the project's extras its images install: agents call LLMs through the egress


class ImageBuildError(RuntimeError):
    """An image cannot be built here; the message says why."""


def source_root() -> Path:
    """The checkout this package runs from; images are built from sources, not from an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "images" / "Dockerfile").is_file():
        raise ImageBuildError(f"the images are built from a baaaht source checkout; {root} is not one")
    return root


def checkout_agent_image() -> str | None:
    """The agent image of the checkout this package runs from; None for an installed wheel."""
    try:
        return Recipe.here().agent_reference()
    except ImageBuildError:
        return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "baaaht" / "images"


@dataclass(frozen=True)
class Recipe:
    """What an image is built from; its tags follow from it without building anything."""

    root: Path
    mirror: str  # the Debian mirror the base is debootstrapped from
    pins: tuple[str, ...]
    installer: str

    @classmethod
    def here(cls) -> "Recipe":
        return cls(
            root=source_root(),
            mirror=debian_base.apt_mirror(),
            pins=tuple(wheelhouse.dependency_pins(extras=IMAGE_EXTRAS)),
            installer=wheelhouse.installer_pin(),
        )

    @property
    def base(self) -> str:
        return debian_base.base_reference(self.mirror)

    @property
    def dockerfile(self) -> Path:
        return self.root / "images" / "Dockerfile"

    def source_digest(self) -> str:
        digest = hashlib.sha256()
        for path in self.source_files():
            digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        return digest.hexdigest()

    def source_files(self) -> list[Path]:
        pyproject = self.root / "pyproject.toml"
        folders = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"].values()
        files = [pyproject, self.dockerfile]
        for folder in sorted(set(folders)):
            files += sorted(
                path
                for path in (self.root / folder).rglob("*")
                if path.is_file() and not _SKIPPED_PARTS.intersection(path.parts) and path.suffix != ".pyc"
            )
        return files

    def agent_reference(self, source_digest: str | None = None) -> str:
        return self._reference(AGENT_REPOSITORY, "agent", source_digest or self.source_digest())

    def orchestrator_reference(self, source_digest: str | None = None) -> str:
        source_digest = source_digest or self.source_digest()
        agent = self.agent_reference(source_digest)
        return self._reference(ORCHESTRATOR_REPOSITORY, f"orchestrator\0{agent}", source_digest)

    def _reference(self, repository: str, target: str, source_digest: str) -> str:
        inputs = "\n".join([target, self.base, source_digest, self.installer, *self.pins])
        return f"{repository}:{hashlib.sha256(inputs.encode()).hexdigest()[:TAG_LENGTH]}"


@contextmanager
def _one_build_at_a_time() -> Iterator[None]:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build in another process ends, or the process does
        yield


def ensure_agent_image(client: docker.DockerClient, recipe: Recipe | None = None) -> str:
    """The agent image's reference, built first when the engine does not have it."""
    recipe = recipe or Recipe.here()
    reference = recipe.agent_reference()
    _ensure(client, recipe, reference, "agent", {})
    return reference


def ensure_orchestrator_image(client: docker.DockerClient, recipe: Recipe | None = None) -> str:
    """The orchestrator image's reference (and the agent image it starts), built when missing."""
    recipe = recipe or Recipe.here()
    digest = recipe.source_digest()
    agent = recipe.agent_reference(digest)
    _ensure(client, recipe, agent, "agent", {})
    reference = recipe.orchestrator_reference(digest)
    _ensure(client, recipe, reference, "orchestrator", {"AGENT_IMAGE": agent})
    return reference


def _has(client: docker.DockerClient, reference: str) -> bool:
    try:
        client.images.get(reference)
        return True
    except docker.errors.ImageNotFound:
        return False


def _ensure(
    client: docker.DockerClient, recipe: Recipe, reference: str, target: str, buildargs: dict[str, str]
) -> None:
    if _has(client, reference):
        return
    with _one_build_at_a_time():
        if _has(client, reference):  # built by another process while we waited
            return
        debian_base.ensure_base_image(client, recipe.mirror)
        with tempfile.TemporaryDirectory(prefix="baaaht-image-") as work:
            context = Path(work)
            _fill_context(recipe, context)
            try:
                client.images.build(
                    path=str(context),
                    target=target,
                    tag=reference,
                    buildargs={"BASE": recipe.base, **buildargs},
                    rm=True,
                    forcerm=True,
                    pull=False,  # FROM names the local base: never ask a registry
                    timeout=BUILD_TIMEOUT,
                    labels={SOURCE_LABEL: str(recipe.root)},
                )
            except docker.errors.BuildError as error:
                log = "".join(str(line.get("stream", line.get("error", ""))) for line in error.build_log)
                raise ImageBuildError(f"building {reference} failed: {error}\n{log[-3000:]}") from None
        _remove_older(client, recipe.root, reference)


def _remove_older(client: docker.DockerClient, root: Path, reference: str) -> None:
    """Older images of the repository built from the same checkout: each source edit would leave one."""
    repository = reference.split(":")[0]
    for image in client.images.list(name=repository, filters={"label": f"{SOURCE_LABEL}={root}"}):
        if reference in image.tags:
            continue
        for tag in image.tags:
            try:
                client.images.remove(tag)
            except docker.errors.APIError:
                pass  # a container still uses it: the next build tries again


def _fill_context(recipe: Recipe, context: Path) -> None:
    """Dockerfile, wheels/deps (the pinned dependencies), wheels/project (this project's wheel) and
    wheels/pip.whl (the installer, run from its wheel)."""
    shutil.copy(recipe.dockerfile, context / "Dockerfile")
    wheels = context / "wheels"
    deps = wheelhouse.fetch_dependencies(list(recipe.pins), cache_dir() / "wheels")
    shutil.copytree(deps, wheels / "deps", ignore=shutil.ignore_patterns(".complete"))
    installer = wheelhouse.fetch_dependencies([recipe.installer], cache_dir() / "wheels")
    (pip_wheel,) = installer.glob("*.whl")
    shutil.copy(pip_wheel, wheels / "pip.whl")
    shutil.copytree(_project_wheel(recipe), wheels / "project", ignore=shutil.ignore_patterns(".complete"))


def _project_wheel(recipe: Recipe) -> Path:
    """This project's wheel for the current sources, built once per source digest: the same bytes for
    every image of one digest, so the engine's build cache serves the second image's install stage."""
    built = cache_dir() / "project" / recipe.source_digest()[:16]
    if (built / ".complete").exists():
        return built
    shutil.rmtree(built, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="baaaht-sources-") as work:
        # Built from a copy of exactly the hashed files: what the tag names is what the wheel holds.
        sources = Path(work)
        for path in [*recipe.source_files(), recipe.root / README]:
            copy = sources / path.relative_to(recipe.root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, copy)
        wheelhouse.build_project_wheel(sources, built)
    (built / ".complete").touch()
    return built
