"""GPU check: one table of the figures a full run depends on, measured on this box with random weights.

    python -m bench.gpu_check                       # one H100/H200: under 8 minutes, no downloads
    python -m bench.gpu_check out=gpu_check.json    # also write the table as JSON
    python -m bench.gpu_check --smoke               # the same code on the CPU at tiny sizes (CI)

Rows, each with its peak GPU memory (torch.cuda.max_memory_allocated, reset before every row):
- CLIP ViT-L-14 and SigLIP so400m (ViT-SO400M-14-SigLIP-384) extraction images/s, from pixel tensors
  already on the device, and from the bounded copies (shortest side 448 px) of product-like JPEGs,
  decoded by DataLoader workers on every core (core.encode's image_loader and encode_image_batches,
  as the extraction stages run them); each model built with the activation and preprocessing of
  the stage's pretrained tag (QuickGELU for ViT-L-14 openai), its weights random;
- Qwen3-Embedding-0.6B (its published shape: 28 layers, hidden 1024, 16 heads of 128, 8 KV heads,
  MLP 3072, vocabulary 151,669) LoRA training tokens/s and MFU, plain bf16 LoRA and 4-bit QLoRA,
  built through qwen3_finetune.model (load_backbone, add_lora, PriceRegressor);
- qwen_extract rows/s (qwen3_finetune.model.run_rows on rows of catalog-like token lengths);
- fusion seconds per epoch of all_embeddings at 60,000 rows (bench.fusion_epoch's step and epoch).

MFU is 6 x parameters x tokens/s over the device's dense bf16 peak (989 TFLOP/s for H100 SXM and
H200), parameters being the backbone's less its embedding table (a lookup, no FLOPs). A LoRA step
computes no gradients for the frozen weights (about 4 x parameters per token), so the share of the
chip actually busy is about two thirds of the MFU shown. Every row is bounded (a fixed number of
timed steps after warm-up, each loop cut short past `row_seconds`) and rows not started within
`budget_seconds` are listed as skipped, so the check ends within 8 minutes; a row that fails
(bitsandbytes missing, out of memory) shows its error and the others still run.
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.encoders import catalogue
from bench.fusion_epoch import epoch_direct, make_step
from clip_finetune.config import CONFIG as CLIP_CONFIG
from core.config import parse_args
from core.encode import encode_image_batches, image_loader
from core.errors import PipelineError, run_cli
from core.io import write_json
from core.losses import get_loss
from core.open_clip_models import image_size_of, make_tiny_open_clip, model_id, trained_settings
from core.runtime import amp_dtype, autocast
from data.tiny_models import TINY_QWEN3
from fusion.all_embeddings.config import CONFIG as FUSION_CONFIG
from fusion.all_embeddings.config import PROFILES as FUSION_PROFILES
from fusion.models import SourceSpec, build_model
from qwen3_finetune.config import CONFIG as QWEN_CONFIG
from qwen3_finetune.model import PriceRegressor, add_lora, load_backbone, run_rows
from siglip_extract.config import CONFIG as SIGLIP_CONFIG

# Qwen3-Embedding-0.6B's config.json (the published model), shapes only: weights are random here
QWEN3_EMBEDDING_0_6B = dict(vocab_size=151_669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=32_768, rms_norm_eps=1e-6, tie_word_embeddings=True)
# the seed's cache widths: clip_image 768, siglip_image 1152, siglip_text 1152, qwen_text 1024 + 3
FUSION_DIMS = [768, 1152, 1152, 1027]
FUSION_MODALITIES = ["image", "image", "text", "text"]
# dense bf16 tensor-core peaks, first match on the device name; other devices get no MFU
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
                   ("H200", 989e12), ("A100", 312e12)]


@dataclass
class GpuCheckConfig:
    smoke: bool = False  # tiny models on the CPU, a few steps: checks the code, measures nothing
    # open_clip name and pretrained tag; the tag only sets activation and preprocessing, weights are random
    clip_model: str = CLIP_CONFIG.model
    clip_pretrained: str = CLIP_CONFIG.pretrained
    siglip_model: str = SIGLIP_CONFIG.model
    siglip_pretrained: str = SIGLIP_CONFIG.pretrained
    image_batch_size: int = SIGLIP_CONFIG.batch_size  # the extraction stages' batch
    image_steps: int = 20  # timed batches from tensors, after 3 warm-up batches
    full_size: int = 1000  # longer side of the product-like originals; the loader reads their 448 px copies
    jpeg_files: int = 64  # distinct copies written; the loader cycles over them (decode cost is per read)
    num_workers: int = 0  # JPEG-decoding workers; 0: every core this process may use
    qwen_batch_size: int = 32  # training rows per step, each qwen_seq_len tokens (no padding)
    qwen_seq_len: int = 256
    qwen_steps: int = 20  # timed training steps, after 3 warm-up steps
    qwen_checkpointing: bool = False  # gradient checkpointing in both modes
    extract_rows: int = 8192  # rows for qwen_extract, token lengths like the real catalog's
    fusion_rows: int = 60_000
    row_seconds: float = 30.0  # a row's warm-up, and its timed loop, stop early past this
    budget_seconds: float = 420.0  # rows not started by then are reported as skipped
    device: str = "cuda"
    out: str = ""  # also write the table as JSON here


CONFIG = GpuCheckConfig()
PROFILES = {
    "default": CONFIG,
    "smoke": replace(CONFIG, smoke=True, image_batch_size=4, image_steps=2, full_size=256, jpeg_files=4, num_workers=2,
                     qwen_batch_size=2, qwen_seq_len=16, qwen_steps=2, extract_rows=12, fusion_rows=512,
                     device="cpu"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(step, items_per_step: int, warmup: int, steps: int, max_seconds: float, device) -> float:
    """Items/s over `steps` calls of `step` after `warmup` calls; each loop stops early (after at least
    one call) once `max_seconds` have passed."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
        if time.perf_counter() - t0 > max_seconds:
            break
    sync(device)
    t0, done = time.perf_counter(), 0
    while done < steps:
        step()
        done += 1
        if time.perf_counter() - t0 > max_seconds:
            break
    sync(device)
    return items_per_step * done / (time.perf_counter() - t0)


