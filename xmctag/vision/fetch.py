"""Reading an image source's bytes: local files and http(s) URLs, bounded, with retries, never raising.

``Source``: where one image comes from (inline bytes, a file, a URL, or an invalid value with its reason), as
``xmctag.vision.images.sources_of`` parses the image column. ``read_source(source, options)`` -> ``(bytes, "ok")`` or
``(None, reason)``. The catalog is untrusted, so:

- Files: opened without blocking (``O_NONBLOCK``: a named pipe cannot hang the open) and checked on the open
  descriptor: only regular files are read (devices such as ``/dev/zero``, FIFOs, sockets and directories, symlinks
  to them included: ``fetch_failed: not a regular file``), and never more than ``FetchOptions.max_bytes + 1``
  bytes, whatever their size says (``/proc`` files say 0): larger ones are refused.
- URLs: fetched with the standard library (``urllib``) under the rules of ``xmctag.vision.netguard``: no private,
  loopback, link-local or other non-public address unless ``FetchOptions.allowed_hosts`` names it (checked on the
  address actually connected to, for the URL and every redirect), redirects only to http(s) and at most 5, and a
  total ``deadline`` per URL over all attempts, retry sleeps and reads (``fetch_failed: deadline exceeded``), on
  top of the ``timeout`` of each socket operation. Errors that may pass (timeouts, connection errors, HTTP
  408/429/5xx) are retried with exponential backoff while the deadline allows.

After ``NETWORK_FAILURES_TO_GIVE_UP`` URLs in a row failed without any answer from a server (offline machine, no
DNS), the run stops fetching (``NetworkGate``): its remaining URLs are skipped at once, with a warning. The statuses
(``OK`` or a reason) are what summaries count (``xmctag.vision.images.reason_category``).
"""

from __future__ import annotations

import os
import random
import socket
import stat
import threading
import time
import urllib.error
import warnings
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

from xmctag.vision import netguard

OK = "ok"
NULL = "null"
MISSING = "missing"
UNDECODABLE = "undecodable"
FETCH_FAILED = "fetch_failed"
UNSUPPORTED = "unsupported"
NETWORK_SKIPPED = "skipped: network unavailable"

_RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}
# URLs in a row that got no answer at all (connection refused, DNS, timeout) before a run stops fetching: offline,
# each unreachable URL costs its timeout and retries, which over a million URLs is days.
NETWORK_FAILURES_TO_GIVE_UP = 50


