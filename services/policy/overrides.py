"""Session overrides: a partial policy document that can only tighten the host policy.

Each field has one way of tightening (the lower maximum, the higher minimum, `and` of
permissions, `or` of requirements, the stricter mode, the common part of exact lists, the union
of deny lists). Allow-lists of patterns cannot be intersected in general, so the session's list is
kept beside the host's and both must allow (`narrowing`). A field that would loosen the policy is
refused: it is left out, and reported with its path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import msgspec

from baaaht.common.policy.document import (
    UNLIMITED,
    DocumentError,
    LoadedPolicy,
    PolicyDocument,
    Section,
    check_fields,
    decode,
    enc_hook,
    normalize,
)
from baaaht.schemas.policy import FieldError

MODE_STRICTNESS = {"disabled": 0, "permissive": 1, "strict": 2}


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy one decision is made under: the host's, tightened by a session's override."""

    document: PolicyDocument
    version: str
    # field path -> the session's own allow-list, which must allow as well as the host's.
    narrowing: Mapping[str, list] = field(default_factory=dict)

    def allow_lists(self, path: str) -> list[list]:
        section, key = path.split(".")
        host = getattr(getattr(self.document, section), key)
        return [host, self.narrowing[path]] if path in self.narrowing else [host]


# A combiner takes (host value, session value) and returns (merged value, whether the session's
# value was refused because it would loosen the host's).
Combiner = Callable[[Any, Any], tuple[Any, bool]]


def _limit(value: Any) -> float:
    return float("inf") if value == UNLIMITED else value


def _lower(host: Any, session: Any) -> tuple[Any, bool]:
    return (session, False) if _limit(session) <= _limit(host) else (host, True)


def _higher(host: Any, session: Any) -> tuple[Any, bool]:
    return (session, False) if session >= host else (host, True)


def _both(host: bool, session: bool) -> tuple[bool, bool]:
    return host and session, session and not host


def _either(host: bool, session: bool) -> tuple[bool, bool]:
    return host or session, host and not session


def _stricter_mode(host: str, session: str) -> tuple[str, bool]:
    if MODE_STRICTNESS[session] >= MODE_STRICTNESS[host]:
        return session, False
    return host, True


def _common(host: list | None, session: list | None) -> tuple[list | None, bool]:
    """Exact allow-lists (None: anything): keep what both allow."""
    if host is None:
        return session, False
    return [item for item in session if item in host], any(item not in host for item in session)


def _union(host: list, session: list) -> tuple[list, bool]:
    return host + [item for item in session if item not in host], False


def _fixed(host: Any, session: Any) -> tuple[Any, bool]:
    return host, session != host


NARROW = "narrow"  # kept beside the host's allow-list: see EffectivePolicy.narrowing

TIGHTENING: dict[str, Combiner | str] = {
    "id": _fixed,
    "name": _fixed,
    "description": _fixed,
    "labels": _fixed,
    "mode": _stricter_mode,
    "quotas.max_cpus": _lower,
    "quotas.min_cpus": _higher,
    "quotas.default_cpus": _lower,
    "quotas.max_memory": _lower,
    "quotas.min_memory": _higher,
    "quotas.default_memory": _lower,
    "quotas.max_memory_swap": _lower,
    "quotas.max_pids": _lower,
    "quotas.default_pids": _lower,
    "quotas.max_containers": _lower,
    "quotas.max_containers_per_session": _lower,
    "mounts.allow_bind": _both,
    "mounts.allowlist": NARROW,
    "mounts.blocked_patterns": _union,
    "mounts.allow_volumes": _both,
    "mounts.allowed_volumes": NARROW,
    "mounts.denied_volumes": _union,
    "mounts.allow_tmpfs": _both,
    "mounts.max_tmpfs_size": _lower,
    "images.allowed": NARROW,
    "images.denied": _union,
    "images.require_digest": _either,
    "images.allow_latest": _both,
    "network.allow_network": _both,
    "network.allow_host_network": _both,
    "network.allowed_networks": NARROW,
    "network.denied_networks": _union,
    "network.allow_ports": _both,
    "network.allow_public_ports": _both,
    "security.allow_privileged": _both,
    "security.allow_root": _both,
    "security.require_non_root": _either,
    "security.default_user": _fixed,
    "security.allow_root_group": _both,
    "security.allow_group_names": _both,
    "security.allowed_capabilities": _common,
    "security.drop_capabilities": _union,
    "security.allowed_uids": _common,
    "security.allowed_gids": _common,
    "security.require_no_new_privileges": _either,
    "security.require_read_only_rootfs": _either,
    "security.allow_security_opt": _both,
}


