"""Replace a file so that readers see the old or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory that is
    flushed, fsynced and then ``os.replace``d into place.

    A failure (a full disk, a kill before the replace) leaves the previous file intact,
    and no temp file behind unless the process itself dies mid-write.

    Raises:
        OSError: the directory cannot be written (the temp file is removed first).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> write_atomic(p, '{"v": 1}').read_text()
        '{"v": 1}'
        >>> sorted(x.name for x in p.parent.iterdir())
        ['run.json']
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
