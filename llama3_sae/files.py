"""File helpers every stage uses: hashing (once per file version), the umask's mode."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: str | Path, *, fsync: bool = False, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (``fsync``: also flush it to disk while it is open)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


class HashIndex:
    """sha256 of files remembered on disk by (size, modification time), so a large file is read to hash it
    once per version, not at every start. A read-only or damaged index only costs hashing again."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def sha256(self, file: str | Path, key: str | None = None) -> str:
        """The file's sha256 (``key``: its name in the index; default the resolved path)."""
        file = Path(file)
        key = key or str(file.resolve())
        st = file.stat()
        known = self.entries.get(key)
        if isinstance(known, list) and len(known) == 3 and known[:2] == [st.st_size, st.st_mtime_ns]:
            return str(known[2])
        digest = sha256_file(file)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
            os.replace(tmp, self.path)
            self.changed = False
        except OSError:
            tmp.unlink(missing_ok=True)


def umask_mode(base: int = 0o666) -> int:
    """``base`` under the process's umask: the mode ``open()`` would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask
