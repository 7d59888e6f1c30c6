"""The wheels an image installs with `pip install --no-index`: this project's wheel and exactly the
versions of its dependencies installed here, fetched on the host (`pip download`), so an image runs what
the tests ran, and no build reaches a registry from inside the engine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = "baaaht"
INSTALLER = "pip"  # run from its wheel inside the build stage; never installed into an image
PIP_TIMEOUT = 600.0  # seconds
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class WheelhouseError(RuntimeError):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_pins(project: str = PROJECT, extras: tuple[str, ...] = ()) -> list[str]:
    """`name==version` of every distribution the project needs at run time, as installed here: its
    requirements (with those of the named extras) and theirs, other extras left out. A requirement not
    installed here is one this platform does not need (its marker is false), or the project would not
    run here either; a named extra's own requirements must be installed."""
    distribution = importlib.metadata.distribution(project)
    provided = {canonical(extra) for extra in distribution.metadata.get_all("Provides-Extra") or []}
    missing = [extra for extra in extras if canonical(extra) not in provided]
    if missing:
        raise WheelhouseError(
            f"the installed {project} declares no extra {', '.join(missing)}: reinstall it (pip install -e .)"
        )
    pins: dict[str, str] = {}
    pending = [(requirement, True) for requirement in distribution.requires or []]
    while pending:
        requirement, own = pending.pop()
        name, _, marker = requirement.partition(";")
        extra = _EXTRA.search(marker)
        if extra is not None and not (own and canonical(extra.group(1)) in map(canonical, extras)):
            continue
        found = _NAME.match(name)
        if found is None or canonical(found.group(1)) in pins:
            continue
        try:
            dist = importlib.metadata.distribution(found.group(1))
        except importlib.metadata.PackageNotFoundError:
            if extra is not None:
                raise WheelhouseError(
                    f"{found.group(1)} (extra {extra.group(1)}) is not installed here"
                ) from None
            continue
        pins[canonical(found.group(1))] = f"{dist.metadata['Name']}=={dist.version}"
        pending += [(inner, False) for inner in dist.requires or []]
    return sorted(pins.values(), key=str.lower)


def installer_pin() -> str:
    return f"{INSTALLER}=={importlib.metadata.version(INSTALLER)}"


def pins_digest(pins: list[str]) -> str:
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def fetch_dependencies(pins: list[str], cache: Path) -> Path:
    """A directory holding one wheel per pin (binary only), downloaded once per set of pins."""
    directory = cache / f"deps-{pins_digest(pins)}"
    if (directory / ".complete").exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(directory), *pins)
    (directory / ".complete").touch()
    return directory


def build_project_wheel(source_root: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--no-deps", "--wheel-dir", str(into), str(source_root))
    built = sorted(into.glob(f"{PROJECT}-*.whl"))
    if len(built) != 1:
        raise WheelhouseError(f"pip wheel left {len(built)} {PROJECT} wheels in {into}")
    return built[0]


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise WheelhouseError(f"pip {args[0]} failed (exit {done.returncode}):\n{tail}")