def given_paths(
    data: Mapping[str, Any], struct: type[msgspec.Struct] = PolicyDocument, prefix: str = ""
) -> list[str]:
    """The dotted paths of the fields a partial document actually sets (not null)."""
    paths = []
    for info in msgspec.structs.fields(struct):
        if info.encode_name not in data or data[info.encode_name] is None:
            continue
        path = prefix + info.encode_name
        if isinstance(info.type, type) and issubclass(info.type, Section):
            paths.extend(given_paths(data[info.encode_name], info.type, path + "."))
        else:
            paths.append(path)
    return paths


def _show(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=enc_hook).decode()


def _get(document: PolicyDocument, path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _set(document: PolicyDocument, path: str, value: Any) -> PolicyDocument:
    if "." not in path:
        return msgspec.structs.replace(document, **{path: value})
    section, key = path.split(".")
    return msgspec.structs.replace(
        document, **{section: msgspec.structs.replace(getattr(document, section), **{key: value})}
    )


def _settle(document: PolicyDocument) -> PolicyDocument:
    """Keep defaults under lowered maximums, and allowed capabilities out of dropped ones."""
    quotas = document.quotas
    quotas = msgspec.structs.replace(
        quotas,
        default_cpus=min(quotas.default_cpus, quotas.max_cpus),
        default_memory=min(quotas.default_memory, quotas.max_memory),
        default_pids=min(quotas.default_pids, quotas.max_pids),
    )
    security = document.security
    security = msgspec.structs.replace(
        security,
        allowed_capabilities=[
            c for c in security.allowed_capabilities if c not in security.drop_capabilities
        ],
    )
    return msgspec.structs.replace(document, quotas=quotas, security=security)


def tighten(policy: LoadedPolicy, override: Mapping[str, Any]) -> tuple[EffectivePolicy, list[FieldError]]:
    """The policy a session works under, and the override fields refused for loosening it.

    Raises DocumentError when the override itself is malformed (unknown key, wrong type)."""
    if not override:
        return EffectivePolicy(policy.document, policy.version), []
    session = decode(dict(override))
    errors = check_fields(session)
    if errors:
        raise DocumentError(errors)
    session = normalize(session)
    merged = policy.document
    narrowing: dict[str, list] = {}
    refused: list[FieldError] = []
    for path in given_paths(override):
        host_value, session_value = _get(policy.document, path), _get(session, path)
        combine = TIGHTENING[path]
        if combine == NARROW:
            narrowing[path] = session_value
            continue
        value, was_refused = combine(host_value, session_value)
        if was_refused:
            refused.append(
                FieldError(
                    path=path,
                    message=f"would loosen the host policy ({_show(host_value)} to {_show(session_value)}); "
                    "ignored",
                )
            )
        merged = _set(merged, path, value)
    digest = hashlib.sha256(msgspec.json.encode(override, order="sorted")).hexdigest()[:8]
    return EffectivePolicy(_settle(merged), f"{policy.version}+{digest}", narrowing), refused


def narrowing_data(policy: EffectivePolicy) -> dict[str, Any]:
    return msgspec.to_builtins(dict(policy.narrowing), enc_hook=enc_hook)
