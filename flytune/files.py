"""Atomic file replacement: a kill at any moment leaves the old file or the new one.

Every file that flytune rewrites (checkpoints, models, logs cut back on resume, JSON
summaries, archives, output folders) goes through :func:`replacing`: the new content is
written to ``NAME.tmp`` beside the target, flushed to disk (``fsync``), renamed over the
target (``os.replace``, atomic on POSIX), and the directory entry is flushed too, so that
the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory entry, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            fsync_path(folder)
    else:
        fsync_path(path)


@contextmanager
def replacing(path: str | os.PathLike, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file or a folder);
    on success it is flushed and renamed over ``path`` (an existing folder is removed
    first), on an error it is deleted and ``path`` is left as it was.

    ``before_rename`` runs after the flush and before the rename (fault injection)::

        with replacing(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary))
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if before_rename is not None:
            before_rename()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
