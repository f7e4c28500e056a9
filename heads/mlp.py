"""The mlp head: a small network on the LightGBM head's columns, trained on SMAPE of the price itself.

Trees and the network read the same columns (structure, SVD projections, neighbour prices, ridge
predictions, target encodings, all under the fold rule) but fit them differently, and a network can
learn the competition's metric directly instead of a loss on log price. On the real rows the two
errors differ enough that adding this head took the blend's nested figure 0.7 lower (BENCHMARKS.md).

Its twin `mlp_dist` is the same network with one output per bin of log price (the bins are the fitting
rows' quantiles), trained on cross-entropy against labels smoothed over neighbouring bins; a row's
price is the median of the predicted distribution. It is a weaker model alone but sees the price
as a distribution rather than a point, and the blend gains from it beside the others (BENCHMARKS.md).

Per fold model: the columns are turned into network inputs with statistics of the fitting rows only
(each categorical column one-hot on its known levels, a missing value filled with the median plus an
indicator, then a quantile map to a normal), and `mlp_seeds` networks are trained from different seeds
and averaged in log space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

MAX_LOG_PRICE = 20.0  # expm1 stays finite while the first steps wander


@dataclass
class InputTransform:
    """A fold's columns -> network inputs, fitted on that fold's fitting rows."""
    numeric: list[str]
    categories: dict  # {column: [known levels]}: one-hot, an unknown level is all zeros
    fill: np.ndarray  # the median of each numeric column
    indicated: np.ndarray  # the numeric columns (indices) that get a missing-value indicator
    quantiles: object  # sklearn QuantileTransformer

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        x = frame[self.numeric].to_numpy(dtype=np.float64)
        missing = np.isnan(x)
        onehots = [(frame[c].astype(str).to_numpy()[:, None] == np.asarray(levels)[None, :]).astype(np.float64)
                   for c, levels in self.categories.items()]
        return np.hstack([self.quantiles.transform(np.where(missing, self.fill, x)),
                          missing[:, self.indicated].astype(np.float64), *onehots])

    @classmethod
    def fit(cls, frame: pd.DataFrame, seed: int) -> "InputTransform":
        from sklearn.preprocessing import QuantileTransformer

        categorical = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        numeric = [c for c in frame.columns if c not in categorical]
        x = frame[numeric].to_numpy(dtype=np.float64)
        missing = np.isnan(x)
        fill = np.nan_to_num(np.nanmedian(np.where(missing.all(axis=0), 0.0, x), axis=0))
        quantiles = QuantileTransformer(n_quantiles=min(200, len(x)), output_distribution="normal",
                                        subsample=len(x) + 1, random_state=seed)
        quantiles.fit(np.where(missing, fill, x))
        return cls(numeric, {c: sorted(frame[c].astype(str).unique().tolist()) for c in categorical}, fill,
                   np.flatnonzero(missing.any(axis=0)), quantiles)


def build_net(n_inputs: int, hidden: int, dropout: float, n_outputs: int = 1):
    import torch.nn as nn

    return nn.Sequential(nn.Dropout(0.05), nn.Linear(n_inputs, hidden), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden // 2), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden // 2, n_outputs))


def smape_loss(log_pred, price, floor: float):
    """Mean SMAPE (0..2) of the prices behind `log_pred` (log1p, floored at `floor`) against `price`."""
    import torch

    pred = torch.expm1(log_pred.clamp(max=MAX_LOG_PRICE)).clamp_min(floor)
    return (2 * (pred - price).abs() / (pred + price.abs())).mean()


def price_bins(log_price: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, centres) of up to `bins` bins of log1p price holding about equal shares of the fitting
    rows (fewer where many rows share a price)."""
    edges = np.unique(np.quantile(log_price, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 3:
        raise ValueError(f"mlp_dist: the fitting rows hold {len(edges) - 1} distinct price bin(s); need at least 2")
    return edges, (edges[:-1] + edges[1:]) / 2


def soft_labels(log_price: np.ndarray, edges: np.ndarray, sigma: float) -> np.ndarray:
    """Per row, a gaussian over bin positions centred on the row's bin (`sigma` in bins), summing to 1."""
    n_bins = len(edges) - 1
    own = np.clip(np.searchsorted(edges, log_price, side="right") - 1, 0, n_bins - 1)
    labels = np.exp(-0.5 * ((np.arange(n_bins)[None, :] - own[:, None]) / sigma) ** 2)
    return labels / labels.sum(axis=1, keepdims=True)


def distribution_median(probs: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per row, the log price where the cumulative probability reaches one half, the cumulative at a bin's
    centre counting half of that bin's own mass and linear between centres."""
    at_centres = np.cumsum(probs, axis=1) - probs / 2
    return np.array([np.interp(0.5, c, centres) for c in at_centres])


@dataclass
class MLPFold:
    """One fold model: the input transform, the centre added to every output, and one state per seed.
    A distribution model (mlp_dist) also keeps its bin centres; its outputs are bin logits."""
    transform: InputTransform
    center: float  # the fitting rows' median log1p price
    hidden: int
    dropout: float
    states: list  # state_dicts (CPU tensors)
    centres: Optional[np.ndarray] = None  # log1p price of each bin's centre (mlp_dist); None: one output

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """log1p(price) per row: the mean of the seeds' networks (mlp_dist: the median of the seeds' mean
        distribution), in float64 so that a row's value does not depend on the rows priced with it."""
        import torch

        x = torch.from_numpy(self.transform(frame))
        n_outputs = 1 if self.centres is None else len(self.centres)
        outs = []
        with torch.no_grad():
            for state in self.states:
                net = build_net(x.shape[1], self.hidden, self.dropout, n_outputs).double()
                net.load_state_dict(state)
                net.eval()
                out = net(x)
                outs.append(out.squeeze(1).numpy() if self.centres is None else torch.softmax(out, dim=1).numpy())
        if self.centres is None:
            return np.mean(outs, axis=0) + self.center
        return distribution_median(np.mean(outs, axis=0), self.centres)


@dataclass
class FoldData:
    """A fold model's network inputs and targets, made once and shared by its seeds."""
    transform: InputTransform
    center: float
    floor: float
    x: np.ndarray  # [n, inputs] float32
    target: np.ndarray  # prices [n], or soft bin labels [n, bins] (distribution)
    centres: Optional[np.ndarray]


def fold_data(frame: pd.DataFrame, price: np.ndarray, cfg, distribution: bool = False) -> FoldData:
    transform = InputTransform.fit(frame, cfg.seed)
    centres, target = None, price.astype(np.float32)
    if distribution:
        edges, centres = price_bins(np.log1p(price), cfg.mlp_bins)
        target = soft_labels(np.log1p(price), edges, cfg.mlp_bin_sigma).astype(np.float32)
    return FoldData(transform, float(np.median(np.log1p(price))), float(price.min()),
                    transform(frame).astype(np.float32), target, centres)


def train_seed(data: FoldData, cfg, seed_offset: int, device: str = "cpu") -> dict:
    """One network from seed cfg.seed + seed_offset: its state dict (CPU, float64). Everything random is
    seeded here, so the result does not depend on what ran before it or beside it."""
    import torch

    # copies: a worker receives the arrays read-only (memory-mapped), which torch will not wrap
    x, target = torch.from_numpy(np.array(data.x)).to(device), torch.from_numpy(np.array(data.target)).to(device)
    steps_per_epoch = -(-len(x) // cfg.mlp_batch_size)
    torch.manual_seed(cfg.seed + seed_offset)
    order = torch.Generator().manual_seed(cfg.seed + seed_offset)
    n_outputs = 1 if data.centres is None else len(data.centres)
    net = build_net(x.shape[1], cfg.mlp_hidden, cfg.mlp_dropout, n_outputs).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.mlp_learning_rate, weight_decay=cfg.mlp_weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.mlp_learning_rate,
                                                   total_steps=cfg.mlp_epochs * steps_per_epoch)
    net.train()
    for _ in range(cfg.mlp_epochs):
        for batch in torch.randperm(len(x), generator=order).split(cfg.mlp_batch_size):
            batch = batch.to(device)
            out = net(x[batch])
            if data.centres is None:
                loss = smape_loss(out.squeeze(1) + data.center, target[batch], data.floor)
            else:
                loss = -(target[batch] * torch.log_softmax(out, dim=1)).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return {k: v.detach().cpu().double() for k, v in net.state_dict().items()}


def fold_model(data: FoldData, cfg, states: list) -> MLPFold:
    return MLPFold(data.transform, data.center, cfg.mlp_hidden, cfg.mlp_dropout, states, data.centres)


def fit_folds(frames: list, prices: list, cfg, device: str = "cpu", distribution: bool = False,
              n_jobs: int = 1) -> list[MLPFold]:
    """One fold model per (fitting rows' columns, prices) pair: `cfg.mlp_seeds` networks each, trained on
    SMAPE of the price or (`distribution`) on cross-entropy over `cfg.mlp_bins` bins of log price. Every
    (fold, seed) network is its own task, n_jobs at a time on the CPU (one at a time on a GPU)."""
    from heads.parallel import process_map

    data = [fold_data(frame, price, cfg, distribution) for frame, price in zip(frames, prices)]
    tasks = [(d, cfg, s, device) for d in data for s in range(cfg.mlp_seeds)]
    states = process_map(train_seed, tasks, n_jobs if device == "cpu" else 1)
    return [fold_model(d, cfg, states[i * cfg.mlp_seeds:(i + 1) * cfg.mlp_seeds]) for i, d in enumerate(data)]


def fit_fold(frame: pd.DataFrame, price: np.ndarray, cfg, device: str = "cpu", distribution: bool = False,
             n_jobs: int = 1) -> MLPFold:
    """One fold model (see fit_folds)."""
    return fit_folds([frame], [price], cfg, device, distribution, n_jobs)[0]
