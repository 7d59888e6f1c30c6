"""The policy document: its model, loading with field-path errors, and the built-in default policy.

A document is YAML or JSON. Like the host config (and unlike bus messages) it is refused when it
holds an unknown key, because an unknown key is a typo that would silently leave a rule at its
default. Every problem is reported with its dotted field path, e.g. `mounts.allowlist[2].path`.
"""

from __future__ import annotations

import hashlib
import os
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import yaml

from baaaht.common import units
from baaaht.common.policy.images import ImageError, parse_pattern
from baaaht.schemas.config import Config, Size
from baaaht.schemas.policy import FieldError

Mode = Literal["strict", "permissive", "disabled"]
Access = Literal["denied", "readonly", "readwrite"]
BUILTIN_SOURCE = "built-in"

# Always blocked as bind-mount path components, whatever a document says.
DEFAULT_BLOCKED_PATTERNS = (
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".gcloud",
    ".kube",
    ".docker",
    ".env",
    ".netrc",
    ".npmrc",
    "id_rsa",
    "id_ed25519",
    "credentials",
    "docker.sock",
)

CAPABILITIES = frozenset(
    """CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE
    NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT
    SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE
    AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ
    PERFMON BPF CHECKPOINT_RESTORE""".split()
)


def normalize_capability(name: str) -> str:
    """`cap_net_raw` and `NET_RAW` are the same capability."""
    name = name.strip().upper()
    return name[4:] if name.startswith("CAP_") else name


class SwapLimit(int):
    """Bytes of memory plus swap, written as a size; -1 (or `unlimited`) means no limit."""


