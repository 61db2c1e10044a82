"""Removing what a program left behind, however deep: no recursion and no long paths.

A program can make thousands of nested directories (shutil.rmtree recurses once per level, and
paths longer than PATH_MAX cannot be named at all) and can revoke its own permissions. remove_tree
works through descriptors: every directory found below the top is first moved up to sit directly
inside it, so no walk is ever deeper than two levels.
"""
from __future__ import annotations

import errno
import itertools
import os

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_TRIES = 100  # names the program may have taken already


def remove_tree(path: str) -> None:
    """Delete the directory `path` and everything in it (symlinks are removed, never followed).
    The program must be dead: nothing else may change the tree meanwhile. Raises OSError."""
    os.chmod(path, 0o700)  # callers pass a directory (never a link); the program may have locked it
    top = os.open(path, _DIRECTORY)
    names = (f".removing-{index}" for index in itertools.count())
    try:
        while children := _entries(top):
            for name, is_directory in children:
                if is_directory:
                    _empty_into(top, name, names)
                    os.rmdir(name, dir_fd=top)
                else:
                    os.unlink(name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)


def _entries(directory_fd: int) -> list[tuple[str, bool]]:
    with os.scandir(directory_fd) as entries:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]


def _empty_into(top: int, name: str, names) -> None:
    """Empty the directory `name` inside `top`: files go, directories move up into `top`."""
    os.chmod(name, 0o700, dir_fd=top)  # a directory, not a link (scandir said so): the program may have locked it
    directory = os.open(name, _DIRECTORY, dir_fd=top)
    try:
        for child, is_directory in _entries(directory):
            if is_directory:
                _move_up(directory, child, top, names)
            else:
                os.unlink(child, dir_fd=directory)
    finally:
        os.close(directory)


def _move_up(directory: int, child: str, top: int, names) -> None:
    for _ in range(_RENAME_TRIES):
        try:
            os.rename(child, next(names), src_dir_fd=directory, dst_dir_fd=top)
            return
        except OSError as error:  # the name is taken: try the next one
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OSError(f"could not move {child!r} up while removing a tree")
