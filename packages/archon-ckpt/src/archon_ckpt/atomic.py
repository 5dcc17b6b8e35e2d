"""Crash-safe directory and file publication.

A reader must never see a half-written checkpoint. Everything is first written under a temporary
name in the *same parent directory* (so the final ``os.rename`` stays on one filesystem and is
atomic), flushed with ``fsync``, and only then renamed into place. A crash at any point leaves
either the old content or the new content, plus at worst a stale ``.tmp`` entry that the next
writer removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write_text", "fsync_dir", "fsync_tree", "TMP_MARKER", "user_file_mode"]

#: Substring present in every temporary entry we create; used to recognise stale leftovers.
TMP_MARKER = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames/creations of its entries are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and directory under ``root`` (files first, then their dirs)."""
    for dirpath, _dirnames, filenames in os.walk(os.fspath(root), topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def user_file_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would (0644 under umask 022): safetensors and
    temporary files are created 0600, which would hide exported weights from other users of the machine."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def tmp_sibling(final: str | os.PathLike, tag: str | None = None) -> Path:
    """A hidden temporary path next to ``final``: ``.<name>.tmp-<tag>`` (``tag`` random if None)."""
    final = Path(final)
    return final.parent / f".{final.name}{TMP_MARKER}{tag or uuid.uuid4().hex[:12]}"


def publish_directory(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """fsync ``tmp_dir`` and rename it to ``final_dir``, replacing an existing ``final_dir``.

    Replacing an existing directory takes two renames (old aside, new in); a crash between them
    leaves ``final_dir`` absent and the old content under ``.<name>.old-*`` in the same parent.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_tree(tmp_dir)
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final_dir``; publish it on success.

    On normal exit every file is fsynced and the directory is renamed to ``final_dir`` (an existing
    ``final_dir`` is replaced). On an exception the temporary directory is removed and
    ``final_dir`` is left untouched. The parent directory is created if needed.

    >>> with atomic_directory("out/model") as tmp:   # doctest: +SKIP
    ...     (tmp / "config.json").write_text("{}")
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final_dir)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, final_dir)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``)."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        user_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
