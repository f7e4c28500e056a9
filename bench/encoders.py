"""Image-encoder throughput: extraction images/s (decoded tensors, and reading the bounded image
copies in the loop) and fine-tune samples/s, for an open_clip architecture with random weights;
and decode + transform images/s on one core, full-size product-like JPEGs against their copies.

    python -m bench.encoders model=ViT-L-14 batch_size=256                      # CLIP, one GPU
    python -m bench.encoders model=ViT-SO400M-14-SigLIP-384 batch_size=128      # SigLIP so400m
    python -m bench.encoders model=ViT-B-32 batch_size=8 steps=3 device=cpu     # a CPU smoke run
    python -m bench.encoders decode_only=true                                   # only the decode rows

The decoded-tensor rate is the reference the model rows are compared with in the same run; the
copy's decode rate is compared with the full-size one (data.prepare decodes each full-size image
once; every image stage then reads the copies). Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clip_finetune.model import ClipRegressor, freeze
from core.config import parse_args
from core.encode import ImageRows, image_loader
from core.errors import run_cli
from core.runtime import amp_dtype, autocast, pick_device
from data.images import bounded_copy


@dataclass
class EncoderBenchConfig:
    model: str = "ViT-L-14"  # open_clip architecture name (built with random weights, no download)
    batch_size: int = 256
    steps: int = 20  # timed batches per measurement (after 3 warm-up batches)
    num_workers: int = 8  # JPEG-decoding worker processes
    full_size: int = 1000  # longer side of the product-like JPEGs (product photos are about 1,000 px)
    decode_images: int = 48  # distinct images per decode round
    decode_rounds: int = 5  # rounds per decode measurement; the fastest counts
    decode_only: bool = False  # only the per-core decode rows: no model is built
    freeze_blocks: int = 12
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, n_items, steps, device, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return n_items * steps / (time.perf_counter() - t0)


def product_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A product photo's look: a plain light background, a shaded product with a printed label,
    sensor grain; about the size and entropy of a catalogue JPEG."""
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    left, top = int(width * rng.uniform(0.15, 0.3)), int(height * rng.uniform(0.08, 0.2))
    right, bottom = width - left, height - int(height * rng.uniform(0.05, 0.12))
    base = rng.integers(30, 220, 3)
    for y in range(top, bottom, 4):  # vertical shading
        shade = 0.7 + 0.3 * (y - top) / (bottom - top)
        draw.rectangle([left, y, right, y + 3], fill=tuple(int(c * shade) for c in base))
    label = [left + 20, (top + bottom) // 2 - 80, right - 20, (top + bottom) // 2 + 80]
    draw.rectangle(label, fill=(250, 250, 245))
    for line in range(6):  # lines of "text" on the label
        y = label[1] + 12 + line * 24
        x = label[0] + 15
        while x < label[2] - 30:
            w = int(rng.integers(8, 40))
            draw.rectangle([x, y, x + w, y + 12], fill=(20, 20, 20))
            x += w + int(rng.integers(6, 14))
    pixels = np.asarray(img, np.int16) + rng.normal(0, 3, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def catalogue(folder: Path, n: int, full_size: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(full-size JPEG paths, their bounded copies as data.prepare writes them)."""
    rng = np.random.default_rng(seed)
    originals, copies = [], []
    for i in range(n):
        data = product_jpeg(rng, int(full_size * rng.uniform(0.85, 1.0)), full_size)
        path = folder / f"{i}.jpg"
        path.write_bytes(data)
        copy, suffix = bounded_copy(data)
        (folder / f"{i}.copy{suffix}").write_bytes(copy)
        originals.append(str(path))
        copies.append(str(folder / f"{i}.copy{suffix}"))
    return originals, copies


class FullDecodeRows(ImageRows):
    """The reading path before the copies: every pixel of the original decoded, no JPEG draft mode."""

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), True, i


def decode_rate(paths: list[str], transform, size: int, rounds: int, rows_class=ImageRows) -> float:
    """Images per CPU second (torch limited to one thread), through the dataset code the image stages use."""
    rows = rows_class(paths, np.ones(len(paths), bool), transform, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows[0]  # warm-up
        best = float("inf")
        for _ in range(rounds):  # CPU time, best round: on a shared machine wall time measures the neighbours
            t0 = time.process_time()
            for i in range(len(rows)):
                rows[i]
            best = min(best, time.process_time() - t0)
        return len(rows) / best
    finally:
        torch.set_num_threads(threads)


def main(cfg: EncoderBenchConfig):
    import open_clip

    if cfg.decode_only:
        size = open_clip.get_model_config(cfg.model)["vision_cfg"]["image_size"]
        with tempfile.TemporaryDirectory() as tmp:
            originals, copies = catalogue(Path(tmp), cfg.decode_images, cfg.full_size)
            rates = decode_rates(originals, copies, open_clip.image_transform(size, is_train=False), size, cfg)
        return rates
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    clip, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    visual = clip.visual.to(device).eval()
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    pixels = torch.randn(cfg.batch_size, 3, size, size, device=device)

    def extract():
        with torch.no_grad(), autocast(device, dtype):
            visual(pixels)

    decoded = rate(extract, cfg.batch_size, cfg.steps, device)

    with tempfile.TemporaryDirectory() as tmp:
        n_files = max(cfg.batch_size * min(cfg.steps, 4), cfg.decode_images)
        originals, paths = catalogue(Path(tmp), n_files, cfg.full_size)
        per_core = decode_rates(originals[:cfg.decode_images], paths[:cfg.decode_images], preprocess, size, cfg)
        loader = image_loader(paths, np.ones(len(paths), bool), preprocess, size, cfg.batch_size, cfg.num_workers,
                              device)
        with torch.no_grad():
            next(iter(loader))  # start the workers once
            sync(device)
            t0 = time.perf_counter()
            for batch, _, _ in loader:
                with autocast(device, dtype):
                    visual(batch.to(device, non_blocking=True))
            sync(device)
            with_jpeg = len(paths) / (time.perf_counter() - t0)

    with torch.no_grad():
        dim = visual(pixels[:1]).shape[1]
    model = ClipRegressor(visual, dim, 512).to(device).train()
    freeze(model.visual, min(cfg.freeze_blocks, 10 ** 6), norms=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    target = torch.rand(cfg.batch_size, device=device)

    def train_step():
        with autocast(device, dtype):
            loss = (model(pixels).float() - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    finetune = rate(train_step, cfg.batch_size, cfg.steps, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"{cfg.model} at {size}px, {dim}-d, batch {cfg.batch_size}, device {name}, amp {dtype}")
    print(f"{'what':<44} {'images/s':>10} {'vs decoded':>11}")
    for what, value in (("extraction, decoded tensors", decoded),
                        (f"extraction, 448px copies, {cfg.num_workers} workers", with_jpeg),
                        (f"fine-tune step, first {cfg.freeze_blocks} blocks frozen", finetune)):
        print(f"{what:<44} {value:>10,.1f} {value / decoded:>10.2f}x")
    return {"decoded": decoded, "jpeg": with_jpeg, "finetune": finetune, **per_core}


def decode_rates(originals, copies, transform, size, cfg) -> dict:
    """Print and return the per-core decode + transform rates, full size against the copies."""
    full = decode_rate(originals, transform, size, cfg.decode_rounds, FullDecodeRows)
    full_draft = decode_rate(originals, transform, size, cfg.decode_rounds)
    copy = decode_rate(copies, transform, size, cfg.decode_rounds)
    sides = Image.open(originals[0]).size, Image.open(copies[0]).size
    print(f"decode + transform to {size}px on one core, {len(originals)} product-like JPEGs "
          f"(e.g. {sides[0][0]}x{sides[0][1]} -> copy {sides[1][0]}x{sides[1][1]})")
    print(f"{'what':<44} {'images/s':>10} {'vs full':>11}")
    for what, value in ((f"full-size JPEG, {cfg.full_size}px, full decode", full),
                        (f"full-size JPEG, {cfg.full_size}px, draft mode", full_draft),
                        ("bounded copy, 448px, draft mode (the stages)", copy)):
        print(f"{what:<44} {value:>10,.1f} {value / full:>10.2f}x")
    return {"decode_full_per_core": full, "decode_full_draft_per_core": full_draft, "decode_copy_per_core": copy}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(EncoderBenchConfig)))
