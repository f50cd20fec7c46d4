"""File helpers every stage uses: atomic writes (a killed job never leaves half a file), hashing (once
per file version), the umask's mode."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import naming


# --------------------------------------------------------------------------- atomic writes
def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; best effort where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(dest: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write; on success it is flushed (``fsync``), renamed over ``dest``
    and the rename flushed; on any failure it is removed and ``dest`` is untouched. An OSError names ``dest``.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with naming(dest):
            yield tmp
            if fsync:
                _fsync_file(tmp)
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no stray temporary file
        raise
    if fsync:
        fsync_dir(dest.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n", fsync=fsync)


# --------------------------------------------------------------------------- hashing


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.entries, fsync=False)  # a lost index only costs hashing again
            self.changed = False
        except OSError:
            pass


def umask_mode(base: int = 0o666) -> int:
    """``base`` under the process's umask: the mode ``open()`` would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask
