"""The policy service's decision log: the shared hash chain (common/audit_chain.py) of AuditRecords."""

from __future__ import annotations

from pathlib import Path

from baaaht.common import audit_chain
from baaaht.common.audit_chain import GENESIS, AuditError, check_seal, head_path, seal
from baaaht.schemas.policy import AuditRecord, AuditReport

__all__ = ["GENESIS", "AuditError", "AuditLog", "check_seal", "head_path", "seal"]


def log_path(data_dir: str | Path) -> Path:
    """Where the policy service keeps its audit log under the host's data directory."""
    return Path(data_dir) / "audit" / "policy.jsonl"


class AuditLog(audit_chain.AuditLog):
    def __init__(self, path: str | Path):
        super().__init__(path, verify_hint="baaaht-ctl audit verify")


def decode_line(line: bytes) -> AuditRecord:
    return audit_chain.decode_line(line, AuditRecord)


def unseal(line: bytes) -> AuditRecord:
    return audit_chain.unseal(line, AuditRecord)


def verify(path: str | Path) -> AuditReport:
    return audit_chain.verify(path, AuditRecord)


def read_tail(path: str | Path, count: int, since: int = 0) -> tuple[list[AuditRecord], int]:
    return audit_chain.read_tail(path, count, since, AuditRecord)


def read_after(path: str | Path, offset: int) -> tuple[list[AuditRecord], int]:
    return audit_chain.read_after(path, offset, AuditRecord)
