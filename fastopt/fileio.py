"""Writing output files: the one atomic writer behind every file fastopt writes.

::

    from fastopt.fileio import atomic_write, write_text
    with atomic_write("run.ckpt") as f:           # binary; text=True for text
        f.write(data)
    write_text("history.json", text)
    with atomic_write(out, text=True, allow_stdout=True) as f:   # "-" is standard output
        ...

Checkpoints (:func:`fastopt.save`), the Trainer's ``history_path`` and ``fastopt predict --out``
use it. What happens depends on what ``path`` is:

- a regular file, or nothing yet: the data goes to a temporary file in the same directory,
  which is flushed and fsync'ed, renamed over ``path`` (:func:`os.replace`) and the directory is
  fsync'ed. Readers see the old file or the complete new one, never a mix; the old file keeps
  its permission bits. On Linux the temporary file is unnamed (``O_TMPFILE``) while it is
  written and only gets a name (``.NAME.PID.XXXXXXXX.tmp``) for the instant before the rename,
  so a process killed while writing leaves nothing behind; where the filesystem has no
  ``O_TMPFILE`` the named file is written directly. Either way a successful write removes the
  temporary files that earlier killed writes to the same path left (that pattern only, and only
  those whose process is gone).
- a symbolic link: its TARGET is replaced as above (the temporary file lives in the target's
  directory, the link stays a link); a dangling link creates its target.
- a FIFO or a character device (``/dev/null``, ``/dev/stdout``, a terminal): written in place,
  as a shell redirection would, without renaming anything over it. Other special files (block
  devices, sockets) and directories are refused with :class:`OutputError`: replacing or
  overwriting them is never what a user asking for an output file means.
- ``"-"`` with ``allow_stdout=True`` (commands that write one file): standard output.

A directory that is missing, not a directory, or not writable, and a path that names a
directory (ending in a separator, ``.`` or ``..``: ``run/`` where no ``run`` exists, which a
shell redirect refuses too) raise :class:`OutputError` naming the path before anything is
written (:func:`check_output` runs the same checks up front, so a command can refuse before it
does any work); the old file is untouched.
"""

import contextlib
import errno
import os
import re
import secrets
import stat
import sys

__all__ = [
    "TEMP_SUFFIX",
    "OutputError",
    "atomic_write",
    "check_output",
    "write_bytes",
    "write_text",
]

TEMP_SUFFIX = ".tmp"
"""Ending of the temporary files (``.NAME.PID.XXXXXXXX.tmp`` beside the target)."""

_STDOUT = "-"


class OutputError(OSError):
    """An output file that cannot be written; the message names the path and the reason."""

    def __init__(self, message, path=None, err=None):
        super().__init__(message)
        self.path = path
        if err is not None:
            self.errno = err


def _reason(exc):
    return exc.strerror or str(exc)


def _plan(path, allow_stdout):
    """("stdout", None), ("inplace", path) or ("replace", real target path)."""
    if isinstance(path, str) and path == _STDOUT:
        if allow_stdout:
            return "stdout", None
        raise OutputError("'-' (standard output) is not accepted here; give a file name", path)
    path = os.fspath(path)
    if not path:
        raise OutputError("the output path is empty", path)
    try:
        st = os.stat(path)  # follows symbolic links
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a parent that is a file (ENOTDIR), a symlink loop, EACCES ...
        raise OutputError(f"cannot write {path}: {_reason(exc)}", path, exc.errno) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {path}: it is a directory", path, errno.EISDIR)
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
            return "inplace", path
        if not stat.S_ISREG(st.st_mode):
            kind = "a block device" if stat.S_ISBLK(st.st_mode) else "a special file"
            raise OutputError(
                f"cannot write {path}: it is {kind}; fastopt writes regular files, FIFOs and "
                "character devices such as /dev/null",
                path,
            )
    _check_names_a_file(path)
    # a symbolic link (chain) is followed; a dangling one names the file to create
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        why = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise OutputError(f"cannot write {path}: {directory} {why}", path, errno.ENOENT)
    # The effective ids decide what open() may do (a setuid process, or root that dropped them).
    effective = os.access in os.supports_effective_ids
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=effective):
        raise OutputError(
            f"cannot write {path}: the directory {directory} is not writable", path, errno.EACCES
        )
    return "replace", target


def _check_names_a_file(path):
    """OutputError for a path that can only name a directory: one ending in a separator, ``.``
    or ``..``. (An existing directory was refused already; without this a missing ``new/`` would
    become a FILE ``new``, since :func:`os.path.abspath` drops the slash.)"""
    tail = os.path.basename(path)
    if tail in ("", ".", "..", b"", b".", b".."):
        ending = os.fsdecode(tail) or os.sep
        raise OutputError(
            f"cannot write {path}: a path ending in {ending!r} names a directory, not a file",
            path,
            errno.EISDIR,
        )


def check_output(path, *, allow_stdout=False):
    """Raise :class:`OutputError` now if ``path`` could not be written (see the module
    docstring); nothing is created. For commands that check their arguments before working."""
    _plan(path, allow_stdout)


