"""Time one training epoch of all_embeddings at the seed's dimensions (768, 1152, 1152, 1027).

    python -m bench.fusion_epoch                       # 60,000 rows, device auto
    python -m bench.fusion_epoch rows=12000 device=cpu

Compares, in the same run and with the same model: batches indexed directly from tensors on the
device (what fusion.train does) against a loop over DataLoader(TensorDataset) (the usual
reference). Reports achieved GFLOP/s of the training step (FLOPs counted by torch's FlopCounterMode)
against a plain matrix product of the size of the model's largest layer, timed in the same run.
Random embeddings: speed does not depend on their values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from core.config import parse_args
from core.errors import run_cli
from core.runtime import amp_dtype, autocast, pick_device
from fusion.all_embeddings.config import CONFIG
from core.losses import weighted_smape_loss
from fusion.models import SourceSpec, build_model, count_parameters


@dataclass
class BenchConfig:
    rows: int = 60_000
    batch_size: int = 256
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    dims: list[int] = None  # default: the seed's 768, 1152, 1152, 1027
    threads: int = 0  # CPU threads; 0 keeps torch's default


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, optimizer, device, dtype):
    def step(xs, ms, y):
        with autocast(device, dtype):
            pred, aux = model(xs, ms)
        loss = weighted_smape_loss(pred.float(), y) + aux.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def epoch_direct(step, xs, ms, y, batch_size, device):
    perm = torch.randperm(len(y), device=device)
    for start in range(0, len(y), batch_size):
        idx = perm[start:start + batch_size]
        step([x[idx] for x in xs], [m[idx] for m in ms], y[idx])


def epoch_dataloader(step, loader, n_sources, device):
    for batch in loader:
        batch = [t.to(device, non_blocking=True) for t in batch]
        step(batch[:n_sources], batch[n_sources:2 * n_sources], batch[-1])


def timed(fn, device, repeats=1):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(cfg: BenchConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = amp_dtype(device, cfg.precision)
    dims = cfg.dims or [768, 1152, 1152, 1027]
    modalities = ["image", "image", "text", "text"][: len(dims)]
    specs = [SourceSpec(f"s{i}", m, d) for i, (m, d) in enumerate(zip(modalities, dims))]
    torch.manual_seed(0)
    model = build_model(CONFIG, specs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, optimizer, device, dtype)
    n = cfg.rows
    xs = [torch.randn(n, d, device=device) for d in dims]
    ms = [torch.ones(n, dtype=torch.bool, device=device) for _ in dims]
    y = torch.log1p(torch.rand(n, device=device) * 100)
    model.train()

    with FlopCounterMode(display=False) as counter:
        idx = torch.arange(cfg.batch_size, device=device)
        step([x[idx] for x in xs], [m[idx] for m in ms], y[idx])
    flops_per_epoch = counter.get_total_flops() * (n / cfg.batch_size)

    direct = timed(lambda: epoch_direct(step, xs, ms, y, cfg.batch_size, device), device)
    cpu_tensors = [t.cpu() for t in (*xs, *ms, y)]
    loader = DataLoader(TensorDataset(*cpu_tensors), batch_size=cfg.batch_size, shuffle=True,
                        pin_memory=device.type == "cuda")
    reference = timed(lambda: epoch_dataloader(step, loader, len(dims), device), device)

    # plain matrix product the size of the largest layer (MoE expert input 4*512 -> 1024), same batch
    a = torch.randn(cfg.batch_size, 4 * CONFIG.hidden_dim, device=device)
    b = torch.randn(4 * CONFIG.hidden_dim, CONFIG.expert_dims[0], device=device)
    reps = 200 if device.type == "cuda" else 50

    def matmuls():
        with autocast(device, dtype):
            for _ in range(reps):
                a @ b
    mm_time = timed(matmuls, device, repeats=3)
    mm_gflops = 2 * a.shape[0] * a.shape[1] * b.shape[1] * reps / mm_time / 1e9

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    rows = [
        ("direct tensor indexing", direct, n / direct, flops_per_epoch / direct / 1e9),
        ("DataLoader(TensorDataset)", reference, n / reference, flops_per_epoch / reference / 1e9),
    ]
    print(f"all_embeddings, {count_parameters(model):,} parameters, dims {dims}, {n:,} rows, batch {cfg.batch_size}, "
          f"device {name}, amp {dtype}")
    print(f"{'what':<28} {'s/epoch':>9} {'samples/s':>11} {'GFLOP/s':>9} {'vs DataLoader':>14} {'vs matmul':>10}")
    for what, seconds, rate, gflops in rows:
        print(f"{what:<28} {seconds:>9.3f} {rate:>11,.0f} {gflops:>9.1f} {reference / seconds:>13.2f}x "
              f"{gflops / mm_gflops:>9.2f}")
    print(f"{'plain matmul ' + str(tuple(a.shape)) + 'x' + str(tuple(b.shape)):<28} {'':>9} {'':>11} {mm_gflops:>9.1f}")
    return {"direct_s": direct, "dataloader_s": reference, "matmul_gflops": mm_gflops,
            "model_gflops": flops_per_epoch / direct / 1e9}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args(BenchConfig)))
