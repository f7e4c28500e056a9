"""Fetching product images into a resumable on-disk cache.

`image_link` is an http(s) URL, a `file://` URI or a local path (relative paths are read from the
CSV's folder). URLs are downloaded in parallel with a timeout and retries into `cache_dir`, one
file per link named by the link's hash; a file is moved into place only after it decodes, so
whatever is in the cache is good and is never fetched again. Links that failed are remembered in
`cache_dir/failed.json` and skipped on a re-run unless `retry_failed`. Local images are decoded
to verify them and used where they lie. A bad image never stops the run: its row gets
`has_image=false` and the reason is counted.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.io import atomic_write_bytes, write_json
from core.runtime import progress

USER_AGENT = "price-pipeline-image-fetch/1.0"


@dataclass
class ImageResult:
    path: str | None  # local file to read, or None when no usable image
    status: str  # ok | cached | local | failed:<reason> | skipped:<reason>


def cache_path(cache_dir: Path, link: str) -> Path:
    digest = hashlib.sha1(link.encode("utf-8")).hexdigest()[:24]
    suffix = Path(urllib.parse.urlparse(link).path).suffix.lower()
    return Path(cache_dir) / f"{digest}{suffix if suffix in ('.jpg', '.jpeg', '.png', '.webp', '.gif') else '.img'}"


def verify_image(data: bytes) -> None:
    """Raise unless `data` decodes fully as an image with a non-empty size."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.width < 1 or img.height < 1:
            raise ValueError("empty image")


def _download(link: str, timeout_s: float, max_bytes: int) -> bytes:
    """Fetch with a per-read timeout and an overall deadline (a slow trickle counts as a timeout)."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(link, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {timeout_s}s")
            chunk = response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"image larger than {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _network_failure(exc: Exception) -> tuple[str, bool]:
    """(reason, worth retrying) for an exception raised while downloading."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"http {exc.code}", exc.code >= 500 or exc.code == 429
    text = str(getattr(exc, "reason", exc))
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "timeout", True
    if isinstance(exc, ValueError):
        return f"rejected ({exc})", False
    return f"unreachable ({text})"[:200], True


def fetch_images(links, cache_dir: Path, base_dir: Path, download: bool = True, workers: int = 32,
                 timeout_s: float = 10.0, retries: int = 2, retry_failed: bool = False,
                 max_bytes: int = 20_000_000, give_up_after: int = 64) -> tuple[dict[str, ImageResult], int]:
    """Resolve every distinct link to a verified local image or a failure reason.

    When the first `give_up_after` downloads all fail on the network (timeouts, unreachable host) the
    machine has no route to the image host: the remaining links are skipped at once, not recorded as
    failed, so a later run on a connected machine tries them. Without this a box with no internet
    would wait out every timeout (hours for 75k links).

    Returns ({link: ImageResult}, number of images downloaded by this call)."""
    cache_dir, base_dir = Path(cache_dir), Path(base_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    failed_path = cache_dir / "failed.json"
    failed: dict[str, str] = json.loads(failed_path.read_text()) if failed_path.exists() else {}
    lock = threading.Lock()
    downloaded = [0]  # network fetches that succeeded in this call
    network_failures = [0]  # downloads that failed on the network while none has succeeded yet

    def resolve(link: str) -> ImageResult:
        if not link or link.lower() in ("nan", "none"):
            return ImageResult(None, "skipped:no link")
        scheme = urllib.parse.urlparse(link).scheme.lower()
        if scheme in ("http", "https"):
            target = cache_path(cache_dir, link)
            if target.exists():
                return ImageResult(str(target), "cached")
            if link in failed and not retry_failed:
                return ImageResult(None, f"failed:{failed[link]} (earlier run)")
            if not download:
                return ImageResult(None, "skipped:not downloaded")
            if not downloaded[0] and network_failures[0] >= give_up_after > 0:
                return ImageResult(None, f"skipped:image host unreachable (the first {give_up_after} downloads failed)")
            reason = "unknown"
            for attempt in range(retries + 1):
                try:
                    data = _download(link, timeout_s, max_bytes)
                except Exception as exc:  # noqa: BLE001 - every failure becomes a counted reason
                    reason, retry = _network_failure(exc)
                    if retry and attempt < retries:
                        time.sleep(min(0.25 * 2 ** attempt, 2.0))
                        continue
                    break
                try:
                    verify_image(data)
                except Exception as exc:  # noqa: BLE001 - a corrupt file is not retried
                    reason = f"corrupt ({type(exc).__name__})"
                    break
                atomic_write_bytes(target, data)
                with lock:
                    downloaded[0] += 1
                    failed.pop(link, None)
                return ImageResult(str(target), "ok")
            with lock:
                failed[link] = reason
                if reason == "timeout" or reason.startswith("unreachable"):
                    network_failures[0] += 1
            return ImageResult(None, f"failed:{reason}")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(link).path)) if scheme == "file" else Path(link)
        if not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            return ImageResult(None, "failed:file not found")
        try:
            verify_image(path.read_bytes())
        except Exception as exc:  # noqa: BLE001
            return ImageResult(None, f"failed:corrupt ({type(exc).__name__})")
        return ImageResult(str(path.resolve()), "local")

    unique = list(dict.fromkeys(str(link) if link is not None else "" for link in links))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(progress(pool.map(resolve, unique), total=len(unique), desc="images", unit="img"))
    write_json(failed_path, failed)
    gave_up = sum(r.status.startswith("skipped:image host unreachable") for r in results)
    if gave_up:
        print(f"images: the first {give_up_after} downloads failed on the network and none succeeded; "
              f"{gave_up} further link(s) skipped (run again on a machine that reaches the image host)")
    return dict(zip(unique, results)), downloaded[0]
