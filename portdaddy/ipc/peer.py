"""Who is at the other end of a Unix socket. Standard library only: the CLI's client checks its daemon with it."""

from __future__ import annotations

import os
import socket
import struct

from portdaddy.errors import PDError


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def check_daemon_uid(sock: socket.socket, path: str) -> None:
    """Refuse a daemon that runs as another user. A socket another user planted (in a home they made first, or
    where PORT_DADDY_IPC points) would otherwise receive our requests, notes and all, and answer them."""
    uid = peer_credentials(sock)[1]
    if uid != os.getuid():
        raise PDError("FORBIDDEN", f"{path} is served by uid {uid}, not by you (uid {os.getuid()}); another user "
                      "may have planted it: point PORT_DADDY_HOME at a directory of your own")  # fmt: skip
