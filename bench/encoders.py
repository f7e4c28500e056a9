"""Image-encoder throughput: extraction images/s (decoded tensors, and with JPEG decoding in the
loop) and fine-tune samples/s, for an open_clip architecture with random weights.

    python -m bench.encoders model=ViT-L-14 batch_size=256                      # CLIP, one GPU
    python -m bench.encoders model=ViT-SO400M-14-SigLIP-384 batch_size=128      # SigLIP so400m
    python -m bench.encoders model=ViT-B-32 batch_size=8 steps=3 device=cpu     # a CPU smoke run

The decoded-tensor rate is the reference the other rows are compared with in the same run.
Weights are random: speed does not depend on their values.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clip_finetune.model import ClipRegressor, freeze
from core.config import parse_args
from core.encode import image_loader
from core.errors import run_cli
from core.runtime import amp_dtype, autocast, pick_device


@dataclass
class EncoderBenchConfig:
    model: str = "ViT-L-14"  # open_clip architecture name (built with random weights, no download)
    batch_size: int = 256
    steps: int = 20  # timed batches per measurement (after 3 warm-up batches)
    num_workers: int = 8  # JPEG-decoding worker processes
    jpeg_size: int = 512  # side of the synthetic JPEGs decoded in the loop
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


def main(cfg: EncoderBenchConfig):
    import open_clip

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
        rng = np.random.default_rng(0)
        n_files = cfg.batch_size * min(cfg.steps, 4)
        paths = []
        for i in range(n_files):
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (cfg.jpeg_size, cfg.jpeg_size, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        loader = image_loader(paths, np.ones(len(paths), bool), preprocess, size, cfg.batch_size, cfg.num_workers, device)
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
                        (f"extraction, {cfg.jpeg_size}px JPEG decode, {cfg.num_workers} workers", with_jpeg),
                        (f"fine-tune step, first {cfg.freeze_blocks} blocks frozen", finetune)):
        print(f"{what:<44} {value:>10,.1f} {value / decoded:>10.2f}x")
    return {"decoded": decoded, "jpeg": with_jpeg, "finetune": finetune}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(EncoderBenchConfig)))
