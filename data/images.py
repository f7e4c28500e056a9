"""Product images: fetched under strict rules, decoded once, kept as bounded copies.

`image_link` is an http(s) URL, a `file://` URI or a local path. What a link may reach:

- an http(s) link is fetched only from a public address: its host is resolved once, every address
  must be public (not loopback, link-local, private, multicast, reserved or unspecified, IPv4 or
  IPv6, IPv4-mapped included), the connection goes to that address (Host header and TLS name still
  the link's host), the address actually connected to is checked again, and redirects are followed
  by hand (at most `MAX_REDIRECTS`) under the same rules. `allow_private_hosts` lifts the address
  rule for a catalogue served from the local network.
- a local path (relative paths are read from `image_root`) or `file://` URI is read only when,
  after resolving `..` and symlinks, it is a regular file inside `image_root`; it is opened without
  blocking, so a named pipe or a device is refused, never waited on.
- every image is capped in bytes (`max_bytes`) and a download in time (`timeout_s`, the whole
  fetch of one image with its redirects, not one socket read).

Each usable image is decoded once, here, into a bounded copy in `copies_dir` (shortest side at most
`side` pixels; a JPEG is decoded at reduced scale with PIL's draft mode), named by a digest of its
link (of its path, size and time for a local file) and written atomically; every image stage
reads the copies. A copy that exists is reused, so a re-run decodes and downloads nothing twice.
Links that failed on the network are remembered in `copies_dir/failed.json` and skipped on a
re-run unless `retry_failed`. A bad or refused image never stops the run: its row gets
`has_image=false` and its reason is counted.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import io
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.io import atomic_write_bytes, write_json
from core.runtime import progress

USER_AGENT = "price-pipeline-image-fetch/1.0"
MAX_REDIRECTS = 5
MAX_PIXELS = 50_000_000  # a small file can declare far more pixels than memory holds
COPY_SIDE = 448  # shortest side of a copy: enough for CLIP at 224 and SigLIP at 384
JPEG_QUALITY = 90
URL_SAFE = "/%:@!$&'()*+,;=-._~"  # what a URL path may hold as is; anything else is percent-encoded


@dataclass
class ImageResult:
    path: str | None  # the bounded copy every image stage reads, or None when no usable image
    status: str  # ok | local | cached | failed:<reason> | refused:<reason> | skipped:<reason>


class Refused(Exception):
    """A link the rules do not allow (a private address, a path outside the image root, too large):
    masked and counted, never retried."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class HttpStatus(Exception):
    def __init__(self, code: int):
        super().__init__(f"http {code}")
        self.code = code


def reason_of(status: str) -> str:
    """The status without its detail, for counting: 'failed:unreachable (refused)' -> 'failed:unreachable'."""
    return status.split(" (", 1)[0]


# --- addresses ---------------------------------------------------------------------------------

def is_public_address(text: str) -> bool:
    """True for an address on the public internet, False for loopback, link-local, private,
    multicast, reserved and unspecified ones (an IPv4-mapped IPv6 address is judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (a literal address resolves to itself, with no lookup)."""
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def dial(address: str, port: int, timeout: float) -> tuple[socket.socket, str]:
    """A TCP connection to `address`, and the peer address the operating system reports."""
    sock = socket.create_connection((address, port), timeout=timeout)
    return sock, sock.getpeername()[0]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One context for every https fetch: loading the certificate store per image would cost more than the image."""
    return ssl.create_default_context()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to addresses resolved and checked beforehand (the first that answers), checked again once
    connected; the Host header and the TLS name stay the link's host."""

    def __init__(self, host, port, addresses, timeout, allow_private, tls: ssl.SSLContext | None = None):
        super().__init__(host, port, timeout=timeout)
        self.addresses, self.allow_private, self.tls = addresses, allow_private, tls
        self.live = None  # the socket, kept here too: http.client hands it to a response and forgets it

    def connect(self):
        for i, address in enumerate(self.addresses):
            try:
                sock, peer = dial(address, self.port, self.timeout)
                break
            except OSError:
                if i == len(self.addresses) - 1:
                    raise
        if not self.allow_private and not is_public_address(peer):
            sock.close()
            raise Refused("private address")
        self.sock = self.live = self.tls.wrap_socket(sock, server_hostname=self.host) if self.tls else sock


