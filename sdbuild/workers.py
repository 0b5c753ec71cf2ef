"""Where worker processes' forkservers put their sockets.

Both the stage server and a stage's own worker pool (the k-means) are
multiprocessing forkservers; each listens on a UNIX socket under TMPDIR.
"""

from __future__ import annotations

import os
import tempfile
from multiprocessing import get_all_start_methods, util


# multiprocessing names a forkserver's socket ``<TMPDIR>/pymp-XXXXXXXX/listener-XXXXXXXX``; a UNIX
# socket's path holds at most 107 bytes, so a long TMPDIR (a test's tmp_path) would fail to bind.
_SOCKET_NAME_BYTES = len("/pymp-XXXXXXXX/listener-XXXXXXXX")
_SOCKET_PATH_MAX = 107
_SHORT_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def short_socket_dir() -> bool:
    """Make sure multiprocessing's helper folder (sockets of forkservers) has a short enough path.

    Call before starting a forkserver. Where TMPDIR is too long for a socket
    path, the helper folder goes under the first short writable temp folder
    instead (multiprocessing removes it at exit); stage outputs still use TMPDIR.
    Returns False where there is none: use spawn.
    """
    if len(os.fsencode(tempfile.gettempdir())) + _SOCKET_NAME_BYTES <= _SOCKET_PATH_MAX:
        return True
    for short in _SHORT_TEMP_DIRS:
        if os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK):
            saved, tempfile.tempdir = tempfile.tempdir, short
            try:
                return len(os.fsencode(util.get_temp_dir())) + _SOCKET_NAME_BYTES - len("/pymp-XXXXXXXX") <= _SOCKET_PATH_MAX
            finally:
                tempfile.tempdir = saved
    return False


def forkserver_or_spawn() -> str:
    """``forkserver`` where this machine has it and its socket can be named, else ``spawn``."""
    return "forkserver" if "forkserver" in get_all_start_methods() and short_socket_dir() else "spawn"
