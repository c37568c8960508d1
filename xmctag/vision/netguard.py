"""Where an image URL may lead, and for how long: the network side of ``xmctag.vision.fetch``.

Catalogs come from other teams, so their URLs are untrusted. ``get(url, ...)`` fetches one with ``urllib`` through
handlers that enforce four rules:

- **Addresses.** Loopback, private, link-local, multicast, reserved, unspecified and other non-global addresses
  (IPv4 and IPv6; IPv4-mapped, 6to4 and NAT64 IPv6 addresses count as the IPv4 address they carry) are refused,
  unless the ``HostPolicy`` allows them: its entries are host names (``images.corp.example``; ``.corp.example`` or
  ``*.corp.example`` for every name under a domain), IP addresses and CIDR networks (``10.20.0.0/16``). A name on
  the list may resolve to anything; otherwise every address is checked. This holds for the catalog's URL and for
  every redirect.
- **Checked where it connects.** Without a proxy, the connection resolves the host itself, connects only to allowed
  addresses, and checks ``getpeername()`` of the connected socket: a name re-resolved to an internal address
  between a check and the connection (DNS rebinding) gains nothing, and no packet goes to a refused address.
  **With an HTTP(S) proxy** (``http_proxy`` / ``https_proxy``, not bypassed by ``no_proxy``) the connected peer is
  the proxy, which is trusted as configured; the URL's host is then checked by resolving it on this machine before
  the request (every address must be allowed; a name that does not resolve here is refused unless listed). The
  proxy resolves the name again on its own, so behind a proxy DNS rebinding is not excluded: the proxy itself
  should refuse internal destinations.
- **Redirects**: at most ``MAX_REDIRECTS``, and only to ``http`` / ``https`` (``ftp://``, ``file://``... refused).
- **Deadline**: ``Budget`` is the time left for the whole URL (every attempt, retry sleep and read). Each socket
  operation waits at most ``min(timeout, time left)``: connecting, sending, and every read of the status line,
  headers and body, so a server dripping a byte at a time is cut off at the deadline (name resolution: the
  system resolver's own timeouts).

Refusals raise ``Refused`` and the deadline ``DeadlineExceeded`` (not ``OSError``s: urllib passes them through
unwrapped); other failures are urllib's and ``http.client``'s own.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable

from xmctag.errors import UserError

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_NAME = re.compile(r"(\*?\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class Refused(Exception):
    """A URL or redirect that the rules do not allow (the message says which and why)."""


class TooLarge(Exception):
    def __init__(self, max_bytes: int):
        super().__init__(f"larger than {max_bytes} bytes")


class DeadlineExceeded(Exception):
    def __init__(self):
        super().__init__("deadline exceeded")


def restricted_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """``None`` for a global (public) unicast address, else what it is: ``"loopback"``, ``"private"``, ..."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return restricted_kind(embedded)
    for kind, test in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private or getattr(ip, "is_site_local", False)),
                       ("non-public", not ip.is_global)):
        if test:
            return kind
    return None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is no part of the address