def _abort(conn: _PinnedConnection) -> None:
    """Cut a transfer at its deadline, even one blocked in a read (a server trickling bytes)."""
    sock = conn.live
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def download_bytes(link: str, timeout_s: float, max_bytes: int, allow_private: bool = False) -> bytes:
    """The body behind `link`, following redirects by hand; every hop's address is checked before
    connecting and after. Raises Refused, HttpStatus, TimeoutError (past `timeout_s` in all) or OSError."""
    deadline = time.monotonic() + timeout_s
    url = link
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise Refused("unsupported link") from None
        if scheme not in ("http", "https") or not parts.hostname:
            raise Refused("unsupported link")
        addresses = resolve_host(parts.hostname, port)
        if not allow_private and not all(is_public_address(a) for a in addresses):
            raise Refused("private address")
        tls = tls_context() if scheme == "https" else None
        conn = _PinnedConnection(parts.hostname, port, addresses, _remaining(deadline), allow_private, tls)
        timer = threading.Timer(_remaining(deadline), _abort, [conn])
        timer.start()
        response = None
        try:
            path = urllib.parse.quote(parts.path or "/", safe=URL_SAFE)
            query = urllib.parse.quote(parts.query, safe=URL_SAFE + "?")
            conn.request("GET", path + (f"?{query}" if query else ""),
                         headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise HttpStatus(response.status)
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise Refused("too large")
            chunks, size = [], 0
            while chunk := response.read(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise Refused("too large")
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline passed")  # the timer cut the body short
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"download took longer than {timeout_s}s") from exc
            raise
        finally:
            timer.cancel()
            if response is not None:
                response.close()
            conn.close()
            if conn.live is not None:
                conn.live.close()
    raise Refused("too many redirects")


def _network_failure(exc: Exception) -> tuple[str, bool]:
    """(reason, worth retrying) for an exception raised while downloading."""
    if isinstance(exc, HttpStatus):
        return f"http {exc.code}", exc.code >= 500 or exc.code == 429
    if isinstance(exc, TimeoutError):
        return "timeout", True
    if isinstance(exc, socket.gaierror):
        return f"unreachable (name not resolved: {exc.strerror})", True
    return f"unreachable ({type(exc).__name__}: {exc})"[:200], True


# --- local files --------------------------------------------------------------------------------

def local_path(link: str, image_root: Path) -> Path:
    """The file a local link names, with `..` and symlinks resolved; Refused unless it lies inside
    `image_root` (itself resolved)."""
    parts = urllib.parse.urlsplit(link)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise Refused("unsupported link")
        link = urllib.parse.unquote(parts.path)
    root = Path(os.path.realpath(image_root))
    path = Path(os.path.realpath(root / link))  # an absolute link replaces the root here
    if not path.is_relative_to(root):
        raise Refused("outside image root")
    return path


def open_local(path: Path, max_bytes: int) -> tuple[int, os.stat_result]:
    """(descriptor, stat) of a regular file of at most `max_bytes`; opened without blocking and
    without following a symlink, so a pipe, device or swapped-in link is refused, not waited on."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink put there after resolving; a socket
            raise Refused("not a regular file") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        raise Refused("not a regular file" if not stat.S_ISREG(info.st_mode) else "too large")
    return fd, info


def read_fd(fd: int, max_bytes: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused("too large")  # grew after the size check
    return data


# --- copies -------------------------------------------------------------------------------------

def copy_stem(key: str, side: int = COPY_SIDE) -> str:
    return hashlib.sha1(f"{side}:{key}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def find_copy(dirs, key: str, side: int = COPY_SIDE) -> Path | None:
    """The existing copy for `key` in the first of `dirs` that holds one."""
    stem = copy_stem(key, side)
    for folder in dirs:
        for suffix in (".jpg", ".png"):
            path = Path(folder) / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def cache_path(copies_dir: Path, link: str, side: int = COPY_SIDE) -> Path:
    """Where the copy of an http(s) link lies (the .jpg name when there is none yet)."""
    return find_copy([copies_dir], link, side) or Path(copies_dir) / f"{copy_stem(link, side)}.jpg"


def bounded_copy(data: bytes, side: int = COPY_SIDE) -> tuple[bytes, str]:
    """(bytes, suffix) of the image scaled so that its shortest side is at most `side`: the one
    full decode of the image. Raises on a file that does not decode. A JPEG or PNG already small
    enough is kept byte for byte; a larger image becomes a JPEG; another small format a PNG."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width < 1 or height < 1:
            raise ValueError("empty image")
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width}x{height} pixels, more than {MAX_PIXELS}")
        shortest = min(width, height)
        if shortest <= side:
            img.load()
            if img.format in ("JPEG", "PNG"):
                return data, ".jpg" if img.format == "JPEG" else ".png"
            out, fmt, suffix = img.convert("RGB"), "PNG", ".png"
        else:
            size = (max(1, round(width * side / shortest)), max(1, round(height * side / shortest)))
            img.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least `size`
            out, fmt, suffix = img.convert("RGB").resize(size, Image.Resampling.BICUBIC), "JPEG", ".jpg"
    buf = io.BytesIO()
    out.save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue(), suffix


def write_copy(copies_dir: Path, key: str, data: bytes, suffix: str, side: int = COPY_SIDE) -> Path:
    """Write a copy atomically (a unique temporary name: parallel writers never collide); a disk that
    refuses it stops the run, it is no image's fault."""
    target = Path(copies_dir) / f"{copy_stem(key, side)}{suffix}"
    atomic_write_bytes(target, data)
    return target


# --- the whole catalogue ------------------------------------------------------------------------

