"""Credential manager messages (`credential.*`): secrets kept encrypted on the host, for the operator.

No response, event or error ever carries a secret's value: a value only travels inward, in the
`value` of `credential.put` and `credential.rotate` (whose reprs hide it). Times are seconds since
the epoch; 0 means never.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from baaaht.schemas.base import Empty, Event, Request, Response
from baaaht.schemas.ids import ID_PATTERN, ID_RULE, MAX_ID

CredentialKind = Literal["api_key", "bearer_token", "basic"]
KINDS: tuple[str, ...] = CredentialKind.__args__
MAX_VALUE = 64 * 1024  # bytes of one secret value
MAX_PAGE = 1000

CredentialName = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=MAX_ID, pattern=ID_PATTERN, description=f"A credential: {ID_RULE}."
    ),
]
SecretValue = Annotated[
    bytes,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_VALUE,
        description=f"The secret, 1-{MAX_VALUE} bytes; for `basic`, `user:password`. Never returned.",
    ),
]
ExpiresAt = Annotated[
    float, msgspec.Meta(ge=0, description="Unix time after which it is never handed out; 0: never.")
]
Grace = Annotated[float, msgspec.Meta(ge=0, description="Seconds the previous version is kept.")]
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE, description="Items per page.")]
Cursor = Annotated[int, msgspec.Meta(ge=0, description="0, or a next_cursor from an earlier page.")]
Description = Annotated[str, msgspec.Meta(max_length=1024)]


class CredentialVersion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One version of a secret. A retired one is kept until `erase_at`, then erased."""

    version: int
    created_at: float
    retired_at: float = 0.0  # 0: the current version
    erase_at: float = 0.0


class CredentialInfo(Response, kw_only=True):
    """A secret's metadata (never its value)."""

    id: str
    name: str
    kind: CredentialKind
    description: str = ""
    version: int  # the current version: the one handed out
    created_at: float
    rotated_at: float = 0.0
    expires_at: float = 0.0
    last_used_at: float = 0.0
    expired: bool = False
    versions: list[CredentialVersion] = []  # newest first


class CredentialPage(Response, kw_only=True):
    credentials: list[CredentialInfo]
    next_cursor: int = 0


class CredentialRotateMasterResult(Response, kw_only=True):
    rewrapped: int  # data keys wrapped again under the new master key
    source: Literal["key_file", "passphrase"]
    rotated_at: float


class _WithValue(Request, kw_only=True):
    """A request carrying a secret value: its repr never shows it."""

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f}=<hidden>" if f == "value" else f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__
        )
        return f"{type(self).__name__}({fields})"


class CredentialPut(_WithValue, tag="credential.put", kw_only=True):
    """Add a secret; ALREADY_EXISTS if the name is taken (`credential.rotate` changes its value)."""

    response: ClassVar[type] = CredentialInfo

    name: CredentialName
    kind: CredentialKind
    value: SecretValue
    description: Description = ""
    expires_at: ExpiresAt = 0.0


class CredentialList(Request, tag="credential.list", kw_only=True):
    """Metadata of every secret, by name."""

    response: ClassVar[type] = CredentialPage

    limit: PageLimit = 100
    cursor: Cursor = 0


class CredentialDescribe(Request, tag="credential.describe", kw_only=True):
    response: ClassVar[type] = CredentialInfo

    name: CredentialName


class CredentialRotate(_WithValue, tag="credential.rotate", kw_only=True):
    """A new version with a new value (and data key); the previous one is kept for `grace` seconds
    (default: credentials.grace_period), then erased."""

    response: ClassVar[type] = CredentialInfo

    name: CredentialName
    value: SecretValue
    expires_at: ExpiresAt | None = None  # None: the expiry stays as it is
    grace: Grace | None = None


class CredentialDelete(Request, tag="credential.delete", kw_only=True):
    """Erase a secret and every version of it."""

    response: ClassVar[type] = Empty

    name: CredentialName


class CredentialRotateMaster(Request, tag="credential.rotate_master", kw_only=True):
    """Wrap every data key under a new master key, in one transaction. With a key file: a new
    random key replaces the file; with a passphrase: the passphrase is read again (from its file:
    change the file first to change it) with a new salt."""

    response: ClassVar[type] = CredentialRotateMasterResult


class CredentialChanged(Event, tag="credential.changed", kw_only=True):
    """A secret was added, rotated (a new current version) or deleted."""

    id: str
    name: str
    change: Literal["added", "rotated", "deleted"]
    version: int = 0  # the current version after the change (0 once deleted)


class CredentialMasterRotated(Event, tag="credential.master_rotated", kw_only=True):
    rewrapped: int
    source: Literal["key_file", "passphrase"]


class CredentialExpired(Event, tag="credential.expired", kw_only=True):
    """Published once per expiry: the secret is no longer handed out."""

    id: str
    name: str
    expires_at: float
