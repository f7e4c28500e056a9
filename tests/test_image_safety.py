"""What an image link may reach: public hosts only (checked before connecting, on the address
connected to, and after each redirect), regular files inside the image root only, a bounded size and
time; every refusal masked and counted, never fatal."""
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from core.io import read_json
from core.tables import load_table
from data import images, prepare
from data.config import PrepareConfig
from data.images import fetch_images, is_public_address
from tests.test_images import png_bytes

PUBLIC = "93.184.216.34"  # a public address the fake network below routes to the local test server


@pytest.fixture
def server():
    hits = {}
    good = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            port = self.server.server_address[1]
            headers, body, status = {}, good, 200
            if self.path == "/to-loopback":
                status, body, headers = 302, b"", {"Location": f"http://127.0.0.1:{port}/good.png"}
            elif self.path == "/to-public":
                status, body, headers = 302, b"", {"Location": "/good.png"}
            elif self.path == "/loop":
                status, body, headers = 302, b"", {"Location": "/loop"}
            elif self.path == "/trickle":  # a byte every 0.1 s: each read is quick, the whole is not
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
                return
            elif self.path.startswith("/big"):
                body = b"\xff" * 50_000
                if self.path == "/big-unsized":  # no Content-Length: the body runs to the close
                    self.send_response(200)
                    self.end_headers()
                    try:
                        self.wfile.write(body)
                    except OSError:
                        pass
                    return
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake_internet(monkeypatch, server):
    """'shop.example' resolves to a public address that the network routes to the local server, as a
    real host would be reached; the address connected to is reported as that public one."""
    port, hits = server
    real_resolve, real_connect = images.resolve_host, socket.create_connection

    def resolve(host, p):
        return [PUBLIC] if host in ("shop.example", "rebind.example") else real_resolve(host, p)

    def dial(address, p, timeout):
        sock = real_connect(("127.0.0.1", p) if address == PUBLIC else (address, p), timeout=timeout)
        return sock, address  # what a connection across the internet would report

    monkeypatch.setattr(images, "resolve_host", resolve)
    monkeypatch.setattr(images, "dial", dial)
    return port, hits


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.9.9.9", False),
    ("169.254.169.254", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:8.8.8.8", True),
])
def test_only_public_addresses_count_as_public(address, public):
    assert is_public_address(address) is public


def test_private_hosts_are_refused_before_any_connection(monkeypatch, tmp_path):
    connects = []

    def no_connect(*args, **kwargs):
        connects.append(args)
        raise AssertionError("a connection was opened")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    links = ["http://127.0.0.1:1/x", "http://169.254.169.254/latest/meta-data/", "http://localhost:8080/a.jpg",
             "https://[::1]/a.jpg", "http://[::ffff:169.254.169.254]/latest/", "http://10.0.0.8/a.png",
             "http://0.0.0.0:9/a.png"]
    results, downloaded = fetch_images(links, tmp_path / "copies", tmp_path, workers=2, retries=2)
    assert {link: r.status for link, r in results.items()} == {link: "refused:private address" for link in links}
    assert connects == [] and downloaded == 0
    assert read_json(tmp_path / "copies" / "failed.json") == {}  # a refusal is a rule, not a failure to remember


def test_a_redirect_to_loopback_is_refused(fake_internet, tmp_path):
    port, hits = fake_internet
    links = [f"http://shop.example:{port}/good.png", f"http://shop.example:{port}/to-public",
             f"http://shop.example:{port}/to-loopback", f"http://shop.example:{port}/loop"]
    results, _ = fetch_images(links, tmp_path / "copies", tmp_path, workers=1, retries=0)
    status = [results[link].status for link in links]
    # the public host and its redirect to itself are fetched: the refusal below is the rule, not the stub
    assert status == ["ok", "ok", "refused:private address", "refused:too many redirects"]
    assert hits["/to-loopback"] == 1 and hits["/good.png"] == 2  # the loopback target was never requested
    assert hits["/loop"] == images.MAX_REDIRECTS + 1


def test_the_address_connected_to_is_checked_again(monkeypatch, server, tmp_path):
    """A host that resolves to a public address but whose connection lands on loopback (a rebinding
    or a hostile route) is dropped before a request is sent."""
    port, hits = server
    real_connect = socket.create_connection
    monkeypatch.setattr(images, "resolve_host", lambda host, p: [PUBLIC])
    monkeypatch.setattr(images, "dial", lambda address, p, timeout: (lambda s: (s, s.getpeername()[0]))(
        real_connect(("127.0.0.1", p), timeout=timeout)))
    results, _ = fetch_images([f"http://rebind.example:{port}/good.png"], tmp_path / "copies", tmp_path, retries=0)
    assert results[f"http://rebind.example:{port}/good.png"].status == "refused:private address"
    time.sleep(0.2)
    assert hits == {}


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_a_body_over_the_size_cap_is_refused(server, tmp_path, path):
    port, _ = server
    link = f"http://127.0.0.1:{port}{path}"
    results, _ = fetch_images([link], tmp_path / "copies", tmp_path, retries=0, max_bytes=10_000,
                              allow_private_hosts=True)
    assert results[link].status == "refused:too large" and results[link].path is None
    assert [p.name for p in (tmp_path / "copies").iterdir()] == ["failed.json"]