def fetch_images(links, copies_dir: Path, image_root: Path, download: bool = True, workers: int = 32,
                 timeout_s: float = 10.0, retries: int = 2, retry_failed: bool = False,
                 max_bytes: int = 20_000_000, allow_private_hosts: bool = False, side: int = COPY_SIDE,
                 reuse_dirs=(), give_up_after: int = 64) -> tuple[dict[str, ImageResult], int]:
    """Resolve every distinct link to a bounded copy in `copies_dir`, or a reason.

    Copies already in `reuse_dirs` (another run's copies folder, read only) are used where they lie.
    When the first `give_up_after` downloads all fail on the network (timeouts, unreachable host) the
    machine has no route to the image host: the remaining links are skipped at once, not recorded as
    failed, so a later run on a connected machine tries them. Without this a box with no internet
    would wait out every timeout (hours for 75k links).

    Returns ({link: ImageResult}, number of images downloaded by this call)."""
    copies_dir = Path(copies_dir).resolve()
    copies_dir.mkdir(parents=True, exist_ok=True)
    look_in = [copies_dir, *map(Path, reuse_dirs)]
    failed_path = copies_dir / "failed.json"
    failed: dict[str, str] = json.loads(failed_path.read_text()) if failed_path.exists() else {}
    lock = threading.Lock()
    file_locks: dict[str, threading.Lock] = {}  # one per local file: two links to it decode it once
    downloaded = [0]  # network fetches that succeeded in this call
    network_failures = [0]  # downloads that failed on the network while none has succeeded yet

    def keep(key: str, data: bytes, status: str) -> ImageResult:
        try:
            copy, suffix = bounded_copy(data, side)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a counted reason, never fatal
            return ImageResult(None, f"failed:corrupt ({type(exc).__name__})")
        return ImageResult(str(write_copy(copies_dir, key, copy, suffix, side)), status)

    def fetch_url(link: str) -> ImageResult:
        found = find_copy(look_in, link, side)
        if found is not None:
            return ImageResult(str(found), "cached")
        if link in failed and not retry_failed:
            return ImageResult(None, f"failed:{failed[link]} (earlier run)")
        if not download:
            return ImageResult(None, "skipped:not downloaded")
        if not downloaded[0] and network_failures[0] >= give_up_after > 0:
            return ImageResult(None, f"skipped:image host unreachable (the first {give_up_after} downloads failed)")
        reason = "unknown"
        for attempt in range(retries + 1):
            try:
                data = download_bytes(link, timeout_s, max_bytes, allow_private_hosts)
            except Refused as exc:
                return ImageResult(None, f"refused:{exc.reason}")
            except Exception as exc:  # noqa: BLE001 - every failure becomes a counted reason
                reason, retry = _network_failure(exc)
                if retry and attempt < retries:
                    time.sleep(min(0.25 * 2 ** attempt, 2.0))
                    continue
                break
            result = keep(link, data, "ok")
            with lock:
                if result.path is None:
                    failed[link] = result.status.removeprefix("failed:")  # a corrupt file is not fetched again
                else:
                    downloaded[0] += 1
                    failed.pop(link, None)
            return result
        with lock:
            failed[link] = reason
            if reason == "timeout" or reason.startswith("unreachable"):
                network_failures[0] += 1
        return ImageResult(None, f"failed:{reason}")

    def read_file(link: str) -> ImageResult:
        try:
            path = local_path(link, image_root)
            fd, info = open_local(path, max_bytes)
        except Refused as exc:
            return ImageResult(None, f"refused:{exc.reason}")
        except ValueError:  # a NUL byte in the path
            return ImageResult(None, "refused:unsupported link")
        except FileNotFoundError:
            return ImageResult(None, "failed:file not found")
        except OSError as exc:
            return ImageResult(None, f"failed:unreadable ({type(exc).__name__})")
        key = f"file:{path}:{info.st_size}:{info.st_mtime_ns}"  # a changed file gets a new copy
        with lock:
            file_lock = file_locks.setdefault(key, threading.Lock())
        with file_lock:
            found = find_copy(look_in, key, side)
            if found is not None:
                os.close(fd)
                return ImageResult(str(found), "cached")
            try:
                data = read_fd(fd, max_bytes)
            except Refused as exc:
                return ImageResult(None, f"refused:{exc.reason}")
            return keep(key, data, "local")

    def resolve(link: str) -> ImageResult:
        if not link or link.lower() in ("nan", "none"):
            return ImageResult(None, "skipped:no link")
        try:
            scheme = urllib.parse.urlsplit(link).scheme.lower()
        except ValueError:  # e.g. an unclosed [ in an IPv6 host
            return ImageResult(None, "refused:unsupported link")
        if scheme in ("http", "https"):
            return fetch_url(link)
        if "://" in link and scheme != "file":
            return ImageResult(None, "refused:unsupported link")
        return read_file(link)

    unique = list(dict.fromkeys(str(link) if link is not None else "" for link in links))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(progress(pool.map(resolve, unique), total=len(unique), desc="images", unit="img"))
    write_json(failed_path, failed)
    gave_up = sum(r.status.startswith("skipped:image host unreachable") for r in results)
    if gave_up:
        print(f"images: the first {give_up_after} downloads failed on the network and none succeeded; "
              f"{gave_up} further link(s) skipped (run again on a machine that reaches the image host)")
    return dict(zip(unique, results)), downloaded[0]
