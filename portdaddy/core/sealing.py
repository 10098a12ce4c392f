"""Note bodies sealed at rest: one random key per session, wrapped by the daemon's master key.

``master.key`` (32 random bytes, mode 0600 in the 0700 runtime dir) is created on first boot and never stored in
the database. Each session gets its own 32-byte key, stored only wrapped (``SecretBox(master)``) in its row; note
bodies are ``SecretBox(session key)`` ciphertexts (XSalsa20-Poly1305 with a random nonce, authenticated). So the
database file alone reveals no note text, and a tampered ciphertext fails to open instead of reading as garbage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nacl.secret import SecretBox

KEY_SIZE = 32  # SecretBox.KEY_SIZE: PyNaCl (libsodium, ~11 ms) loads with the first sealed note, not at start
# Unwrapped session keys kept, the most recently used: the cache held one for every session since the daemon
# started. Unwrapping one again costs microseconds.
MAX_CACHED_KEYS = 1024


def _secret_box(key: bytes) -> SecretBox:
    import nacl.secret

    return nacl.secret.SecretBox(key)


def load_or_create_master_key(path: Path) -> bytes:
    """Read the master key, creating it (0600, exclusively, so two daemons cannot race) if it is missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_SIZE:
            raise RuntimeError(
                f"{path} holds {len(key)} bytes, not a {KEY_SIZE}-byte key; restore it from backup "
                "(notes sealed with another key cannot be read)"
            ) from None
        return key
    key = os.urandom(KEY_SIZE)  # the kernel CSPRNG, as nacl.utils.random uses
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Sealer:
    """Wraps session keys and seals note bodies; the last MAX_CACHED_KEYS unwrapped keys used are cached."""

    def __init__(self, master_key: bytes) -> None:
        self._master_key = master_key
        self._master: SecretBox | None = None
        self._boxes: dict[str, SecretBox] = {}

    def _wrapping(self) -> SecretBox:
        if self._master is None:
            self._master = _secret_box(self._master_key)
        return self._master

    def new_session_key(self, session_id: str) -> bytes:
        """A fresh key for ``session_id``; returns it wrapped, for the session's row."""
        key = os.urandom(KEY_SIZE)
        self._keep(session_id, _secret_box(key))
        return bytes(self._wrapping().encrypt(key))

    def _box(self, session_id: str, wrapped: bytes) -> SecretBox:
        box = self._boxes.pop(session_id, None)
        if box is None:
            box = _secret_box(self._wrapping().decrypt(wrapped))
        self._keep(session_id, box)
        return box

    def _keep(self, session_id: str, box: SecretBox) -> None:
        self._boxes[session_id] = box  # (re-)inserted last: the dict's order is the order of use
        if len(self._boxes) > MAX_CACHED_KEYS:
            del self._boxes[next(iter(self._boxes))]

    def seal(self, session_id: str, wrapped: bytes, text: str) -> bytes:
        return bytes(self._box(session_id, wrapped).encrypt(text.encode()))

    def open(self, session_id: str, wrapped: bytes, body: bytes) -> str | None:
        """The note text, or None if the body (or the key) was tampered with."""
        from nacl.exceptions import CryptoError

        try:
            return self._box(session_id, wrapped).decrypt(body).decode()
        except (CryptoError, UnicodeDecodeError):
            return None
