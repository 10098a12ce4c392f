"""Which code a process runs. The version says which release; after a ``git pull`` in a checkout (or an
upgrade that kept the version) it stays the same while the files change under a daemon that loaded the old
ones. The fingerprint covers the package's files as they are when it is taken, so ``pd status`` can tell a
daemon that runs other code than itself."""

from __future__ import annotations

import hashlib
from pathlib import Path


def fingerprint() -> str:
    """A short digest of the names, sizes and modification times of the package's source and migration files."""
    root = Path(__file__).parent
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.sql")]):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
