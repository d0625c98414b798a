"""Where tokenized data and the demo assets are cached, and the file lock that serialises building an entry."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ..config import DataSection


def cache_root(cfg: DataSection) -> Path:
    root = cfg.cache_dir or os.environ.get("IA3_DIST_CACHE") or os.path.join(Path.home(), ".cache", "ia3-dist")
    return Path(root).expanduser()


LOCK_WAIT_NOTE_S = 300.0
"""How long :func:`file_lock` waits before it says what it waits for."""


@contextlib.contextmanager
def file_lock(path: Path, required: bool = True) -> Iterator[None]:
    """Exclusive lock shared by every process on the node (and on a shared filesystem that supports flock), so
    one rank builds a cache entry while the others wait on a file, never on a collective with a timeout.
    ``required=False``: where the lock cannot be taken (read-only dir, a filesystem without flock), go on
    without it; for callers whose correctness does not rest on it."""
    fh = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a link: in a cache dir others write too (a shared IA3_DIST_CACHE), a lock file planted as
        # a link would have this process create or open any file it may write.
        fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666),
                       "a+")
        # Said once a wait is long, so one that never ends (a holder stopped, not killed) names the file to look
        # at; a rank waiting its turn while another tokenizes says nothing.
        said = threading.Timer(LOCK_WAIT_NOTE_S, lambda: print(
            f"ia3-dist: still waiting for {path} after {LOCK_WAIT_NOTE_S:.0f} s (another process builds this entry; "
            f"if none does, see who holds it: fuser {path})", file=sys.stderr, flush=True))
        said.daemon = True
        said.start()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        finally:
            said.cancel()
    except OSError:
        if fh is not None:
            fh.close()
        if required:
            raise
        fh = None
    if fh is None:
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def publish_once(tmp: Path, dest: Path) -> None:
    """``tmp`` (a complete file) at ``dest`` unless another process put its own there first (same content: a pure
    function of the cache key). Linked, never renamed over: another rank may be reading ``dest`` (a rename over it
    changes the file it hashes, or on NFS makes its read fail with ESTALE). On a filesystem without hard links
    (gcsfuse, s3fs, some CIFS) a rename, as before. ``tmp`` is left for the caller to remove."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        pass
    except OSError:
        if not dest.exists():
            os.replace(tmp, dest)
