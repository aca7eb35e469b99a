"""Files written whole or not at all, JSON read with one-line errors, and the cache folder.

The leaf every writer builds on: a write goes to a temporary name in the same folder, is
flushed to disk and renamed into place, so a crash or a full disk leaves the old file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .errors import FractalError


def cache_dir() -> Path:
    """Where encoded corpora and trained tokenizers are cached (``FRACTALFORMER_CACHE``)."""
    return Path(os.environ.get("FRACTALFORMER_CACHE", Path.home() / ".cache" / "fractalformer"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path | str) -> None:
    """Flush a file's (or a folder's entries') data to disk: a rename is durable only then."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it); some file systems cannot, which only costs
    durability across a power cut there."""
    with contextlib.suppress(OSError):
        fsync(path)


class WriteError(FractalError):
    """A write that failed (a full disk, a quota, a read-only file system), as one line."""

    def __init__(self, what: str | Path, why: str) -> None:
        super().__init__(f"cannot write {what} ({why})")
        self.why = why


def write_error(path: Path, e: BaseException) -> WriteError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or repr(e)).splitlines()[0]
    return WriteError(path, why)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename the temporary file onto ``path``.

    The temporary file is created 0600; the result gets the mode a plain ``open`` would
    (0666 less the umask), so run folders can be shared like any other file. A failed write
    (a full disk) removes the temporary file and leaves ``path`` as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        fsync(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FractalError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FractalError(f"{path} is not valid JSON ({e})") from None
