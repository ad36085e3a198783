"""Files that hold secrets or state: written whole or not at all, private when they must be."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_FILE, PUBLIC_FILE, PRIVATE_DIR = 0o600, 0o644, 0o700


def atomic_write(path: Path, data: bytes, private: bool, overwrite: bool = True) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, flush it to disk, then rename.

    A crash leaves either the old file or the new one, never a truncated key. Private files are
    created with mode 0600 from the start (no moment where others could read them). With
    ``overwrite=False`` an existing ``path`` is an error (``FileExistsError``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, PRIVATE_FILE if private else PUBLIC_FILE)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, atomically
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def private_dir(path: Path, what: str) -> Path:
    """Create ``path`` (mode 0700) or check an existing one: ours, a folder, writable.

    Raises ``ValueError`` naming ``what`` (e.g. "--state-dir") with what to do.
    """
    path = path.expanduser()
    try:  # every folder it makes is private, not only the last (mkdir's parents follow umask)
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be created ({exc.strerror or exc}); choose a "
                         "folder this user can write") from exc
    if not path.is_dir():
        raise ValueError(f"{what} {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} is not writable by this user; fix its permissions "
                         "or choose another folder")
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:  # what it keeps is for this user alone
        if info.st_uid != os.getuid():
            raise ValueError(f"{what} {path} is readable by others and belongs to another "
                             "user; choose a folder of this user's own")
        os.chmod(path, PRIVATE_DIR)
    return path