def peak_bf16_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def build_image_model(name: str, pretrained: str | None, device):
    """(model, eval transform) with random weights, built with the activation and preprocessing the
    tag's weights were trained with (core.open_clip_models.trained_settings, as load_open_clip does).
    No tokenizer: SigLIP's would be a download."""
    import open_clip

    settings = trained_settings(name, pretrained) if pretrained else {}
    tagged = {} if not settings else dict(
        force_quick_gelu=settings["quick_gelu"], image_mean=settings["mean"], image_std=settings["std"],
        image_interpolation=settings["interpolation"], image_resize_mode=settings["resize_mode"])
    model, _, transform = open_clip.create_model_and_transforms(model_id(name), pretrained=None, device=device,
                                                                **tagged)
    return model.eval(), transform


def image_from_tensors(encode, size: int, cfg: GpuCheckConfig, device, dtype) -> dict:
    pixels = torch.randn(cfg.image_batch_size, 3, size, size, device=device)

    def step():
        with torch.no_grad(), autocast(device, dtype):
            encode(pixels)

    rate = timed_rate(step, cfg.image_batch_size, 3, cfg.image_steps, cfg.row_seconds, device)
    return {"rate": rate, "unit": "images/s"}


def image_from_jpegs(encode, transform, size: int, files: list[str], workers: int, cfg: GpuCheckConfig, device,
                     dtype) -> dict:
    """Steady-state rate: the first 2 x workers batches (worker start and the prefetched queue) are
    warm-up, the next 2 x workers are timed."""
    warmup = steps = max(2 * workers, 2)
    n = (warmup + steps) * cfg.image_batch_size
    paths = [files[i % len(files)] for i in range(n)]
    loader = image_loader(paths, np.ones(n, bool), transform, size, cfg.image_batch_size, workers, device)
    batches = encode_image_batches(encode, loader, device, dtype)
    try:
        rate = timed_rate(lambda: next(batches), cfg.image_batch_size, warmup, steps, cfg.row_seconds, device)
    finally:
        batches.close()  # stops the workers
    return {"rate": rate, "unit": "images/s"}


