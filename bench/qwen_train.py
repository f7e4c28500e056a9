"""Qwen3 LoRA training throughput: tokens/s and MFU, plain LoRA against 4-bit QLoRA in the same run.

    python -m bench.qwen_train                                  # Qwen3-0.6B architecture, random weights, GPU
    python -m bench.qwen_train layers=2 hidden=256 seq_len=128 batch_size=4 steps=3 device=cpu

Builds the architecture from a Qwen3Config (no download), saves it to a temporary folder and
loads it through the same `load_backbone` + LoRA path training uses, each mode in a fresh process
(so that each has its own peak memory). Model FLOPs per step are counted with torch's
FlopCounterMode on the plain-LoRA model (with gradient_checkpointing the recompute counts too); MFU
is that rate over `peak_tflops` (989 = H100 SXM dense bf16) and over a bf16 matrix product timed here.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import parse_args
from core.errors import run_cli
from core.runtime import amp_dtype, autocast, pick_device
from qwen3_finetune.config import CONFIG
from qwen3_finetune.model import PriceRegressor, add_lora, load_backbone


@dataclass
class QwenBenchConfig:
    layers: int = 28  # Qwen3-0.6B: 28 layers, hidden 1024, 16 heads, 8 KV heads, MLP 3072
    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128  # Qwen3 sets it apart from hidden / heads (1024 / 16 would be 64)
    intermediate: int = 3072
    vocab: int = 151_669
    seq_len: int = 256  # padded batch width (dynamic padding makes real batches about this long)
    batch_size: int = 32
    steps: int = 10
    gradient_checkpointing: bool = False
    modes: list[str] = None  # default: none (bf16 LoRA) and 4bit (QLoRA)
    peak_tflops: float = 989.0
    device: str = "auto"
    precision: str = "auto"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def time_mode(cfg: QwenBenchConfig, mode: str, folder: str, count_flops: bool) -> tuple:
    """(seconds per step, peak memory GiB, model FLOPs per step or None) for one mode, run in a fresh
    process so that its CPU peak (resident-set growth past the imports) is its own."""
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (cfg.batch_size, cfg.seq_len), device=device)
    mask = torch.ones_like(ids)
    feats = torch.randn(cfg.batch_size, 3, device=device)
    target = torch.rand(cfg.batch_size, device=device)
    baseline = peak_rss_gib()
    backbone = add_lora(load_backbone(folder, mode, device, cfg.gradient_checkpointing), replace(CONFIG, quantization=mode))
    model = PriceRegressor(backbone, cfg.hidden, 256, "last")
    model.head.to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with autocast(device, dtype):
            loss = (model(ids, mask, feats).float() - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(2):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / cfg.steps
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else peak_rss_gib() - baseline
    return seconds, memory, flops


def main(cfg: QwenBenchConfig):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from transformers import AutoModel, Qwen3Config

    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    config = Qwen3Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=max(4096, cfg.seq_len))
    modes = cfg.modes or ["none", "4bit"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(folder)
        flops_per_step = None
        for mode in modes:
            # the plain-LoRA model's FLOPs (4-bit matmuls are not counted by torch's counter) rate every mode
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                seconds, memory, flops = pool.submit(time_mode, cfg, mode, folder, flops_per_step is None).result()
            flops_per_step = flops_per_step or flops
            results[mode] = (seconds, memory)

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync(device)
    matmul_tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    print(f"Qwen3 {cfg.layers} layers x {cfg.hidden} ({n_params / 1e6:.0f}M params), LoRA r={CONFIG.lora_r}, "
          f"batch {cfg.batch_size} x {cfg.seq_len} tokens, checkpointing {cfg.gradient_checkpointing}, device {name}, amp {dtype}")
    print(f"model FLOPs per step {flops_per_step / 1e9:,.1f} GFLOP; {n}x{n} matmul here {matmul_tflops:.3f} TFLOP/s")
    print(f"{'mode':<22} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs matmul':>10} {'peak GiB':>9}")
    # MFU is against peak_tflops (a datasheet figure); 'vs matmul' against the product timed above
    tokens = cfg.batch_size * cfg.seq_len
    for mode, (seconds, memory) in results.items():
        tflops = flops_per_step / seconds / 1e12
        label = f"LoRA ({'bf16' if dtype == torch.bfloat16 else 'fp32'})" if mode == "none" else "4-bit QLoRA (NF4)"
        print(f"{label:<22} {seconds:>8.3f} {tokens / seconds:>10,.0f} {tflops:>8.2f} {tflops / cfg.peak_tflops:>6.1%} "
              f"{tflops / matmul_tflops:>9.1%} {memory:>9.2f}")
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(QwenBenchConfig)))
