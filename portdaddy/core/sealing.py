"""Note bodies sealed at rest: one random key per session, wrapped by the daemon's master key.

``master.key`` (32 random bytes, mode 0600 in the 0700 runtime dir) is created on first boot and never stored in
the database. Each session gets its own 32-byte key, stored only wrapped (``SecretBox(master)``) in its row; note
bodies are ``SecretBox(session key)`` ciphertexts (XSalsa20-Poly1305 with a random nonce, authenticated). So the
database file alone reveals no note text, and a tampered ciphertext fails to open instead of reading as garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.exceptions
import nacl.secret
import nacl.utils

KEY_SIZE = nacl.secret.SecretBox.KEY_SIZE


def load_or_create_master_key(path: Path) -> bytes:
    """Read the master key, creating it (0600, exclusively, so two daemons cannot race) if it is missing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_SIZE:
            raise RuntimeError(f"{path} holds {len(key)} bytes, not a {KEY_SIZE}-byte key; restore it from backup "
                               "(notes sealed with another key cannot be read)") from None
        return key
    key = nacl.utils.random(KEY_SIZE)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Sealer:
    """Wraps session keys and seals note bodies; unwrapped keys are cached for the daemon's life."""

    def __init__(self, master_key: bytes) -> None:
        self._master = nacl.secret.SecretBox(master_key)
        self._boxes: dict[str, nacl.secret.SecretBox] = {}

    def new_session_key(self, session_id: str) -> bytes:
        """A fresh key for ``session_id``; returns it wrapped, for the session's row."""
        key = nacl.utils.random(KEY_SIZE)
        self._boxes[session_id] = nacl.secret.SecretBox(key)
        return bytes(self._master.encrypt(key))

    def _box(self, session_id: str, wrapped: bytes) -> nacl.secret.SecretBox:
        box = self._boxes.get(session_id)
        if box is None:
            box = self._boxes[session_id] = nacl.secret.SecretBox(self._master.decrypt(wrapped))
        return box

    def seal(self, session_id: str, wrapped: bytes, text: str) -> bytes:
        return bytes(self._box(session_id, wrapped).encrypt(text.encode()))

    def open(self, session_id: str, wrapped: bytes, body: bytes) -> str | None:
        """The note text, or None if the body (or the key) was tampered with."""
        try:
            return self._box(session_id, wrapped).decrypt(body).decode()
        except (nacl.exceptions.CryptoError, UnicodeDecodeError):
            return None
