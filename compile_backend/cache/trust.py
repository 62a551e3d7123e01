"""When may we load something from the cache directory? The checks behind "reads you cannot trust".

A cache entry becomes code we run (kernels, launch plans), so a directory that someone else can
write is as dangerous as running their code. We only load from directories owned by the current
user and not writable by group or others, never follow a symlink inside the cache, and open
files relative to an already-checked directory descriptor with ``O_NOFOLLOW`` so a file cannot
be swapped for a link between the check and the read.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Union

# Reasons, as they appear in warnings and in ``EngineCache.stats()["bypass_reasons"]``.
CORRUPT = "corrupt"
TRUNCATED = "truncated"
CHECKSUM_MISMATCH = "checksum mismatch"
OTHER_ARCH = "other arch"
OTHER_VERSION = "other version"
KEY_MISMATCH = "key mismatch"
SYMLINK = "symlink"
FOREIGN_OWNER = "owned by another user"
LOOSE_PERMISSIONS = "writable by group or others"
UNWRITABLE = "unwritable"
DISK_FULL = "disk full"
VANISHED = "vanished"
IO_ERROR = "i/o error"
LOCK_TIMEOUT = "lock timeout"

#: reasons that concern one entry (it is discarded and rebuilt); the others concern a directory
ENTRY_REASONS = frozenset({CORRUPT, TRUNCATED, CHECKSUM_MISMATCH, OTHER_ARCH, OTHER_VERSION,
                           KEY_MISMATCH, SYMLINK})

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Linux/macOS say ELOOP when O_NOFOLLOW meets a symlink, FreeBSD says EMLINK
_SYMLINK_ERRNOS = (errno.ELOOP, errno.EMLINK)


class Untrusted(Exception):
    """Something in the cache must not be loaded; ``reason`` is one of the constants above."""

    def __init__(self, reason: str, path: Union[str, Path], detail: str = "") -> None:
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


def current_uid() -> Optional[int]:
    """The effective user id, or None where the OS has none (then ownership is not checked)."""
    return os.geteuid() if hasattr(os, "geteuid") else None


def check_private(st: os.stat_result, path: Union[str, Path]) -> None:
    """Owned by us and not writable by group or others, else Untrusted."""
    uid = current_uid()
    if uid is not None and st.st_uid != uid:
        raise Untrusted(FOREIGN_OWNER, path, f"owner uid {st.st_uid}, this process runs as uid {uid}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Untrusted(LOOSE_PERMISSIONS, path, f"mode {stat.filemode(st.st_mode)}")


def check_directory(path: Union[str, Path], *, follow: bool = False) -> bool:
    """Check one cache directory; False when it does not exist.

    ``follow``: the cache root may itself be a symlink (a user's ~/.cache on another disk); its
    target is what gets checked. Directories inside the root are never symlinks.
    """
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise Untrusted(SYMLINK, path, "symlinked directory")
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(CORRUPT, path, "not a directory")
    check_private(st, path)
    return True


def open_directory(name: Union[str, Path], dir_fd: Optional[int] = None,
                   shown_as: Optional[Union[str, Path]] = None) -> int:
    """Open a directory without following a symlink; checks ownership and mode on the descriptor.

    ``shown_as``: the path named in a rejection (``name`` may be relative to ``dir_fd``).
    """
    shown = shown_as if shown_as is not None else name
    try:
        fd = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS:
            raise Untrusted(SYMLINK, shown, "symlinked directory") from None
        if exc.errno == errno.ENOTDIR:  # Linux answers ENOTDIR, not ELOOP, when O_DIRECTORY is set
            if _is_link(name, dir_fd):
                raise Untrusted(SYMLINK, shown, "symlinked directory") from None
            raise Untrusted(CORRUPT, shown, "not a directory") from None
        raise
    try:
        check_private(os.fstat(fd), shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(dir_fd: int, name: str, shown_as: Union[str, Path]) -> bytes:
    """Read a regular file inside an opened directory, refusing symlinks and foreign files.

    A missing file means the entry is incomplete: TRUNCATED.
    """
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Untrusted(TRUNCATED, shown_as, "file missing") from None
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS:
            raise Untrusted(SYMLINK, shown_as, "symlinked file") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(CORRUPT, shown_as, "not a regular file")
        check_private(st, shown_as)
        return handle.read()


def _is_link(name: Union[str, Path], dir_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def reason_for_os_error(exc: OSError) -> str:
    """Which cause an OSError while writing the cache stands for."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DISK_FULL
    if exc.errno in (errno.ENOENT, errno.ESTALE):
        return VANISHED
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UNWRITABLE
    return IO_ERROR