UNLIMITED = SwapLimit(-1)
MAX_CPUS = 4096  # far above any host; keeps `.inf` and the like out of a policy
# What a container gets when neither the request nor the document says (bounded by the maximums).
HARDENED_CPUS = 1.0
HARDENED_PIDS = 256
NON_ROOT_USER = "1000:1000"
_NUMERIC_ID = re.compile(r"[0-9]+")
Cpus = Annotated[float, msgspec.Meta(gt=0, le=MAX_CPUS)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Id = Annotated[int, msgspec.Meta(ge=0)]


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A part of a policy document: unknown keys are refused."""


class Quotas(Section, kw_only=True):
    max_cpus: Cpus = 4.0
    min_cpus: Annotated[float, msgspec.Meta(ge=0, le=MAX_CPUS)] = 0.0
    default_cpus: Cpus | None = None  # None: HARDENED_CPUS, or max_cpus when lower
    max_memory: Size | None = None  # None: config `policy.max_memory`
    min_memory: Size = Size(6 * 1024 * 1024)  # the engine's own floor
    default_memory: Size | None = None  # None: max_memory
    max_memory_swap: SwapLimit | None = None  # None: max_memory, i.e. no swap
    max_pids: Positive = 1024
    default_pids: Positive | None = None  # None: HARDENED_PIDS, or max_pids when lower
    max_containers: Positive | None = None  # None: config `policy.max_containers`
    max_containers_per_session: Positive | None = None  # None: max_containers


class AllowEntry(Section, kw_only=True):
    """A host directory (and everything under it) that bind mounts may use. `*` matches within
    one path component. With `user` or `group` the entry applies to that principal only."""

    path: str
    mode: Access
    user: str = ""
    group: str = ""


class Mounts(Section, kw_only=True):
    allow_bind: bool = False
    allowlist: list[AllowEntry] = []
    # Added to DEFAULT_BLOCKED_PATTERNS, which always apply: a name is matched against every
    # component of the resolved source, an absolute path against the source and its parents.
    blocked_patterns: list[str] = []
    allow_volumes: bool = True
    allowed_volumes: list[str] = []  # a session mounts only its own volumes (container.volume_create)
    denied_volumes: list[str] = []
    allow_tmpfs: bool = True
    max_tmpfs_size: Size = Size(256 * 1024 * 1024)


class Images(Section, kw_only=True):
    allowed: list[str] = msgspec.field(default_factory=lambda: ["*"])
    denied: list[str] = []  # wins over `allowed`
    require_digest: bool = False
    allow_latest: bool = False  # `:latest`, and untagged references, which mean `:latest`


class Network(Section, kw_only=True):
    allow_network: bool = False
    allow_host_network: bool = False
    allowed_networks: list[str] = msgspec.field(default_factory=lambda: ["*"])
    denied_networks: list[str] = []
    allow_ports: bool = False
    allow_public_ports: bool = False  # published on an address other than loopback


class Security(Section, kw_only=True):
    allow_privileged: bool = False
    allow_root: bool = False
    # The user must be a numeric uid other than 0: a user name is resolved inside the image,
    # which may map it to uid 0.
    require_non_root: bool = True
    # What a container runs as when the request sets no user: numeric, so the image cannot remap it.
    default_user: str = NON_ROOT_USER
    # Group 0 (in `user` as `uid:0` or in `group_add`) opens whatever root's group may read or write.
    allow_root_group: bool = False
    # A group name in `group_add` or `user` is resolved inside the image, which may map it to gid 0.
    allow_group_names: bool = False
    allowed_capabilities: list[str] = []
    drop_capabilities: list[str] = msgspec.field(default_factory=lambda: ["ALL"])
    allowed_uids: list[Id] | None = None  # None: any uid
    allowed_gids: list[Id] | None = None  # None: any gid
    require_no_new_privileges: bool = True
    require_read_only_rootfs: bool = True
    # security_opt entries other than no-new-privileges (seccomp, apparmor, label, systempaths).
    allow_security_opt: bool = False


class PolicyDocument(Section, kw_only=True):
    id: str = "default"
    name: str = ""
    description: str = ""
    mode: Mode = "strict"
    labels: dict[str, str] = {}
    quotas: Quotas = msgspec.field(default_factory=Quotas)
    mounts: Mounts = msgspec.field(default_factory=Mounts)
    images: Images = msgspec.field(default_factory=Images)
    network: Network = msgspec.field(default_factory=Network)
    security: Security = msgspec.field(default_factory=Security)


class DocumentError(ValueError):
    """Every problem found in a policy document, each with its field path."""

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(f"{error.path}: {error.message}" for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class HostDefaults:
    """What the host config contributes to a document's quotas."""

    max_memory: int
    max_containers: int

    @classmethod
    def for_config(cls, config: Config) -> "HostDefaults":
        return cls(max_memory=int(config.policy.max_memory), max_containers=config.policy.max_containers)


# --- text --------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice, instead of keeping the last one quietly."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_text(text: str) -> dict[str, Any]:
    """A document's data from YAML or JSON text (JSON is read as YAML, which contains it)."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise DocumentError([FieldError(path="", message=f"not valid YAML or JSON: {error}")]) from None
    if data is None:
        raise DocumentError([FieldError(path="", message="the document is empty (expected a mapping)")])
    if not isinstance(data, dict):
        raise DocumentError(
            [FieldError(path="", message=f"expected a mapping at the top, got {type(data).__name__}")]
        )
    return data


# --- decoding ----------------------------------------------------------------------------------

_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _parse_swap_limit(value: object) -> SwapLimit:
    if value == -1 or value == "unlimited":
        return UNLIMITED
    return SwapLimit(units.parse_size(value))


def dec_hook(type_: type, value: object) -> object:
    if type_ is SwapLimit:
        return _parse_swap_limit(value)
    return units.dec_hook(type_, value)


def enc_hook(value: object) -> object:
    if isinstance(value, SwapLimit):
        return "unlimited" if value == UNLIMITED else units.render_size(value)
    return units.enc_hook(value)


def _field_type(path: str) -> Any:
    """The declared type at a dotted path such as `mounts.allowlist[0].mode`."""
    type_: Any = PolicyDocument
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        fields = {info.encode_name: info.type for info in msgspec.structs.fields(type_)}
        type_ = fields[part]
        while typing.get_origin(type_) is list:
            (type_,) = typing.get_args(type_)
    return type_


def field_error(error: msgspec.ValidationError) -> FieldError:
    """msgspec's `Expected ... - at `$.a.b`` as (`a.b`, `expected ...`)."""
    match = _AT.match(str(error))
    message, path = match.group("message"), (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN.match(message)
    if unknown:
        path = f"{path}.{unknown.group('field')}" if path else unknown.group("field")
        message = "unknown field"
    elif message.startswith("Invalid enum value"):
        choices = typing.get_args(_field_type(path))
        message += f" (expected one of {', '.join(choices)})"
    return FieldError(path=path, message=message.replace("`", ""))


def decode(data: Any) -> PolicyDocument:
    """The document as written (defaults not yet resolved); raises DocumentError."""
    if not isinstance(data, dict):
        raise DocumentError([FieldError(path="", message=f"expected a mapping, got {type(data).__name__}")])
    try:
        return msgspec.convert(data, PolicyDocument, dec_hook=dec_hook)
    except msgspec.ValidationError as error:
        raise DocumentError(_each_bad_field(data) or [field_error(error)]) from None


def _each_bad_field(data: dict[str, Any]) -> list[FieldError]:
    """msgspec stops at the first bad field: decode each field alone (every other one at its default,
    as every field has one) so that a check reports all of them at once."""
    errors = []
    for key, value in data.items():
        alone = [{key: {sub: item}} for sub, item in value.items()] if isinstance(value, dict) else []
        for part in alone or [{key: value}]:
            try:
                msgspec.convert(part, PolicyDocument, dec_hook=dec_hook)
            except msgspec.ValidationError as error:
                errors.append(field_error(error))
    return errors


# --- checks ------------------------------------------------------------------------------------


def is_clean_absolute(path: str) -> bool:
    """Absolute, with no `..`, `.`, doubled or trailing slash: written the one way it is compared."""
    return path.startswith("/") and not path.startswith("//") and os.path.normpath(path) == path


def check_fields(document: PolicyDocument) -> list[FieldError]:
    """Problems that one field shows on its own (used for documents and session overrides alike)."""
    errors: list[FieldError] = []

    def problem(path: str, message: str) -> None:
        errors.append(FieldError(path=path, message=message))

    if document.mounts.max_tmpfs_size == 0:
        # A tmpfs without a size limit may fill the host's memory: 0 cannot mean "no limit" here.
        problem("mounts.max_tmpfs_size", "must be above zero (allow_tmpfs: false forbids tmpfs mounts)")
    for index, entry in enumerate(document.mounts.allowlist):
        path = f"mounts.allowlist[{index}]"
        if not is_clean_absolute(entry.path):
            problem(f"{path}.path", f"{entry.path!r} is not a clean absolute path (no .., no trailing /)")
        if entry.user and entry.group:
            problem(path, "sets both user and group (an entry is for one user, one group, or everyone)")
    for index, pattern in enumerate(document.mounts.blocked_patterns):
        if not pattern.strip():
            problem(f"mounts.blocked_patterns[{index}]", "is empty")
        elif "/" in pattern and not is_clean_absolute(pattern):
            problem(f"mounts.blocked_patterns[{index}]", f"{pattern!r}: a path must be clean and absolute")
    for key in ("allowed", "denied"):
        for index, pattern in enumerate(getattr(document.images, key)):
            try:
                parse_pattern(pattern)
            except ImageError as error:
                problem(f"images.{key}[{index}]", str(error))
    for section, key in (
        ("mounts", "allowed_volumes"),
        ("mounts", "denied_volumes"),
        ("network", "allowed_networks"),
        ("network", "denied_networks"),
    ):
        for index, pattern in enumerate(getattr(getattr(document, section), key)):
            if not pattern.strip():
                problem(f"{section}.{key}[{index}]", "is empty")
    for key in ("allowed_capabilities", "drop_capabilities"):
        for index, name in enumerate(getattr(document.security, key)):
            capability = normalize_capability(name)
            if capability == "ALL" and key == "drop_capabilities":
                continue
            if capability not in CAPABILITIES:
                hint = " (list capabilities one by one)" if capability == "ALL" else ""
                problem(f"security.{key}[{index}]", f"{name!r} is not a Linux capability{hint}")
    return errors


def check_consistency(document: PolicyDocument) -> list[FieldError]:
    """Problems between fields of a complete, resolved document."""
    errors: list[FieldError] = []
    quotas = document.quotas
    for kind, low, default, high in (
        ("cpus", quotas.min_cpus, quotas.default_cpus, quotas.max_cpus),
        ("memory", quotas.min_memory, quotas.default_memory, quotas.max_memory),
        ("pids", 1, quotas.default_pids, quotas.max_pids),
    ):
        if not low <= default <= high:
            errors.append(
                FieldError(
                    path=f"quotas.default_{kind}",
                    message=f"{default} is not between the minimum {low} and the maximum {high}",
                )
            )
    if quotas.max_memory_swap != UNLIMITED and quotas.max_memory_swap < quotas.max_memory:
        errors.append(
            FieldError(
                path="quotas.max_memory_swap",
                message="is below max_memory (it counts memory plus swap; write `unlimited` for no limit)",
            )
        )
    security = document.security
    errors += _default_user_errors(security)
    if security.allow_root and security.require_non_root:
        errors.append(
            FieldError(
                path="security.allow_root", message="contradicts require_non_root: true (set one of them)"
            )
        )
    dropped = set(security.drop_capabilities) - {"ALL"}
    for index, capability in enumerate(security.allowed_capabilities):
        if capability in dropped:
            errors.append(
                FieldError(
                    path=f"security.allowed_capabilities[{index}]",
                    message=f"{capability} is also in drop_capabilities",
                )
            )
    return errors


def is_numeric_id(text: str) -> bool:
    return bool(_NUMERIC_ID.fullmatch(text))


def _default_user_errors(security: Security) -> list[FieldError]:
    """The default user must be one the document's own rules allow: a default always passes."""
    uid, _, gid = security.default_user.partition(":")
    if not is_numeric_id(uid) or (gid and not is_numeric_id(gid)):
        problem = "must be a numeric uid or uid:gid (a name is resolved inside the image)"
    elif int(uid) == 0 and (security.require_non_root or not security.allow_root):
        problem = "is root, which this policy refuses"
    elif security.allowed_uids is not None and int(uid) not in security.allowed_uids:
        problem = f"uid {uid} is not among security.allowed_uids"
    elif gid and int(gid) == 0 and not security.allow_root_group:
        problem = "has group 0, which this policy refuses (security.allow_root_group)"
    elif security.allowed_gids is not None and (not gid or int(gid) not in security.allowed_gids):
        problem = "needs a gid among security.allowed_gids"
    else:
        return []
    return [FieldError(path="security.default_user", message=f"{security.default_user!r} {problem}")]


# --- resolving and loading ---------------------------------------------------------------------


def normalize(document: PolicyDocument) -> PolicyDocument:
    """Capabilities written one way, so that rules compare them directly."""
    security = msgspec.structs.replace(
        document.security,
        allowed_capabilities=sorted(
            {normalize_capability(c) for c in document.security.allowed_capabilities}
        ),
        drop_capabilities=sorted({normalize_capability(c) for c in document.security.drop_capabilities}),
    )
    return msgspec.structs.replace(document, security=security)


def resolve(document: PolicyDocument, defaults: HostDefaults) -> PolicyDocument:
    """Fill the quotas a document left to the host config; clamp defaults under their maximums."""
    quotas = document.quotas
    max_memory = Size(quotas.max_memory if quotas.max_memory is not None else defaults.max_memory)
    max_containers = quotas.max_containers if quotas.max_containers is not None else defaults.max_containers
    resolved = msgspec.structs.replace(
        quotas,
        max_memory=max_memory,
        default_memory=Size(quotas.default_memory if quotas.default_memory is not None else max_memory),
        max_memory_swap=quotas.max_memory_swap
        if quotas.max_memory_swap is not None
        else SwapLimit(max_memory),
        default_cpus=quotas.default_cpus
        if quotas.default_cpus is not None
        else min(HARDENED_CPUS, quotas.max_cpus),
        default_pids=quotas.default_pids
        if quotas.default_pids is not None
        else min(HARDENED_PIDS, quotas.max_pids),
        max_containers=max_containers,
        max_containers_per_session=(
            quotas.max_containers_per_session
            if quotas.max_containers_per_session is not None
            else max_containers
        ),
    )
    return normalize(msgspec.structs.replace(document, quotas=resolved))


def load(data: Any, defaults: HostDefaults) -> PolicyDocument:
    """A complete, checked document from parsed data; raises DocumentError listing every problem."""
    document = decode(data)
    errors = check_fields(document)
    if errors:
        raise DocumentError(errors)
    document = resolve(document, defaults)
    errors = check_consistency(document)
    if errors:
        raise DocumentError(errors)
    return document


def builtin(defaults: HostDefaults) -> PolicyDocument:
    """The policy in force when no policy file exists: strict, default-deny."""
    return load({"id": "builtin", "name": "Built-in default policy (strict, default-deny)"}, defaults)


def to_data(document: PolicyDocument) -> dict[str, Any]:
    """The document as JSON-able data, sizes written the way people write them."""
    return msgspec.to_builtins(document, enc_hook=enc_hook)


_canonical = msgspec.json.Encoder(enc_hook=enc_hook, order="sorted")


def version_of(document: PolicyDocument) -> str:
    """A short hash of the resolved document: equal policies have equal versions."""
    return hashlib.sha256(_canonical.encode(document)).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedPolicy:
    """A policy in force. Immutable: a reload builds a new one and swaps the reference."""

    document: PolicyDocument
    version: str
    source: str  # the file's path, or BUILTIN_SOURCE
    loaded_at: float

    @classmethod
    def of(cls, document: PolicyDocument, source: str, loaded_at: float) -> "LoadedPolicy":
        return cls(document, version_of(document), source, loaded_at)


GLOB_CHARS = frozenset("*?[")


def allowlist_symlink_warnings(entries: list[AllowEntry]) -> list[FieldError]:
    """Allowlist paths that are symlinks never match: sources are compared after resolving."""
    warnings = []
    for index, entry in enumerate(entries):
        resolved = os.path.realpath(entry.path)
        if resolved != entry.path and not GLOB_CHARS & set(entry.path):
            warnings.append(
                FieldError(
                    path=f"mounts.allowlist[{index}].path",
                    message=f"resolves to {resolved}; sources are judged resolved, so write {resolved}",
                )
            )
    return warnings
