"""A refusal: what the proxy answers instead of forwarding, as a JSON body naming what was refused."""

from __future__ import annotations

import msgspec

from baaaht.schemas.egress import EgressErrorBody, EgressErrorDetail


class Refused(Exception):
    """Raised anywhere before (or instead of) forwarding; nothing of the call reached the upstream."""

    def __init__(self, status: int, refused: str, message: str):
        super().__init__(message)
        self.status = status
        self.refused = refused  # route, role, session, method, path, identity, credential, budget, size, ...
        self.message = message

    def body(self) -> bytes:
        return _encode(EgressErrorBody(error=EgressErrorDetail(refused=self.refused, message=self.message)))


_encode = msgspec.json.Encoder().encode