class NetworkGate:
    """Shared by a run's fetches (``FetchOptions.gate``): counts URLs in a row that reached no server, and closes
    (no more fetching, one warning) after ``NETWORK_FAILURES_TO_GIVE_UP``. An HTTP answer, even an error, resets it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.failures_in_a_row = 0
        self.closed = False

    def record(self, reached_server: bool, reason: str = "") -> None:
        with self._lock:
            if reached_server:
                self.failures_in_a_row = 0
                return
            self.failures_in_a_row += 1
            if self.closed or self.failures_in_a_row < NETWORK_FAILURES_TO_GIVE_UP:
                return
            self.closed = True
        warnings.warn(f"image URLs: {self.failures_in_a_row} in a row reached no server (last: {reason}); not "
                      f"fetching the others of this run (counted as '{NETWORK_SKIPPED}')", stacklevel=2)


@dataclass
class FetchOptions:
    """How image bytes are read. ``timeout`` is per socket operation (connect, each read), ``deadline`` the total
    per URL (all attempts, retry sleeps and reads), both in seconds. ``allowed_hosts``: host names (``.domain`` for
    all names under it), IP addresses and CIDR networks that URLs may reach although they are not public (loopback,
    private, link-local, ...; see ``xmctag.vision.netguard``): by default only public addresses are fetched."""

    workers: int = 16  # threads reading files and URLs (I/O bound; decoding also runs there, PIL frees the GIL)
    timeout: float = 10.0
    deadline: float = 30.0
    retries: int = 2  # extra attempts after the first, for errors that may pass
    backoff: float = 0.5  # seconds before the first retry, doubled each time (plus up to 25 % jitter)
    max_bytes: int = 32 * 1024 * 1024  # larger downloads are refused: no product photo needs more
    user_agent: str = "xmctag (product image fetcher)"
    allowed_hosts: tuple[str, ...] = ()
    gate: NetworkGate = field(default_factory=NetworkGate, repr=False, compare=False)  # state of the run's fetches

    def __post_init__(self):
        self.allowed_hosts = tuple(self.allowed_hosts)
        netguard.host_policy(self.allowed_hosts)  # a bad entry is a UserError now, not a status per URL


@dataclass(frozen=True)
class Source:
    """Where one image comes from. ``kind`` is ``"bytes"``, ``"file"``, ``"url"`` or ``"invalid"``.

    ``ref``: the absolute path (file), the URL (url), ``"<N bytes>"`` (bytes) or the value as written (invalid, with
    the ``reason`` it cannot be used).
    """

    kind: str
    ref: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    reason: str | None = field(default=None, compare=False)

    def key(self) -> str | None:
        """A stable name of the source's current content, for remembering which sha256 it had (``SourceIndex``).

        URL: the URL itself. File: path, size and modification time, so an edited file gets a new key. ``None``
        for inline bytes (their sha256 is known without any lookup) and for files that cannot be stat'ed.
        """
        if self.kind == "url":
            return "url:" + self.ref
        if self.kind == "file":
            try:
                st = Path(self.ref).stat()
            except OSError:
                return None
            return f"file:{self.ref}\x00{st.st_size}\x00{st.st_mtime_ns}"
        return None


def read_source(source: Source, options: FetchOptions | None = None) -> tuple[bytes | None, str]:
    """``(content bytes, "ok")`` or ``(None, reason)``. Never raises for a bad source."""
    options = options or FetchOptions()
    if source.kind == "bytes":
        return source.data, OK
    if source.kind == "invalid":
        return None, source.reason
    if source.kind == "file":
        return _read_file(Path(source.ref), options)
    return _fetch_url(source.ref, options)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_file(path: Path, options: FetchOptions) -> tuple[bytes | None, str]:
    not_regular = f"{FETCH_FAILED}: not a regular file"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # devices are not even opened (opening some has effects)
            return None, not_regular
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None, MISSING
    except OSError as e:
        return None, f"{FETCH_FAILED}: {e.strerror or type(e).__name__}"
    try:
        st = os.fstat(fd)  # the file opened, not the name: one swapped for a device or FIFO meanwhile gains nothing
        if not stat.S_ISREG(st.st_mode):
            return None, not_regular
        if st.st_size > options.max_bytes:
            return None, f"{FETCH_FAILED}: file larger than {options.max_bytes} bytes"
        chunks, size = [], 0
        while size <= options.max_bytes:  # size on disk is not trusted (/proc files say 0, files grow)
            chunk = os.read(fd, min(1 << 20, options.max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks), OK
            chunks.append(chunk)
            size += len(chunk)
        return None, f"{FETCH_FAILED}: file larger than {options.max_bytes} bytes"
    except BlockingIOError:  # a regular file that would block even so (/proc/kmsg)
        return None, f"{FETCH_FAILED}: read would block"
    except OSError as e:
        return None, f"{FETCH_FAILED}: {e.strerror or type(e).__name__}"
    finally:
        os.close(fd)


def _fetch_url(url: str, options: FetchOptions) -> tuple[bytes | None, str]:
    gate = options.gate
    if gate.closed:
        return None, NETWORK_SKIPPED
    headers = {"User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.5"}
    policy = netguard.host_policy(options.allowed_hosts)
    budget = netguard.Budget(options.deadline, options.timeout)
    reason, answered = "", False
    for attempt in range(options.retries + 1):
        if attempt:
            delay = options.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())  # jitter: threads apart
            if delay >= budget.left():
                break  # no time left for another try: the last failure is the reason
            time.sleep(delay)
            if gate.closed:
                return None, NETWORK_SKIPPED
        current, retry = netguard.Attempt(policy, budget), True
        try:
            data = netguard.get(url, headers, current, options.max_bytes)
            gate.record(reached_server=True)
            return data, OK
        except netguard.TooLarge as e:
            gate.record(reached_server=True)
            return None, f"{FETCH_FAILED}: {e}"
        except netguard.Refused as e:  # final; counted by the gate only when a server answered (a redirect)
            if current.answered:
                gate.record(reached_server=True)
            return None, f"{FETCH_FAILED}: {e}"
        except netguard.DeadlineExceeded as e:
            reason, retry = str(e), False
        except urllib.error.HTTPError as e:
            e.close()
            reason, current.answered, retry = f"HTTP {e.code}", True, e.code in _RETRY_HTTP_CODES
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                reason = "timeout"
            else:
                reason = str(e.reason) or type(e.reason).__name__
        except (TimeoutError, socket.timeout):
            reason = "timeout"
        except (ConnectionError, HTTPException, OSError) as e:
            reason = type(e).__name__
        except ValueError as e:  # malformed URL
            return None, f"{FETCH_FAILED}: {e}"
        answered = answered or current.answered
        if retry and budget.left() <= 0:  # the last wait was cut short by the deadline
            reason, retry = str(netguard.DeadlineExceeded()), False
        if not retry:
            break
    gate.record(reached_server=answered, reason=reason)
    return None, f"{FETCH_FAILED}: {reason}"
