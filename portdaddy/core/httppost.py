"""One HTTP(S) POST on trio with h11, for webhooks: resolve, refuse private addresses, connect to the address
that was checked (no second lookup a DNS rebinding could change), never follow redirects."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import trio

from portdaddy.errors import bad_input

MAX_BODY_KEPT = 1000
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal")


class DeliveryError(Exception):
    """The POST did not get a response (refused target, DNS, connect, TLS, timeout, protocol)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    reason: str
    body: str  # at most MAX_BODY_KEPT characters


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: a NAT64 gateway forwards to the IPv4 inside
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d, still routed by some stacks


def private_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one is judged by that one: ::ffff:127.0.0.1, 6to4 2002:7f00:1::,
        # NAT64 64:ff9b::a9fe:a9fe (169.254.169.254) would otherwise pass as global.
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are judged as they are
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return not ip.is_global or ip.is_multicast


def check_url(url: str, *, allow_private: bool) -> SplitResult:
    """Parse a webhook URL: http(s), a host, and (unless allowed) no private/loopback/link-local target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_input(f"url {url[:80]!r} must be http:// or https:// with a host")
    if parts.username is not None:  # it went out in the Host header, and pd webhook ls showed it to every agent
        raise bad_input(f"url {url[:80]!r} carries credentials (user@); sign deliveries with a secret instead")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise bad_input(f"url {url[:80]!r} has an invalid port") from None
    if allow_private:
        return parts
    host = parts.hostname.lower().rstrip(".")  # "localhost." is localhost
    try:
        private = private_address(host)
    except ValueError:
        try:  # the resolver's legacy IPv4 spellings (0x7f000001, 2130706433, 127.1) are addresses too
            private = private_address(socket.inet_ntoa(socket.inet_aton(host)))
        except OSError:  # a name
            private = host == "localhost" or host.endswith(_PRIVATE_SUFFIXES)
    if private:
        raise bad_input(f"url host {host!r} is private, loopback or link-local; webhooks go to public hosts "
                        "(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE=1 on the daemon allows local targets)")  # fmt: skip
    return parts


async def post(url: str, body: bytes, headers: list[tuple[str, str]], *, allow_private: bool,
               timeout_s: float = 10.0) -> Reply:  # fmt: skip
    parts = check_url(url, allow_private=allow_private)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    with trio.move_on_after(timeout_s) as scope:
        try:
            infos = await trio.socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise DeliveryError(f"cannot resolve {parts.hostname}: {e}") from None
        addrs = [info[4][0] for info in infos]
        if not allow_private and any(private_address(a) for a in addrs):
            raise DeliveryError(f"{parts.hostname} resolves to a private address; refused")
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(addrs[0], port)
            if https:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname)
                await stream.do_handshake()
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise DeliveryError(f"cannot connect to {parts.hostname}:{port}: {e}") from None
        async with stream:
            return await _exchange(stream, parts, body, headers)
    assert scope.cancelled_caught
    raise DeliveryError(f"no response within {timeout_s:g}s")


async def _exchange(stream: trio.abc.Stream, parts: SplitResult, body: bytes,
                    headers: list[tuple[str, str]]) -> Reply:  # fmt: skip
    import h11  # here, not at the top: the daemon imports this module before its IPC socket answers

    conn = h11.Connection(h11.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = h11.Request(method="POST", target=target, headers=[
        ("Host", parts.netloc), ("Content-Length", str(len(body))), ("Connection", "close"),
        ("User-Agent", "port-daddy-webhooks"), *headers,
    ])  # fmt: skip
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, reason, kept = 0, "", bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, reason = event.status_code, event.reason.decode("latin-1")
            elif isinstance(event, h11.Data):
                kept += event.data[: MAX_BODY_KEPT - len(kept)]
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return Reply(status, reason, kept.decode("utf-8", "replace"))
    except (h11.ProtocolError, trio.BrokenResourceError, OSError) as e:
        raise DeliveryError(f"bad HTTP exchange: {e}") from None