def qwen_train(model, params, cfg: GpuCheckConfig, n_params: int, device, dtype) -> dict:
    ids = torch.randint(1, model.backbone.config.vocab_size, (cfg.qwen_batch_size, cfg.qwen_seq_len), device=device)
    mask = torch.ones_like(ids)
    features = torch.randn(cfg.qwen_batch_size, 3, device=device)
    target = torch.rand(cfg.qwen_batch_size, device=device) * 5
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = get_loss(QWEN_CONFIG.loss)
    model.train()

    def step():  # as qwen3_finetune.train does it, one optimizer step per batch
        with autocast(device, dtype):
            pred = model(ids, mask, features)
        loss_fn(pred.float(), target).backward()
        torch.nn.utils.clip_grad_norm_(params, QWEN_CONFIG.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = cfg.qwen_batch_size * cfg.qwen_seq_len
    rate = timed_rate(step, tokens, 3, cfg.qwen_steps, cfg.row_seconds, device)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {"rate": rate, "unit": "tokens/s", "mfu": 6 * n_params * rate / peak if peak else None, "params": n_params,
            "peak_flops": peak}


def catalog_token_lengths(n: int, max_length: int) -> np.ndarray:
    """Token counts like the real catalog's (characters / 4 on the real train rows: median 160,
    quartiles 63 and 318, 12% past 512), truncated at `max_length` as the stage truncates them."""
    rng = np.random.default_rng(0)
    return np.clip(np.round(rng.lognormal(np.log(160), 1.0, n)), 8, max_length).astype(int)


def qwen_extract(model, cfg: GpuCheckConfig, max_length: int, device, dtype) -> dict:
    vocab = model.backbone.config.vocab_size
    rng = np.random.default_rng(1)
    lengths = catalog_token_lengths(cfg.extract_rows, max_length)
    token_ids = [rng.integers(1, vocab, k).tolist() for k in lengths]
    features = rng.normal(size=(cfg.extract_rows, 3)).astype(np.float32)
    chunk = min(QWEN_CONFIG.chunk_size, cfg.extract_rows)  # the stage calls run_rows once per cache chunk
    batch = QWEN_CONFIG.eval_batch_size
    run_rows(model, token_ids[:batch], features[:batch], batch, 0, device, dtype, want="embed")  # warm-up
    sync(device)
    t0, done = time.perf_counter(), 0
    for start in range(0, cfg.extract_rows, chunk):
        run_rows(model, token_ids[start:start + chunk], features[start:start + chunk], batch, 0, device, dtype,
                 want="embed")
        done = min(start + chunk, cfg.extract_rows)
        if time.perf_counter() - t0 > cfg.row_seconds:
            break
    sync(device)
    return {"rate": done / (time.perf_counter() - t0), "unit": "rows/s", "mean_tokens": float(lengths[:done].mean())}


def fusion_epoch(cfg: GpuCheckConfig, device, dtype) -> dict:
    fusion_cfg = FUSION_PROFILES["tiny"] if cfg.smoke else FUSION_CONFIG
    specs = [SourceSpec(name, modality, dim)
             for name, modality, dim in zip(fusion_cfg.sources, FUSION_MODALITIES, FUSION_DIMS)]
    torch.manual_seed(0)
    model = build_model(fusion_cfg, specs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=fusion_cfg.lr)
    step = make_step(model, optimizer, device, dtype)
    n, batch = cfg.fusion_rows, fusion_cfg.batch_size
    xs = [torch.randn(n, spec.dim, device=device) for spec in specs]
    ms = [torch.ones(n, dtype=torch.bool, device=device) for _ in specs]
    y = torch.log1p(torch.rand(n, device=device) * 100)
    warm = min(n, 10 * batch)
    epoch_direct(step, [x[:warm] for x in xs], [m[:warm] for m in ms], y[:warm], batch, device)
    sync(device)
    t0 = time.perf_counter()
    epoch_direct(step, xs, ms, y, batch, device)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"rate": n / seconds, "unit": "rows/s", "seconds_per_epoch": seconds}


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "peft", "bitsandbytes", "open_clip_torch", "timm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def format_value(row: dict) -> str:
    if row["error"]:
        return ""
    if "seconds_per_epoch" in row:
        return f"{row['seconds_per_epoch']:.2f} s/epoch"
    return f"{row['rate']:,.1f} {row['unit']}"


