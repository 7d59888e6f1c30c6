"""Envelope encryption of one secret version, AES-256-GCM throughout.

A version's value is sealed under its own random data key; the data key is sealed (wrapped) under
the master key. Both carry associated data binding the secret's id, name and version (and what the
blob is), so a blob copied to another row, another version or the other column does not open.
A sealed blob is `nonce (12 bytes) || ciphertext || tag (16 bytes)`; nonces are random, and each
key seals few blobs (a data key one, the master key one per version), far from GCM's limits.
"""

from __future__ import annotations

import os

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
VALUE = b"value"
DATA_KEY = b"data-key"
MASTER_CHECK = b"master-check"

_encode = msgspec.msgpack.Encoder().encode


class Undecryptable(Exception):
    """A blob did not open: the wrong key, or it was changed or moved."""


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def associated_data(purpose: bytes, secret_id: str, name: str, version: int) -> bytes:
    """Unambiguous (msgpack of a list), so no two different rows can share their associated data."""
    return _encode([b"baaaht-credential", purpose, secret_id, name, version])


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise Undecryptable("the blob is too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise Undecryptable("authentication failed") from None


def seal_version(master: bytes, secret_id: str, name: str, version: int, value: bytes) -> tuple[bytes, bytes]:
    """(wrapped data key, sealed value) of a new version under a new data key."""
    data_key = new_key()
    sealed = seal(data_key, value, associated_data(VALUE, secret_id, name, version))
    return wrap(master, data_key, secret_id, name, version), sealed


def wrap(master: bytes, data_key: bytes, secret_id: str, name: str, version: int) -> bytes:
    return seal(master, data_key, associated_data(DATA_KEY, secret_id, name, version))


def unwrap(master: bytes, wrapped: bytes, secret_id: str, name: str, version: int) -> bytes:
    return open_sealed(master, wrapped, associated_data(DATA_KEY, secret_id, name, version))


def open_version(
    master: bytes, secret_id: str, name: str, version: int, wrapped: bytes, sealed: bytes
) -> bytes:
    data_key = unwrap(master, wrapped, secret_id, name, version)
    return open_sealed(data_key, sealed, associated_data(VALUE, secret_id, name, version))


def master_check(master: bytes) -> bytes:
    """A blob only this master key opens: tells at start which key the store is wrapped under."""
    return seal(master, b"", associated_data(MASTER_CHECK, "", "", 0))


def opens_check(master: bytes, check: bytes) -> bool:
    try:
        open_sealed(master, check, associated_data(MASTER_CHECK, "", "", 0))
    except Undecryptable:
        return False
    return True
