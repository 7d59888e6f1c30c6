"""The offline images' inputs, pure: which mirror apt uses, what the tags are made of, the pins."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import msgspec
import pytest

from baaaht.host import debian_base, wheelhouse
from baaaht.host.agent_images import Recipe
from baaaht.host.launcher import with_default_agent_image
from baaaht.schemas.config import Config

ROOT = Path(__file__).resolve().parent.parent


def test_the_mirror_is_read_from_deb822_sources(tmp_path):
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
    )
    assert debian_base.apt_mirror((tmp_path / "sources.list", tmp_path)) == "http://mirror.example/debian"


def test_the_mirror_is_read_from_one_line_sources(tmp_path):
    listing = tmp_path / "sources.list"
    listing.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert debian_base.apt_mirror((listing,)) == "http://mirror.example/debian"


def test_without_sources_the_mirror_is_debians(tmp_path):
    assert debian_base.apt_mirror((tmp_path / "none",)) == debian_base.DEFAULT_MIRROR


def test_a_disabled_stanza_is_not_a_mirror(tmp_path):
    (tmp_path / "a.sources").write_text("Types: deb\nURIs: http://off.example/debian\nEnabled: no\n")
    assert debian_base.apt_mirror((tmp_path,)) == debian_base.DEFAULT_MIRROR


def test_the_base_tag_follows_its_recipe():
    one = debian_base.base_reference("http://a.example/debian")
    assert one == debian_base.base_reference("http://a.example/debian")
    assert one != debian_base.base_reference("http://b.example/debian")
    assert one.startswith("baaaht/base:") and not one.endswith(":latest")


@pytest.fixture
def checkout(tmp_path):
    """A copy of this checkout's image inputs, to change."""
    for name in ["pyproject.toml", "images"]:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    for folder in ["agent", "bus", "common", "ctl", "host", "schemas", "services"]:
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return Recipe(root=tmp_path, mirror="http://a.example/debian", pins=("x==1",), installer="pip==1")


def test_tags_follow_every_input(checkout):
    agent, orchestrator = checkout.agent_reference(), checkout.orchestrator_reference()
    assert agent.startswith("baaaht/agent:") and orchestrator.startswith("baaaht/orchestrator:")
    assert checkout.agent_reference() == agent  # stable while nothing changes
    (checkout.root / "bus" / "__pycache__").mkdir(exist_ok=True)
    (checkout.root / "bus" / "__pycache__" / "wire.cpython-311.pyc").write_bytes(b"compiled")
    assert checkout.agent_reference() == agent  # compiled files are not sources
    changed = [
        Recipe(checkout.root, "http://b.example/debian", checkout.pins, checkout.installer),
        Recipe(checkout.root, checkout.mirror, ("x==2",), checkout.installer),
        Recipe(checkout.root, checkout.mirror, checkout.pins, "pip==2"),
    ]
    assert len({agent, *(recipe.agent_reference() for recipe in changed)}) == 4
    with open(checkout.root / "bus" / "wire.py", "a") as source:
        source.write("# changed\n")
    assert checkout.agent_reference() != agent
    assert checkout.orchestrator_reference() != orchestrator
    edited_dockerfile = checkout.agent_reference()
    with open(checkout.root / "images" / "Dockerfile", "a") as dockerfile:
        dockerfile.write("# changed\n")
    assert checkout.agent_reference() != edited_dockerfile


def test_every_package_folder_is_a_source(checkout):
    folders = {path.relative_to(checkout.root).parts[0] for path in checkout.source_files()}
    assert {"bus", "common", "ctl", "host", "schemas", "services", "pyproject.toml", "images"} <= folders


def test_the_pins_are_the_installed_runtime_closure():
    pins = wheelhouse.dependency_pins()
    names = {wheelhouse.canonical(pin.split("==")[0]) for pin in pins}
    assert {"pyzmq", "msgspec", "docker", "requests", "urllib3", "supervisor"} <= names
    assert not names & {"pytest", "hypothesis", "ruff", "baaaht"}  # extras and the project itself are not
    assert not names & {"anthropic", "openai", "httpx"}  # the llm extra is only there when asked for
    assert all("==" in pin for pin in pins)


def test_the_images_pins_add_the_llm_extra_at_the_versions_installed_here():
    pins = set(Recipe.here().pins)
    for name in ("anthropic", "openai", "httpx", "httpx2"):
        assert f"{name}=={importlib.metadata.version(name)}" in pins
    assert set(wheelhouse.dependency_pins()) < pins
    assert not any(pin.split("==")[0] in {"pytest", "hypothesis", "ruff"} for pin in pins)


def test_an_extra_the_installed_project_does_not_declare_is_refused():
    with pytest.raises(wheelhouse.WheelhouseError, match="no extra gpu: reinstall"):
        wheelhouse.dependency_pins(extras=("gpu",))


def test_an_unset_agent_image_means_the_agent_image_of_this_checkout():
    config, sources = with_default_agent_image(Config(), {"container.agent_image": "default"})
    assert config.container.agent_image == Recipe.here().agent_reference()
    assert "this checkout" in sources["container.agent_image"]
    chosen = msgspec.structs.replace(Config().container, agent_image="example/agent:1")
    config, sources = with_default_agent_image(Config(container=chosen), {"container.agent_image": "flag"})
    assert (config.container.agent_image, sources["container.agent_image"]) == ("example/agent:1", "flag")
