"""Seconds and peak memory of the CPU stages at full size, on synthetic catalogs of growing size.

    python -m bench.scale                                     # 8,000, 30,000 and 75,000 train rows
    python -m bench.scale sizes=8000,30000 work=/tmp/bench_scale profile=default [heads=ridge,knn] [key=value ...]
    python -m bench.scale sizes=8000,30000,75000 search_only=true   # prepare, TF-IDF, SVD, neighbour search only

For each size: a catalog of that many train rows and as many test rows in the competition format,
the demo's product rules (data.synthetic) with bullets drawn from the real rows' vocabulary
(../shared/real/train.csv: its words at their own frequencies), so the TF-IDF is as wide as a real
run's; `data.prepare` on it (no images); random vectors of the encoders' dimensions in place of the
caches (qwen_text 1024, siglip_text 1152, clip_image 768, siglip_image 1152; no encoder runs); then
the heads stage of `profile` piece by piece, each piece on its own line: the TF-IDF, its SVD, the
tabular cache, the neighbour search in each space (train rows), each head (out of fold), saving the
run and pricing the test rows (each space's neighbour search on the test rows its own line). Further
`key=value` tokens override the heads' config. Prints seconds and peak resident memory per piece
(the process's, sampled every 50 ms) and, per piece, the exponent of seconds against rows between the
smallest and the largest size. Fusion, the ensemble, the report and scoring are not timed here.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from bench import split_options
from bench.peak_memory import device_description

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULTS = {"sizes": "8000,30000,75000", "work": "/tmp/bench_scale", "profile": "default",
            "real": str(SHARED / "real" / "train.csv"), "search_only": "false"}  # its own options; the rest: heads keys
CACHE_DIMS = {"qwen_text": 1024, "siglip_text": 1152, "clip_image": 768, "siglip_image": 1152}


class PeakMemory:
    """The process's peak resident memory while a block runs (sampled from /proc/self/statm)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            if self._stop.wait(0.05):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def real_vocabulary(train_csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, their shares, words per row) of the real rows' catalog text."""
    text = pd.read_csv(train_csv, usecols=["catalog_content"])["catalog_content"].fillna("").astype(str)
    rows = [re.findall(r"[A-Za-z0-9][A-Za-z0-9'\-]*", t) for t in text]
    counts = Counter(w for r in rows for w in r)
    words = np.array(list(counts))
    shares = np.array([counts[w] for w in words], dtype=np.float64)
    return words, shares / shares.sum(), np.array([len(r) for r in rows])


def write_catalog(raw_dir: Path, n_train: int, n_test: int, vocabulary, seed: int = 0) -> Path:
    """train.csv and test.csv: the demo's rows (price rules, Value and Unit lines) with a description of
    real words, as many as a real row has; no images."""
    from data.synthetic import make_row

    words, shares, lengths = vocabulary
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        content, price, _ = make_row(rng)
        described = " ".join(rng.choice(words, size=int(rng.choice(lengths)), p=shares))
        name, _, rest = content.partition("\n")
        rows.append((str(100_000 + i), f"{name}\nProduct Description: {described}\n{rest}", "", round(price, 2)))
    frame = pd.DataFrame(rows, columns=["sample_id", "catalog_content", "image_link", "price"])
    raw_dir.mkdir(parents=True, exist_ok=True)
    frame.iloc[:n_train].to_csv(raw_dir / "train.csv", index=False)
    frame.iloc[n_train:].drop(columns="price").to_csv(raw_dir / "test.csv", index=False)
    return raw_dir


def write_random_caches(embeddings_dir: Path, data_dir: Path, seed: int = 0) -> None:
    from core.embedding_cache import EmbeddingCacheWriter
    from core.tables import load_table

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        ids = load_table(data_dir, split)["sample_id"].astype(str).to_numpy()
        for source, dim in CACHE_DIMS.items():
            modality = "image" if "image" in source else "text"
            writer = EmbeddingCacheWriter(embeddings_dir, source, split, ids, dim, modality, model="random",
                                          dtype="float32", chunk_size=len(ids))
            for chunk, start, stop in writer.pending_chunks():
                writer.write_chunk(chunk, rng.normal(size=(stop - start, dim)).astype(np.float32))
            writer.finalize()


def time_search(inputs, cfg, timed) -> None:
    """The neighbour search alone, neighbour_k neighbours in every space, train rows then test rows."""
    from core.tables import load_table
    from heads.features import available_sources, project
    from heads.neighbours import row_neighbours, train_neighbours

    test = load_table(cfg.data_dir, "test").reset_index(drop=True)
    test_ids = test["sample_id"].astype(str).to_numpy()
    test_sources = {s.name: s for s in available_sources(cfg, inputs.train_ids, test_ids, inputs.log)}
    test_tfidf = inputs.text.transform(test["text"].fillna("").astype(str))
    svd = inputs.text_svd(cfg.tfidf_neighbour_dims)
    spaces = {"tfidf": (inputs.tfidf_vectors, None, project(svd, test_tfidf), None),
              **{n: (s.train, s.train_present, test_sources[n].test, test_sources[n].test_present)
                 for n, s in inputs.sources.items()}}
    for space, (train, present, test_vectors, test_present) in spaces.items():
        timed(f"neighbour search, train rows, {space}", lambda: train_neighbours(
            train, inputs.folds, cfg.neighbour_k, present, inputs.device, cfg.chunk_size))
        timed(f"neighbour search, test rows, {space}", lambda: row_neighbours(
            test_vectors, train, inputs.folds, cfg.neighbour_k, present, test_present, inputs.device, cfg.chunk_size))


def time_heads(cfg, log, record, search_only: bool = False) -> None:
    """The heads stage of heads.train.main, piece by piece; record(piece, seconds, peak bytes).
    search_only: the TF-IDF, its SVD and the neighbour search in every space, no heads."""
    from core.tables import load_table
    from heads import train
    from heads.predict import RowFeatures, load_row_vectors, save_run

    def timed(piece, work):
        with PeakMemory() as memory:
            start = time.time()
            out = work()
            seconds = time.time() - start
        record(piece, seconds, memory.peak)
        return out

    inputs = timed("heads: load the tables and caches", lambda: (train.Inputs(cfg, log), None)[0])
    _ = timed("heads: TF-IDF", lambda: inputs.tfidf)
    _ = timed("heads: TF-IDF SVD (shared)", lambda: inputs.text_svd(cfg.tfidf_neighbour_dims))
    timed("heads: embedding sources", lambda: inputs.sources)
    if search_only:
        _ = timed("heads: train rows in the TF-IDF neighbour space", lambda: inputs.tfidf_vectors)
        return time_search(inputs, cfg, timed)
    if cfg.tabular_source:
        timed("heads: tabular cache", lambda: train.fit_tabular(inputs))
    spaces = sorted(inputs.run.search_k)
    for space in spaces:
        timed(f"heads: neighbour search, train rows, {space}", lambda: inputs.neighbours(space))
    oofs = {}
    for head in cfg.heads:
        oofs[head] = timed(f"heads: {head}", lambda: train.head_function(head)(inputs)[0])
    timed("heads: save the run", lambda: save_run(inputs.run, cfg.out_dir))
    test = load_table(cfg.data_dir, "test").reset_index(drop=True)
    ids = test["sample_id"].astype(str).to_numpy()
    priced = RowFeatures(inputs.run, test, load_row_vectors(inputs.run, cfg.embeddings_dir, "test", ids))
    for space in spaces:
        timed(f"heads: neighbour search, test rows, {space}", lambda: priced.neighbours(space))
    timed("heads: price the test rows (every head)", lambda: [priced.head(h) for h in cfg.heads])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from core.config import parse_args
    from core.metrics import format_table
    from core.runtime import setup_logging
    from data import prepare
    from data.config import PREPARE_PROFILES
    from dataclasses import replace
    from heads.config import PROFILES, HeadsConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = split_options(argv, DEFAULTS)
    sizes = [int(s) for s in opts["sizes"].split(",")]
    work = Path(opts["work"])
    log = setup_logging("bench.scale")
    vocabulary = real_vocabulary(Path(opts["real"]))
    print(f"vocabulary of the real rows: {len(vocabulary[0]):,} words, {np.mean(vocabulary[2]):.0f} per row",
          flush=True)
    rows = []
    for n in sizes:
        root = work / f"n{n}"

        def record(piece, seconds, peak):
            rows.append({"rows": n, "piece": piece, "seconds": round(seconds, 2), "peak_gib": round(peak / 2**30, 2)})
            print(f"[scale] {n:,} rows: {piece}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB", flush=True)

        with PeakMemory() as memory:
            start = time.time()
            raw = write_catalog(root / "raw", n, n, vocabulary)
            prep_cfg = replace(PREPARE_PROFILES["default"], raw_dir=raw, out_dir=root / "data", download_images=False)
            prepare.main(prep_cfg)
            seconds = time.time() - start
        record("prepare (with writing the catalog)", seconds, memory.peak)
        write_random_caches(root / "embeddings", root / "data")
        cfg = parse_args(HeadsConfig, [f"profile={opts['profile']}", f"data_dir={root / 'data'}",
                                       f"embeddings_dir={root / 'embeddings'}",
                                       f"predictions_dir={root / 'predictions'}", f"out_dir={root / 'heads'}", *rest],
                         PROFILES)
        total = time.time()
        time_heads(cfg, log, record, opts["search_only"] == "true")
        whole = "all of the above but prepare" if opts["search_only"] == "true" else "heads: the whole stage"
        record(whole, time.time() - total, max(r["peak_gib"] for r in rows if r["rows"] == n) * 2**30)
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index="piece", columns="rows", values=["seconds", "peak_gib"], sort=False)
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = wide[("seconds", large)] / wide[("seconds", small)]
            wide[("exponent", "")] = (np.log(ratio) / np.log(large / small)).round(2)
    wide.columns = [c if isinstance(c, str) else (f"{c[0]} {c[1]}" if c[1] != "" else c[0]) for c in wide.columns]
    print(f"\n{datetime.date.today().isoformat()}, {device_description()}, profile={opts['profile']} "
          f"{' '.join(rest)}; load average before the last size {os.getloadavg()[0]:.1f}")
    print(format_table(wide.reset_index(), floatfmt="{:.2f}"))
    work.mkdir(parents=True, exist_ok=True)
    table.to_csv(work / "scale.csv", index=False)
    return table


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(main)