def _host_key(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


class HostPolicy:
    """The hosts and networks that image URLs may reach although their addresses are not public (module docstring).

    ``HostPolicy(entries)`` raises ``UserError`` naming an entry that is no host name, address or network.
    """

    def __init__(self, entries: Iterable[str] = ()):
        self.entries = tuple(entries)
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in self.entries:
            key = _host_key(str(entry))
            try:
                network = ipaddress.ip_network(key.split("%", 1)[0], strict=False)
            except ValueError:
                network = None
            if network is not None:
                mapped = network.network_address.ipv4_mapped if network.version == 6 else None
                if mapped is not None and network.prefixlen >= 96:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
                    network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
                self.networks.append(network)
                continue
            if not key or len(key) > 253 or not _NAME.fullmatch(key) or "/" in key:
                raise UserError(f"image hosts: {entry!r} is not a host name, IP address or network (CIDR such as "
                                "10.0.0.0/8)")
            if key.startswith((".", "*.")):
                self.suffixes.append(key.lstrip("*"))
            else:
                self.names.add(key)

    def allows_name(self, host: str) -> bool:
        host = _host_key(host)
        return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def refusal(self, host: str, address: str) -> str | None:
        """Why ``host`` may not be reached at ``address`` (e.g. ``"loopback address 127.0.0.1"``), or None."""
        if self.allows_name(host):
            return None
        ip = _address(address)
        ip = (ip.ipv4_mapped if ip.version == 6 else None) or ip  # an IPv4 peer of a dual-stack socket
        if any(ip in net for net in self.networks if ip.version == net.version):
            return None
        kind = restricted_kind(ip)
        return None if kind is None else f"{kind} address {ip}"

    def resolved_refusal(self, host: str, port: int | None) -> str | None:
        """Before a proxied request: why not, unless every address ``host`` resolves to here is allowed."""
        if self.allows_name(host):
            return None
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except OSError:
            return f"host {host} (behind a proxy, and not resolvable here)"
        return next(filter(None, (self.refusal(host, info[4][0]) for info in infos)), None)


@functools.lru_cache(maxsize=64)
def host_policy(entries: tuple[str, ...]) -> HostPolicy:
    return HostPolicy(entries)


class Budget:
    """The time left for one URL: ``op_timeout()`` is what the next socket operation may wait."""

    def __init__(self, deadline: float, timeout: float):
        self.end = time.monotonic() + deadline
        self.timeout = timeout

    def left(self) -> float:
        return self.end - time.monotonic()

    def op_timeout(self) -> float:
        left = self.left()
        if left <= 0:
            raise DeadlineExceeded()
        return min(self.timeout, left)


class Attempt:
    """One attempt at a URL: its policy and budget, the redirects followed, whether any server answered."""

    def __init__(self, policy: HostPolicy, budget: Budget):
        self.policy, self.budget = policy, budget
        self.redirects = 0
        self.answered = False

    def refuse(self, why: str) -> Refused:
        return Refused(("redirect to " if self.redirects else "") + why + " refused (not in image hosts)")

    def open(self, handler, connection_class, req, **kwargs):
        """``http_open`` / ``https_open`` of the handlers below."""
        req.timeout = self.budget.op_timeout()  # a redirect's request would otherwise carry the first timeout
        proxied = req.has_proxy() or bool(req._tunnel_host)
        if proxied:
            parts = urllib.parse.urlsplit(req.full_url)
            why = self.policy.resolved_refusal(parts.hostname or "", parts.port)
            if why:
                raise self.refuse(why)
        response = handler.do_open(functools.partial(connection_class, attempt=self, check_peer=not proxied), req,
                                   **kwargs)
        self.answered = True
        return response


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each waiting at most the time its ``Budget`` has left."""

    def __init__(self, raw, sock, budget: Budget):
        self._raw, self._sock, self._budget = raw, sock, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(self._budget.op_timeout())
        return self._raw.readinto(buffer)

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``HTTPResponse`` is given instead of the socket: it only calls ``makefile("rb")``."""

    def __init__(self, sock, budget: Budget):
        self._sock, self._budget = sock, budget

    def makefile(self, mode: str, *args, **kwargs):
        raw = self._sock.makefile(mode, buffering=0)  # holds a reference: the socket stays open while it is read
        return io.BufferedReader(_DeadlineReader(raw, self._sock, self._budget), CHUNK)


class _Response(http.client.HTTPResponse):
    def __init__(self, sock, *args, budget: Budget, **kwargs):
        super().__init__(_DeadlineSocket(sock, budget), *args, **kwargs)


class _Guarded:
    """Mixed into ``HTTPConnection`` / ``HTTPSConnection``: connects only to allowed addresses, then checks the peer
    (``check_peer``: not when the peer is a proxy), and reads responses within the budget."""

    def __init__(self, *args, attempt: Attempt, check_peer: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._attempt, self._check_peer = attempt, check_peer
        self._create_connection = self._connect_allowed if check_peer else self._connect_any
        self.response_class = functools.partial(_Response, budget=attempt.budget)

    def _connect_any(self, address, timeout=None, source_address=None, **kwargs):
        return socket.create_connection(address, self._attempt.budget.op_timeout(), source_address, **kwargs)

    def _connect_allowed(self, address, timeout=None, source_address=None, **kwargs):
        host, port = address
        refused, error = None, None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            why = self._attempt.policy.refusal(host, sockaddr[0])
            if why:
                refused = refused or why
                continue
            timeout = self._attempt.budget.op_timeout()
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        raise self._attempt.refuse(refused) if refused else OSError(f"{host}: no address")

    def connect(self):
        super().connect()
        if self._check_peer:
            why = self._attempt.policy.refusal(self.host, self.sock.getpeername()[0])
            if why:
                self.close()
                raise self._attempt.refuse(why)


class _HTTPConnection(_Guarded, http.client.HTTPConnection): ...


class _HTTPSConnection(_Guarded, http.client.HTTPSConnection): ...


# The handlers are shared by threads (``_opener``): a request's ``Attempt`` travels with it, as ``req.attempt``.
class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return req.attempt.open(self, _HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return req.attempt.open(self, _HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri") or ""
        scheme = urllib.parse.urlsplit(location.strip()).scheme.lower()
        if scheme not in ("", "http", "https"):
            fp.close()
            raise Refused(f"redirect to {scheme} refused")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()
            raise Refused(f"redirect to {scheme or 'a URL without a scheme'} refused")
        if req.attempt.redirects >= MAX_REDIRECTS:
            fp.close()
            raise Refused(f"more than {MAX_REDIRECTS} redirects")
        req.attempt.redirects += 1
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.attempt = req.attempt
        return new


@functools.lru_cache(maxsize=8)
def _opener(proxies: tuple[tuple[str, str], ...]) -> urllib.request.OpenerDirector:
    """http(s) only: no file, ftp or data handler to reach by any route. One per proxy setting (the environment's,
    read for each URL as ``urlopen`` would), shared by all fetches."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(dict(proxies)), urllib.request.UnknownHandler(), _HTTPHandler(),
                    _HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _RedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def get(url: str, headers: dict[str, str], attempt: Attempt, max_bytes: int) -> bytes:
    """The body of ``url`` by the rules above; ``TooLarge`` when it has more than ``max_bytes`` (announced by its
    Content-Length, or counted while reading: at most ``max_bytes + 1`` bytes are read)."""
    request = urllib.request.Request(url, headers=headers)
    request.attempt = attempt
    opener = _opener(tuple(sorted(urllib.request.getproxies().items())))
    with opener.open(request, timeout=attempt.budget.op_timeout()) as response:
        length = response.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > max_bytes:
            raise TooLarge(max_bytes)
        chunks, size = [], 0
        while True:
            chunk = response.read(min(CHUNK, max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise TooLarge(max_bytes)
