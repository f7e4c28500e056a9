"""The image downloader against a local HTTP server on 127.0.0.1 (allowed as a private image host):
good, 404, slow, corrupt, re-run."""
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from data.images import fetch_images


def png_bytes(colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server():
    hits = Counter()
    good = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] += 1
            if self.path.startswith("/good"):
                body, status = good, 200
            elif self.path == "/slow.png":
                time.sleep(1.5)  # past the client's timeout
                body, status = good, 200
            elif self.path == "/corrupt.png":
                body, status = good[: len(good) // 2], 200
            elif self.path == "/flaky.png" and hits[self.path] == 1:
                body, status = b"busy", 503
            elif self.path == "/flaky.png":
                body, status = good, 200
            else:
                body, status = b"not found", 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_download_outcomes_and_rerun_downloads_nothing_twice(server, tmp_path):
    base, hits = server
    local = tmp_path / "local.png"
    local.write_bytes(png_bytes((1, 2, 3)))
    links = [f"{base}/good1.png", f"{base}/good2.jpg", f"{base}/good1.png", f"{base}/missing.png",
             f"{base}/slow.png", f"{base}/corrupt.png", f"{base}/flaky.png", f"file://{local}", "local.png", ""]
    kw = dict(copies_dir=tmp_path / "cache", image_root=tmp_path, workers=4, timeout_s=0.5, retries=1,
              allow_private_hosts=True)
    results, downloaded = fetch_images(links, **kw)
    status = {link: r.status for link, r in results.items()}
    assert status[f"{base}/good1.png"] == "ok" and status[f"{base}/good2.jpg"] == "ok"
    assert status[f"{base}/missing.png"] == "failed:http 404"
    assert status[f"{base}/slow.png"] == "failed:timeout"
    assert status[f"{base}/corrupt.png"].startswith("failed:corrupt")
    assert status[f"{base}/flaky.png"] == "ok"  # a 503 is retried
    # two links to one local file: one copy, made once
    assert sorted([status[f"file://{local}"], status["local.png"]]) == ["cached", "local"]
    assert results[f"file://{local}"].path == results["local.png"].path
    assert status[""] == "skipped:no link"
    assert downloaded == 3
    assert hits["/good1.png"] == 1  # a repeated link is fetched once
    assert hits["/missing.png"] == 1  # a 404 is not retried
    for link in (f"{base}/good1.png", f"{base}/good2.jpg", f"{base}/flaky.png"):
        Image.open(results[link].path).load()
    before = dict(hits)

    results2, downloaded2 = fetch_images(links, **kw)
    assert downloaded2 == 0 and dict(hits) == before  # nothing is requested again
    assert results2[f"{base}/good1.png"].status == "cached"
    assert results2[f"{base}/missing.png"].status.startswith("failed:http 404")

    results3, _ = fetch_images([f"{base}/missing.png"], retry_failed=True, **kw)
    assert hits["/missing.png"] == 2 and results3[f"{base}/missing.png"].status == "failed:http 404"


def test_no_download_mode_uses_only_the_cache(server, tmp_path):
    base, hits = server
    results, downloaded = fetch_images([f"{base}/good9.png"], tmp_path / "c", tmp_path, download=False)
    assert results[f"{base}/good9.png"].path is None and downloaded == 0 and not hits


def test_no_route_to_the_image_host_gives_up_early_and_records_nothing(tmp_path):
    """A port where nothing listens stands for a machine without internet: after the first few
    network failures the rest are skipped at once and left for a later run to try."""
    import socket

    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    links = [f"http://127.0.0.1:{port}/img{i}.jpg" for i in range(40)]
    results, downloaded = fetch_images(links, tmp_path / "cache", tmp_path, workers=1, timeout_s=1.0, retries=0,
                                       allow_private_hosts=True, give_up_after=5)
    statuses = [results[link].status for link in links]
    assert downloaded == 0
    assert all(s.startswith("failed:unreachable") for s in statuses[:5])
    assert all(s.startswith("skipped:image host unreachable") for s in statuses[5:])
    import json

    assert len(json.loads((tmp_path / "cache" / "failed.json").read_text())) == 5
