"""Reading and writing files that may come from elsewhere, without following them anywhere.

Checkpoints, adapters, run and sweep dirs are untrusted (README: Security). A FIFO with no writer in place of a
file hangs a plain ``open()``, ``/dev/zero`` never ends a read, a device may act when opened, and a symlink in a
dir from elsewhere can lead to any file of the reader's, or make a write land there. So every read here checks
that the file is regular before and after opening it (``O_NONBLOCK``: a FIFO swapped in between cannot block the
open), and every write goes to a new file renamed into place, never through a link. No torch here: the tools that
read run dirs (``summary``, ``plot``) stay light.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..config.schema import brief
from ..errors import UsageError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink"))


def kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (for the messages)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _tail(fix: str) -> str:
    return f"; {fix}" if fix else ""


def open_regular(path: Path, fix: str = "", label: str = "", follow: bool = False,
                 missing_ok: bool = False) -> IO[bytes] | None:
    """``path`` open for reading if it is a regular file, else a UsageError ``<label><path>: <kind>, not a regular
    file; <fix>``. ``follow``: a symlink is followed (the hub cache links its files); otherwise it is refused, as
    for the files of a checkpoint or run dir, which ia3-dist never writes as links. ``missing_ok``: a missing
    file is None instead of an error."""
    name = f"{label}{brief(str(path))}"
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        what = "a dangling symlink" if follow and os.path.islink(path) else "missing"
        raise UsageError(f"{name}: {what}{_tail(fix)}") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read it ({e.strerror or e}){_tail(fix)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{name}: {kind(st.st_mode)}, not a regular file{_tail(fix)}")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UsageError(f"{name}: missing{_tail(fix)}") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read it ({e.strerror or e}){_tail(fix)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UsageError(f"{name}: {kind(mode)}, not a regular file{_tail(fix)}")
    return os.fdopen(fd, "rb")


MAX_DIR_ENTRIES = 10_000
"""A model, adapter or tokenizer dir holds a few dozen files."""


def check_dir_files(d: Path, what: str) -> None:
    """Every entry of ``d`` (not recursive) is a regular file or a dir, symlinks followed (the hub cache links its
    files): a FIFO, socket or device named like a tokenizer or config file would hang or never end the library
    loader that opens it, and a dangling link fails there with a traceback. UsageError naming the entry."""
    try:
        with os.scandir(d) as it:
            for n, entry in enumerate(it):
                if n >= MAX_DIR_ENTRIES:
                    raise UsageError(f"{what} {brief(str(d))}: more than {MAX_DIR_ENTRIES} entries, which no model or "
                                     f"adapter dir has")
                try:
                    mode = os.stat(entry.path).st_mode
                except FileNotFoundError:
                    raise UsageError(f"{what} {brief(entry.path)}: a dangling symlink; remove it or copy the file "
                                     f"again") from None
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise UsageError(f"{what} {brief(entry.path)}: {kind(mode)}, not a regular file; remove it or "
                                     f"copy the file again")
    except OSError as e:
        raise UsageError(f"{what} {brief(str(d))}: cannot list it ({e.strerror or e})") from None


HUB_REPO_KINDS = ("models--", "datasets--", "spaces--")
"""How the hub cache names a repo's dir (``models--org--name``), whose ``blobs/`` its snapshots link into."""


def check_links_inside(d: Path, what: str) -> None:
    """Every symlink under ``d`` (files and dirs, at any depth) leads inside ``d`` or to a blob of the hub cache
    (``<kind>--<repo>/blobs/``: a snapshot's files link there, as an older ``huggingface-cli download --local-dir``
    linked big files): a dir from elsewhere (an adapter someone shared) holding ``chat_template.jinja ->
    ~/.ssh/id_rsa`` would otherwise read any file of the user's into prompts and into an export they publish.
    UsageError naming the link."""
    root = Path(os.path.realpath(d))
    seen = 0
    try:
        for top, dirs, files in os.walk(d, followlinks=False):
            for name in dirs + files:
                seen += 1
                if seen > MAX_DIR_ENTRIES:
                    raise UsageError(f"{what} {brief(str(d))}: more than {MAX_DIR_ENTRIES} entries, which no model "
                                     f"or adapter dir has")
                p = os.path.join(top, name)
                if not os.path.islink(p):
                    continue
                target = Path(os.path.realpath(p))
                # A hub cache's blob (a snapshot at any depth of its repo links there): a downloaded file, not one
                # of the user's own.
                blob = target.parent.name == "blobs" and target.parent.parent.name.startswith(HUB_REPO_KINDS)
                if not blob and target != root and root not in target.parents:
                    raise UsageError(f"{what} {brief(p)}: a symlink to {brief(str(target))}, outside the dir; a dir "
                                     f"from elsewhere must not read files of yours into prompts or an export: copy "
                                     f"the file in (cp -L) if it is yours")
    except OSError as e:
        raise UsageError(f"{what} {brief(str(d))}: cannot list it ({e.strerror or e})") from None


