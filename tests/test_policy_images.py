"""Image references and patterns, parsed the way the engine reads them (registry ports included)."""

from __future__ import annotations

import pytest

from baaaht.common.policy.images import ImageError, parse_pattern, parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text, registry, path, tag, digest",
    [
        ("python", "docker.io", "library/python", "", ""),
        ("python:3.12", "docker.io", "library/python", "3.12", ""),
        ("myorg/app:1", "docker.io", "myorg/app", "1", ""),
        ("docker.io/python", "docker.io", "library/python", "", ""),
        ("index.docker.io/library/python:3", "docker.io", "library/python", "3", ""),
        ("ghcr.io/org/team/app:v2", "ghcr.io", "org/team/app", "v2", ""),
        ("localhost/app", "localhost", "app", "", ""),
        ("localhost:5000/app", "localhost:5000", "app", "", ""),
        ("registry:5000/ns/img:tag", "registry:5000", "ns/img", "tag", ""),
        (f"registry:5000/ns/img:tag@{DIGEST}", "registry:5000", "ns/img", "tag", DIGEST),
        (f"registry:5000/ns/img@{DIGEST}", "registry:5000", "ns/img", "", DIGEST),
        ("10.0.0.1:5000/img:1", "10.0.0.1:5000", "img", "1", ""),
        ("localhost:5000", "docker.io", "library/localhost", "5000", ""),  # as the engine reads it
    ],
)
def test_references_parse_like_the_engine(text, registry, path, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.path, ref.tag, ref.digest) == (registry, path, tag, digest)


@pytest.mark.parametrize(
    "text, pulls_latest",
    [
        ("python", True),
        ("python:latest", True),
        ("localhost:5000/img", True),  # the port is not a tag
        ("registry:5000/ns/img", True),
        ("registry:5000/ns/img:1.0", False),
        (f"python@{DIGEST}", False),
        (f"python:latest@{DIGEST}", True),
    ],
)
def test_untagged_references_mean_latest(text, pulls_latest):
    assert parse_reference(text).pulls_latest is pulls_latest


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        (" python", "spaces"),
        ("Python", "invalid name component"),
        ("img:bad tag", "invalid tag"),
        ("img@sha256:short", "invalid digest"),
        ("-bad-/img", "invalid name component"),
        ("ghcr.io//img", "invalid name component"),
        ("a..b.io:x/img", "invalid registry"),
    ],
)
def test_bad_references_are_refused_with_the_reason(text, problem):
    with pytest.raises(ImageError, match=problem):
        parse_reference(text)


@pytest.mark.parametrize(
    "pattern, reference, matches",
    [
        ("*", "python", True),
        ("*", "registry:5000/ns/img:1", True),
        ("python", "python:3.12", True),
        ("python", "docker.io/library/python", True),
        ("python", "evil.io/library/python", False),
        ("python:3.*", "python:3.12", True),
        ("python:3.*", "python:2.7", False),
        ("python:latest", "python", True),  # untagged is :latest
        ("ghcr.io/org/*", "ghcr.io/org/team/app:1", True),
        ("ghcr.io/org/*", "ghcr.io/other/app:1", False),
        ("docker.io/*", "myorg/app:1", True),
        ("docker.io/*", "ghcr.io/myorg/app:1", False),
        ("myorg/*", "myorg/app:1", True),
        ("registry:5000/*", "registry:5000/ns/img:1", True),
        ("registry:5000/*", "registry:5001/ns/img:1", False),
        ("*/ns/img", "registry:5000/ns/img:2", True),
        (f"python@{DIGEST}", f"python@{DIGEST}", True),
        (f"python@{DIGEST}", "python:3", False),
    ],
)
def test_patterns_match_qualified_names(pattern, reference, matches):
    assert parse_pattern(pattern).matches(parse_reference(reference)) is matches


@pytest.mark.parametrize("pattern", ["", "py thon", "img@sha256:zz", ":tag"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ImageError):
        parse_pattern(pattern)