def format_row(row: dict) -> str:
    mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else ("n/a" if row["unit"] == "tokens/s" else "")
    peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a"
    text = f"{row['what']:<68} {format_value(row):>20} {mfu:>6} {peak:>9} {row['seconds']:>7.1f}"
    return text + (f"  error: {row['error']}" if row["error"] else "")


HEADER = f"{'row':<68} {'throughput':>20} {'MFU':>6} {'peak GiB':>9} {'s':>7}"


def run_row(table: dict, key: str, what: str, measure, device, deadline: float = float("inf")) -> dict:
    """Run one row from a clean slate (peak memory reset), print it, add it to `table`. A failure
    becomes the row's error, so the rows after it still run; past `deadline` (perf_counter) the row
    is skipped."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        if t0 > deadline:
            raise TimeoutError("skipped: the check is past its time budget (budget_seconds)")
        row = {"key": key, "what": what, "error": None, **measure()}
    except Exception as err:  # noqa: BLE001 - any failure is the row's result
        row = {"key": key, "what": what, "rate": None, "unit": "", "error": f"{type(err).__name__}: {err}"}
    row["seconds"] = time.perf_counter() - t0
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    table["rows"].append(row)
    print(format_row(row), flush=True)
    return row


def main(cfg: GpuCheckConfig) -> dict:
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("PRICE_NO_PROGRESS", "1")  # progress lines would bury the table
    hf_logging.disable_progress_bar()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"no CUDA device found (this torch {torch.__version__} was built for CUDA "
                            f"{torch.version.cuda}); `python -m bench.gpu_check --smoke` runs the tiny CPU check")
    if not cfg.smoke and not cfg.device.startswith("cuda"):
        raise PipelineError(f"device={cfg.device}: the full-size check needs a CUDA device; --smoke is the CPU check")
    device = torch.device(cfg.device)
    dtype = amp_dtype(device)
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {os.cpu_count()} cores"
    table = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_cores": workers,
             "amp": str(dtype), "smoke": cfg.smoke, "date": time.strftime("%Y-%m-%d"), "libraries": library_versions(),
             "rows": []}
    print(f"device {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {workers} decoding workers, "
          f"amp {dtype}{', smoke run (tiny models, CPU)' if cfg.smoke else ''}")
    print(", ".join(f"{k} {v}" for k, v in table["libraries"].items()))
    print(HEADER, flush=True)
    started = time.perf_counter()
    deadline = started + cfg.budget_seconds

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        # image encoders: one model per family, shared by its two rows
        (tmp / "jpeg").mkdir()
        _, jpegs = catalogue(tmp / "jpeg", cfg.jpeg_files, cfg.full_size)
        with Image.open(jpegs[0]) as img:
            copy_size = "x".join(map(str, img.size))
        for family, name, tag in (("clip", cfg.clip_model, cfg.clip_pretrained),
                                  ("siglip", cfg.siglip_model, cfg.siglip_pretrained)):
            label = f"tiny {family}" if cfg.smoke else f"{name} ({tag})"
            loaded = {}

            def model(family=family, name=name, tag=tag, loaded=loaded):
                if not loaded:
                    if cfg.smoke:
                        name, tag = str(make_tiny_open_clip(tmp / family, family)), None
                    loaded["model"], loaded["transform"] = build_image_model(name, tag, device)
                    # the CLIP stage encodes with the image tower, the SigLIP stage with encode_image
                    loaded["encode"] = loaded["model"].visual if family == "clip" else loaded["model"].encode_image
                    loaded["size"] = image_size_of(loaded["model"].visual)
                return loaded

            run_row(table, f"{family}_tensors", f"{label} extract, tensors on device, batch {cfg.image_batch_size}",
                    lambda: image_from_tensors(model()["encode"], model()["size"], cfg, device, dtype), device, deadline)
            run_row(table, f"{family}_jpeg", f"{label} extract, {copy_size} JPEG copies, {workers} workers",
                    lambda: image_from_jpegs(model()["encode"], model()["transform"], model()["size"], jpegs, workers,
                                             cfg, device, dtype), device, deadline)
            loaded.clear()

        # Qwen: one random model saved once, loaded through the training code in each mode
        shape = {**TINY_QWEN3, "vocab_size": 1000} if cfg.smoke else QWEN3_EMBEDDING_0_6B
        max_length = 64 if cfg.smoke else QWEN_CONFIG.max_length
        qwen = {}

        def qwen_folder():
            if not qwen:
                from transformers import AutoModel, Qwen3Config

                torch.manual_seed(0)
                base = AutoModel.from_config(Qwen3Config(**shape))
                qwen["params"] = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
                base.to(torch.bfloat16).save_pretrained(tmp / "qwen3")
                del base
                qwen["folder"] = str(tmp / "qwen3")
            return qwen

        label = "tiny Qwen3" if cfg.smoke else "Qwen3-Embedding-0.6B"
        for quantization in ("none", "4bit"):
            built = {}

            def regressor(quantization=quantization, built=built):
                if not built:
                    folder = qwen_folder()["folder"]
                    backbone = add_lora(load_backbone(folder, quantization, device, cfg.qwen_checkpointing),
                                        replace(QWEN_CONFIG, quantization=quantization))
                    built["model"] = PriceRegressor(backbone, shape["hidden_size"], QWEN_CONFIG.head_hidden,
                                                    QWEN_CONFIG.pooling)
                    built["model"].head.to(device)
                    built["params"] = [p for p in built["model"].parameters() if p.requires_grad]
                return built

            mode = "4-bit QLoRA" if quantization == "4bit" else f"LoRA {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
            run_row(table, f"qwen_train_{quantization}",
                    f"{label} {mode} train, {cfg.qwen_batch_size}x{cfg.qwen_seq_len} tokens",
                    lambda: qwen_train(regressor()["model"], regressor()["params"], cfg, qwen_folder()["params"],
                                       device, dtype), device, deadline)
            run_row(table, f"qwen_extract_{quantization}", f"{label} qwen_extract, {mode}, {cfg.extract_rows} rows",
                    lambda: qwen_extract(regressor()["model"], cfg, max_length, device, dtype), device, deadline)
            built.clear()

    run_row(table, "fusion_epoch", f"fusion all_embeddings epoch, {cfg.fusion_rows:,} rows",
            lambda: fusion_epoch(cfg, device, dtype), device, deadline)

    table["seconds"] = time.perf_counter() - started
    print()
    print(f"GPU check: {device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {table['date']}, "
          f"{table['seconds']:.0f} s in all")
    print(HEADER)
    for row in table["rows"]:
        print(format_row(row))
    if cfg.out:
        write_json(Path(cfg.out), table)
        print(f"wrote {cfg.out}")
    return table


def parse(argv: list[str] | None = None) -> GpuCheckConfig:
    argv = sys.argv[1:] if argv is None else argv
    return parse_args(GpuCheckConfig, ["profile=smoke" if a == "--smoke" else a for a in argv], PROFILES)


if __name__ == "__main__":
    run_cli(lambda: main(parse()))