def test_a_trickling_download_stops_at_the_deadline(server, tmp_path):
    port, _ = server
    link = f"http://127.0.0.1:{port}/trickle"
    start = time.monotonic()
    results, _ = fetch_images([link], tmp_path / "copies", tmp_path, retries=0, timeout_s=1.0, allow_private_hosts=True)
    assert results[link].status == "failed:timeout"
    assert time.monotonic() - start < 4  # the server would trickle for 10 s


@pytest.fixture
def root_with_traps(tmp_path):
    """An image root holding a good image, a symlink out of the root, a FIFO and an over-size file;
    and a good image just outside the root."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "good.png").write_bytes(png_bytes())
    (tmp_path / "outside.png").write_bytes(png_bytes((1, 2, 3)))
    (root / "escape.png").symlink_to(tmp_path / "outside.png")
    (root / "inside-link.png").symlink_to(root / "good.png")
    os.mkfifo(root / "pipe.png")
    (root / "huge.png").write_bytes(png_bytes() + b"\0" * 5000)
    return root


def run_with_timeout(fn, seconds=20):
    """fn() in a thread; fail (instead of hanging the suite) when it does not return in time."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out["value"]


def test_local_links_are_read_only_as_regular_files_inside_the_root(root_with_traps, tmp_path):
    root = root_with_traps
    expected = {
        "good.png": "local", f"{root}/sub/../good.png": "cached", f"file://{root}/inside-link.png": "cached",
        "/etc/passwd": "refused:outside image root", "file:///etc/passwd": "refused:outside image root",
        "../outside.png": "refused:outside image root", "escape.png": "refused:outside image root",
        "/dev/zero": "refused:outside image root", "pipe.png": "refused:not a regular file",
        "sub": "refused:not a regular file", "huge.png": "refused:too large", "missing.png": "failed:file not found",
        "file://otherhost/etc/passwd": "refused:unsupported link",
        "ftp://example.com/a.png": "refused:unsupported link",
    }
    results, _ = run_with_timeout(lambda: fetch_images(list(expected), tmp_path / "copies", root, workers=1,
                                                       max_bytes=1000))
    assert {link: r.status for link, r in results.items()} == expected
    copies = {r.path for r in results.values() if r.path}
    assert len(copies) == 1 and Image.open(copies.pop()).getpixel((0, 0)) == (10, 200, 30)


def test_a_device_inside_the_root_is_refused_without_reading(tmp_path):
    """With /dev itself as the root, /dev/zero is inside it: refused as no regular file, not read
    until memory runs out."""
    results, _ = run_with_timeout(lambda: fetch_images(["/dev/zero", "zero", "null"], tmp_path / "copies", "/dev"))
    assert {r.status for r in results.values()} == {"refused:not a regular file"}


def test_prepare_masks_and_counts_refused_links_and_records_the_root(tmp_path):
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    (raw / "img" / "ok.png").write_bytes(png_bytes())
    os.mkfifo(raw / "img" / "pipe.png")
    traps = ["/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:1/x",
             "img/pipe.png", "/dev/zero", "img/missing.png", ""]
    links = traps + ["img/ok.png"] * 12
    rows = "".join(f'{i},"Item Name: thing {i}\nValue: {i + 1}\nUnit: Ounce",{link},{i + 2}\n'
                   for i, link in enumerate(links))
    (raw / "train.csv").write_text("sample_id,catalog_content,image_link,price\n" + rows)
    (raw / "test.csv").write_text("sample_id,catalog_content,image_link\nt1,Item Name: x,img/ok.png\nt2,,/etc/shadow\n")
    cfg = PrepareConfig(raw_dir=raw, out_dir=tmp_path / "out", download_workers=2)
    meta = run_with_timeout(lambda: prepare.main(cfg))
    assert meta["image_dir"] == str(raw.resolve())
    assert meta["image_unusable_reasons"] == {
        "train": {"refused:outside image root": 3, "refused:private address": 2, "refused:not a regular file": 1,
                  "failed:file not found": 1, "skipped:no link": 1},
        "test": {"refused:outside image root": 1}}
    assert meta["image_unusable_share"] == {"train": pytest.approx(8 / 20), "test": pytest.approx(0.5)}
    assert meta["empty_catalog_content"] == {"train": 0, "test": 1}
    train = load_table(tmp_path / "out", "train")
    assert train["has_image"].tolist() == [False] * 8 + [True] * 12
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "refused:private address': 2" in log and "empty catalog_content: 0 in train, 1 in test" in log
