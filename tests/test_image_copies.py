"""Each image is decoded at full size once, in data.prepare, into a bounded copy; every image stage
reads the copies, and a re-run decodes nothing again."""
import io
import shutil
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from clip_finetune import extract_embeddings, train
from clip_finetune.config import PROFILES as CLIP_PROFILES
from core.embedding_cache import load_embeddings
from core.io import read_json
from core.tables import load_table
from data import images, prepare, synthetic
from data.config import PrepareConfig, SyntheticConfig
from data.images import bounded_copy, fetch_images
from siglip_extract import extract
from siglip_extract.config import PROFILES as SIGLIP_PROFILES


def encoded(size, fmt, mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = np.clip(np.linspace(0, 255, size[0])[None, :, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size,fmt,copy_size,copy_format", [
    ((1000, 800), "JPEG", (560, 448), "JPEG"),  # shortest side to 448, aspect kept
    ((600, 1200), "PNG", (448, 896), "JPEG"),
    ((300, 200), "WEBP", (300, 200), "PNG"),  # small enough: decoded pixels kept losslessly
])
def test_copies_are_bounded_and_keep_the_aspect(size, fmt, copy_size, copy_format):
    data, suffix = bounded_copy(encoded(size, fmt))
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == copy_size and img.format == copy_format
        assert suffix == {"JPEG": ".jpg", "PNG": ".png"}[copy_format]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_small_jpeg_or_png_is_kept_byte_for_byte(fmt):
    data = encoded((64, 48), fmt)
    assert bounded_copy(data)[0] == data


def test_a_large_jpeg_is_decoded_in_draft_mode(monkeypatch):
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append((mode, size, self.size)) or real(self, mode, size))
    data, _ = bounded_copy(encoded((2000, 1000), "JPEG"))
    assert calls == [("RGB", (896, 448), (2000, 1000))]
    assert Image.open(io.BytesIO(data)).size == (896, 448)


def declared_size_png(width, height) -> bytes:
    """An 8x8 PNG whose header declares another size (its checksum made right)."""
    data = encoded((8, 8), "PNG")
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:12] + header + zlib.crc32(header).to_bytes(4, "big") + data[33:]


def test_a_file_that_does_not_decode_or_declares_too_many_pixels_is_refused():
    with pytest.raises(OSError):
        bounded_copy(encoded((900, 900), "JPEG")[:2000])
    with pytest.raises(ValueError, match="pixels"):
        bounded_copy(declared_size_png(8000, 8000))


def test_a_rerun_reuses_every_copy_and_a_changed_file_gets_a_new_one(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(encoded((700 + i, 500), "JPEG"))
    links = [f"{i}.jpg" for i in range(3)]
    first, _ = fetch_images(links, tmp_path / "copies", root, workers=2)
    assert {r.status for r in first.values()} == {"local"}
    opens = []
    real_open = Image.open
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    again, _ = fetch_images(links, tmp_path / "copies", root, workers=2)
    assert {r.status for r in again.values()} == {"cached"} and opens == []
    assert {link: r.path for link, r in again.items()} == {link: r.path for link, r in first.items()}
    (root / "1.jpg").write_bytes(encoded((900, 600), "JPEG"))  # new content under the old name
    changed, _ = fetch_images(links, tmp_path / "copies", root, workers=2)
    assert changed["1.jpg"].status == "local" and changed["1.jpg"].path != first["1.jpg"].path
    assert len(opens) == 1 and Image.open(changed["1.jpg"].path).size == (672, 448)
    assert not list((tmp_path / "copies").glob(".*.tmp"))  # no temporary file left behind


@pytest.fixture(scope="module")
def prepared_then_originals_removed(tmp_path_factory):
    """A catalog of 500 px images, prepared while counting decodes; then its images are deleted."""
    root = tmp_path_factory.mktemp("copies")
    raw = synthetic.main(SyntheticConfig(out_dir=root / "raw", n_train=120, n_test=40, seed=4, image_size=500))
    originals = {p.resolve() for p in (raw / "images").iterdir()}
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(fp)
        return real_open(fp, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "open", counting_open)
        prepare.main(PrepareConfig(raw_dir=raw, out_dir=root / "data", download_workers=2))
    shutil.rmtree(raw / "images")
    return root, originals, opened


def test_prepare_decodes_each_image_once_and_points_the_tables_at_the_copies(prepared_then_originals_removed):
    root, originals, opened = prepared_then_originals_removed
    assert len(opened) == len(originals)  # one decode per image file, corrupt ones included
    for split in ("train", "test"):
        table = load_table(root / "data", split)
        paths = table.loc[table["has_image"], "image_path"]
        assert len(paths) and all(Path(p).parent == (root / "data" / "images").resolve() for p in paths)
        assert all(min(Image.open(p).size) == 448 for p in paths)
    assert read_json(root / "data" / "prepare.json")["image_unusable_share"]["train"] > 0


def test_image_stages_run_on_the_copies_alone(prepared_then_originals_removed, tiny_models, tmp_path):
    root, _, _ = prepared_then_originals_removed
    data = root / "data"
    siglip = replace(SIGLIP_PROFILES["tiny"], model=str(tiny_models / "siglip_tiny"), data_dir=data,
                     embeddings_dir=tmp_path / "emb", num_workers=0)
    extract.main(siglip)
    clip = replace(CLIP_PROFILES["tiny"], model=str(tiny_models / "clip_tiny"), data_dir=data,
                   out_dir=tmp_path / "clip", embeddings_dir=tmp_path / "emb", predictions_dir=tmp_path / "pred",
                   num_workers=0, epochs=1)
    train.main(clip)
    extract_embeddings.main(clip)
    for split in ("train", "test"):
        table = load_table(data, split)
        for source in ("siglip_image", "clip_image"):
            cached = load_embeddings(tmp_path / "emb", source, split, table["sample_id"])
            np.testing.assert_array_equal(cached.present, table["has_image"].to_numpy())


def test_the_decode_benchmark_runs_on_product_like_jpegs_and_their_copies(capsys):
    from bench.encoders import EncoderBenchConfig, main

    rates = main(EncoderBenchConfig(model="ViT-B-32", decode_only=True, decode_images=4, decode_rounds=1))
    assert rates["decode_full_per_core"] > 0 and rates["decode_copy_per_core"] > 0
    out = capsys.readouterr().out
    assert "full-size JPEG, 1000px" in out and "bounded copy, 448px" in out and "-> copy 448x" in out