@contextlib.contextmanager
def atomic_write(path, *, text=False, encoding="utf-8", newline=None, allow_stdout=False):
    """A file object whose contents replace ``path`` atomically when the ``with`` block ends
    without an exception (FIFOs and character devices are written in place, ``"-"`` is
    standard output with ``allow_stdout``); on an exception nothing at ``path`` changes."""
    kind, target = _plan(path, allow_stdout)
    if kind == "stdout":
        stream = sys.stdout if text else sys.stdout.buffer
        yield stream
        stream.flush()
        return
    if kind == "inplace":
        try:
            fd = os.open(target, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {_reason(exc)}", path, exc.errno) from None
        with _wrap(fd, text, encoding, newline, closefd=True) as f:
            yield f
        return
    with _Replacement(path, target) as rep:
        f = _wrap(rep.fd, text, encoding, newline, closefd=False)
        try:
            yield f
            f.flush()
        finally:
            f.close()
        rep.commit()


def write_bytes(path, data, **kw):
    """Write ``data`` (bytes-like) to ``path`` with :func:`atomic_write`."""
    with atomic_write(path, **kw) as f:
        f.write(data)


def write_text(path, text, *, encoding="utf-8", **kw):
    """Write the string ``text`` to ``path`` with :func:`atomic_write`."""
    with atomic_write(path, text=True, encoding=encoding, **kw) as f:
        f.write(text)


def _wrap(fd, text, encoding, newline, closefd):
    if text:
        return open(fd, "w", encoding=encoding, newline=newline, closefd=closefd)
    return open(fd, "wb", closefd=closefd)


# ------------------------------------------------------------------------------------------
# replacing a regular file


def _temp_name(base):
    return f".{base}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _default_mode():
    """The mode a plain open() gives a new file: 0o666 minus the umask (read without changing
    it, which would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


class _Replacement:
    """A temporary file in the target's directory and the steps that put it in place."""

    def __init__(self, path, target):
        self.path = path
        self.target = target
        self.directory, self.base = os.path.split(target)
        self.dir_fd = None
        self.fd = None
        self.name = None  # the temporary file's name, once it has one

    def __enter__(self):
        try:
            self.dir_fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            self.dir_fd = None  # e.g. Windows: paths relative to the directory instead
        try:
            self.fd = self._open_unnamed()
            if self.fd is None:
                self.name = _temp_name(self.base)
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                if self.dir_fd is None:
                    self.fd = os.open(self._at(self.name), flags, _default_mode())
                else:
                    self.fd = os.open(self.name, flags, _default_mode(), dir_fd=self.dir_fd)
        except OSError as exc:
            self._cleanup()
            raise OutputError(
                f"cannot write {self.path}: cannot create a file in {self.directory}: "
                f"{_reason(exc)}",
                self.path,
                exc.errno,
            ) from None
        return self

    def _at(self, name):
        return name if self.dir_fd is not None else os.path.join(self.directory, name)

    def _open_unnamed(self):
        flag = getattr(os, "O_TMPFILE", None)
        if flag is None or self.dir_fd is None or not os.path.isdir("/proc/self/fd"):
            return None
        try:
            return os.open(self.directory, flag | os.O_RDWR | os.O_CLOEXEC, _default_mode())
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
                raise
            return None  # the filesystem (or kernel) has no O_TMPFILE

    def _unlink(self, name):
        with contextlib.suppress(OSError):
            if self.dir_fd is None:
                os.unlink(self._at(name))
            else:
                os.unlink(name, dir_fd=self.dir_fd)

    def commit(self):
        """fsync, give the file its name and mode, rename it over the target, fsync the
        directory, then remove what earlier killed writes left."""
        try:
            try:
                os.chmod(self.fd, os.stat(self.target).st_mode & 0o7777)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # e.g. a filesystem without permission bits
            os.fsync(self.fd)
            if self.name is None:
                self.name = self._link_unnamed()
            if self.dir_fd is None:
                os.replace(self._at(self.name), self.target)
            else:
                os.replace(self.name, self.base, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            self.name = None  # it is the target now
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise OutputError(
                f"cannot write {self.path}: {_reason(exc)} (the previous file is unchanged)",
                self.path,
                exc.errno,
            ) from exc
        _fsync_dir(self.dir_fd)
        self._remove_leftovers()

    def _link_unnamed(self):
        """A name for the unnamed (O_TMPFILE) file: linkat through /proc/self/fd, or, where that
        is refused, a copy into a named temporary file."""
        name = _temp_name(self.base)
        try:
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dir_fd, follow_symlinks=True)
            return name
        except OSError:
            pass
        out = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd
        )
        try:
            os.fchmod(out, os.fstat(self.fd).st_mode & 0o7777)
            pos = 0
            while chunk := os.pread(self.fd, 1 << 24, pos):
                os.write(out, chunk)
                pos += len(chunk)
            os.fsync(out)
        except BaseException:
            os.close(out)
            os.unlink(name, dir_fd=self.dir_fd)
            raise
        os.close(out)
        return name

    def _remove_leftovers(self):
        pattern = re.compile(
            r"\." + re.escape(self.base) + r"\.(?:(\d+)\.)?[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX)
        )
        try:
            names = os.listdir(self.dir_fd if self.dir_fd is not None else self.directory)
        except OSError:
            return
        for name in names:
            m = pattern.fullmatch(name)
            if m is None or (m.group(1) is not None and _alive(int(m.group(1)))):
                continue
            self._unlink(name)

    def _cleanup(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.name is not None:
            self._unlink(self.name)
            self.name = None
        if self.dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            self.dir_fd = None

    def __exit__(self, *exc):
        self._cleanup()
        return False


def _alive(pid):
    """Whether process ``pid`` exists (this process counts as alive: another thread of it may
    be writing the same path)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync_dir(dir_fd):
    if dir_fd is None:
        return
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)