def read_bounded(path: Path, limit: int, fix: str = "", label: str = "", follow: bool = False,
                 missing_ok: bool = False) -> bytes | None:
    """The bytes of a small regular file (see :func:`open_regular`); a UsageError if it holds more than
    ``limit``, None if it is missing and ``missing_ok``."""
    fh = open_regular(path, fix, label, follow, missing_ok)
    if fh is None:
        return None
    name = f"{label}{brief(str(path))}"
    with fh:
        try:
            data = fh.read(limit + 1)
        except OSError as e:
            raise UsageError(f"{name}: cannot read it ({e.strerror or e}){_tail(fix)}") from None
    if len(data) > limit:
        raise UsageError(f"{name}: larger than {limit} bytes, which this file never is{_tail(fix)}")
    return data


def temp_beside(path: Path) -> Path:
    """A fresh hidden temp name in ``path``'s dir, for a file that is renamed over ``path`` once written."""
    return path.parent / f".{path.name[:100]}.{secrets.token_hex(6)}.tmp"


def create_new(path: Path, mode: int = 0o666) -> int:
    """A write fd of a file created at ``path`` (``mode`` less the umask): never an existing entry (OSError
    FileExistsError) nor through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_file(path: Path, fill: Callable[[IO[bytes]], object], what: str = "", overwrite: bool = True,
               mode: int = 0o666, chmod: int | None = None, fix: str = "give another path") -> Path:
    """Write ``path`` through ``fill(binary file)`` and return it, never through a symlink or into anything but a
    regular file: a link at ``path`` (or a dir, FIFO, device) is a UsageError ``<what><path>: ...; <fix>``.

    ``overwrite``: an existing regular file is replaced atomically (written as a temp file in the same dir, then
    renamed over it: a link swapped in meanwhile is replaced, not followed, and a reader never sees half a file).
    Otherwise any existing entry is refused, atomically (``O_CREAT | O_EXCL``). ``chmod``: the new file's exact
    mode (else ``mode`` less the umask)."""
    name = f"{what}{brief(str(path))}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"{name}: cannot write it ({e.strerror or e}); {fix}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UsageError(f"{name}: a symlink, which ia3-dist does not write through (it could lead to any "
                             f"file); remove it or {fix}")
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{name}: is a directory; {fix}")
        if not overwrite:
            raise UsageError(f"{name}: exists; {fix}")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{name}: {kind(st.st_mode)}, not a regular file; remove it or {fix}")
    target = temp_beside(path) if overwrite else path
    try:
        fd = create_new(target, mode)
    except FileExistsError:
        raise UsageError(f"{name}: exists; {fix}") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot write it ({e.strerror or e}); {fix}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            if chmod is not None:
                os.fchmod(fh.fileno(), chmod)
        if overwrite:
            os.replace(target, path)
    except BaseException as e:
        try:
            os.unlink(target)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UsageError(f"{name}: cannot write it ({e.strerror or e}); {fix}") from None
        raise
    return path


def not_a_dir(p: Path) -> bool:
    """``p`` is there and is a link (to anything) or not a directory: what a writer of a dir there removes by
    unlinking, never following it."""
    return p.is_symlink() or (os.path.lexists(p) and not p.is_dir())


def fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory`` the names in a dir) to stable storage. A rename is durable only
    once its dir is flushed, and a file's data only once the file is: without both, a node that crashes after a
    save was reported can come back with a checkpoint or an adapter whose files are empty. A file is never opened
    through a link; a dir is (an ``output.dir`` named through a link, common on clusters, is flushed where it
    lies). Directories: a filesystem that cannot flush one (EINVAL, ENOTSUP: some network filesystems, which
    commit names on their own) is taken as done."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_DIRECTORY if directory else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _raise(e: OSError) -> None:
    raise e


def current_umask() -> int:
    """The process's umask, read without setting it (``/proc/self/status`` where there is one: changing it to read
    it would be seen by other threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(d: Path) -> None:
    """Every regular file directly in ``d`` (links left alone) 0666 less the umask, as ia3-dist writes its own
    files: a library that saved one private (transformers writes weights through a 0600 temp file) would keep it
    from a shared project's other members while they read the rest."""
    mode = 0o666 & ~current_umask()
    for p in d.iterdir():
        if stat.S_ISREG(os.lstat(p).st_mode):
            os.chmod(p, mode)


def fsync_tree(d: Path) -> None:
    """:func:`fsync` every regular file under ``d`` (links and other kinds are left alone), then every dir, the
    deepest first: what a writer made there is on stable storage, names included. A dir that cannot be listed
    is an error, not a part left unflushed."""
    dirs = []
    for top, subdirs, files in os.walk(d, onerror=_raise):
        dirs.append(Path(top))
        for f in files:
            p = Path(top) / f
            if stat.S_ISREG(os.lstat(p).st_mode):
                fsync(p)
        subdirs[:] = [s for s in subdirs if not os.path.islink(os.path.join(top, s))]
    for sub in reversed(dirs):
        fsync(sub, directory=True)


def write_durable(path: Path, text: str) -> None:
    """``path.write_text(text)``, flushed to stable storage before it returns (a pointer that a rename publishes)."""
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
