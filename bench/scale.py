"""Seconds and peak memory of every stage after the encoders at full size, on synthetic catalogs of growing size.

    python -m bench.scale                                     # 8,000, 30,000 and 75,000 train rows
    python -m bench.scale sizes=8000,30000 work=/tmp/bench_scale profile=default [heads=ridge,knn] [key=value ...]
    python -m bench.scale sizes=8000,30000,75000 search_only=true   # prepare, TF-IDF, SVD, neighbour search only

For each size: a catalog of that many train rows and as many test rows in the competition format,
the demo's product rules (data.synthetic) with bullets drawn from the real rows' vocabulary
(../shared/real/train.csv: its words at their own frequencies), so the TF-IDF is as wide as a real
run's; `data.prepare` on it (no images); random vectors of the encoders' dimensions in place of the
caches (qwen_text 1024, siglip_text 1152, clip_image 768, siglip_image 1152; no encoder runs); then,
with `profile`'s settings, each stage's own code: the heads stage piece by piece (heads.train's
pieces: the TF-IDF, its SVD, the tabular cache, each space's neighbour search on the train rows, each
head out of fold, saving the run, each space's search on the test rows, pricing them), both fusion
models (`fusion_epochs` epochs per fold; the default profile trains them on the GPU, so on a CPU this
is a per-epoch cost, not the stage's), evaluate, predict, the ensemble, the report, and scoring
`score_rows` test rows with the trained root (score.price_encoded: the heads, the fusion models and
the blend; the encoders' vectors are random, written as an encoder would). Further `key=value`
tokens go to every stage that has the key, `stage.key=value` to one stage (as in the pipeline).

Prints seconds and peak resident memory per piece (the process and its worker processes, sampled
every 50 ms) and, per piece, the exponent of seconds against rows between the smallest and the
largest size. `CPU stages` sums prepare, heads, the ensemble and the report: what runs on the CPU in
the default profile.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from bench import split_options
from bench.peak_memory import device_description

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULTS = {"sizes": "8000,30000,75000", "work": "/tmp/bench_scale", "profile": "default",
            "real": str(SHARED / "real" / "train.csv"), "search_only": "false", "fusion_epochs": "1",
            "score_rows": "2000"}  # its own options; the rest go to the stages
CACHE_DIMS = {"qwen_text": 1024, "siglip_text": 1152, "clip_image": 768, "siglip_image": 1152}
CPU_STAGES = ("prepare", "heads: the whole stage", "ensemble", "report")


def tree_rss(page: int) -> int:
    """Resident bytes of this process and every process below it (loky's workers)."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # a worker that ended while it was read
    return total


class PeakMemory:
    """Peak resident memory of the process and its workers while a block runs (sampled from /proc)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            self.peak = max(self.peak, tree_rss(page))
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


def write_random_caches(embeddings_dir: Path, ids_by_split: dict, seed: int = 0) -> None:
    """Every encoder's cache of each split's ids, filled with random vectors of its dimension."""
    from core.embedding_cache import EmbeddingCacheWriter

    rng = np.random.default_rng(seed)
    for split, ids in ids_by_split.items():
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


def time_search_only(cfg, log, timed) -> None:
    """The TF-IDF, its SVD and the neighbour search in every space, no heads."""
    from heads import train

    inputs = timed("heads: load the train table", lambda: train.Inputs(cfg, log))
    timed("heads: TF-IDF", lambda: inputs.tfidf)
    timed("heads: TF-IDF SVD (shared)", lambda: inputs.text_svd(cfg.tfidf_neighbour_dims))
    timed("heads: embedding sources", lambda: inputs.sources)
    timed("heads: train rows in the TF-IDF neighbour space", lambda: inputs.tfidf_vectors)
    time_search(inputs, cfg, lambda piece, work: timed(f"heads: {piece}", work))


def copy_caches(source_dir: Path, target_dir: Path, ids) -> None:
    """Every encoder's test cache of `ids`, copied: the vectors an encoder writes for the same rows."""
    from core.embedding_cache import EmbeddingCacheWriter, load_embeddings

    for source, dim in CACHE_DIMS.items():
        cached = load_embeddings(source_dir, source, "test", ids)
        writer = EmbeddingCacheWriter(target_dir, source, "test", ids, dim, cached.meta["modality"], model="random",
                                      dtype="float32", chunk_size=len(ids))
        for chunk, start, stop in writer.pending_chunks():
            writer.write_chunk(chunk, cached.values[start:stop], cached.present[start:stop])
        writer.finalize()


def time_scoring(cfgs: dict, rows: int, timed) -> Path:
    """Scoring the first `rows` test rows with the trained root, as score.py prices a chunk once its
    encoders have written the chunk's vectors (copied here from the test caches), in a scratch folder
    under the root. Writes the prices to <scratch>/prices.csv: the same as test_out.csv's for these rows."""
    from core.io import read_json
    from core.runtime import pick_device
    from core.tables import load_table
    from fusion.inference import run_folds
    from heads.predict import load_run
    from score import price_encoded, scratch_configs

    heads = cfgs["heads"]
    table = load_table(heads.data_dir, "test").iloc[:rows].reset_index(drop=True)
    ids = table["sample_id"].astype(str).to_numpy()
    work = Path(heads.out_dir).parent / "scoring"
    scratch = scratch_configs(cfgs, work)
    copy_caches(Path(heads.embeddings_dir), Path(scratch["heads"].embeddings_dir), ids)
    record = read_json(Path(cfgs["ensemble"].predictions_dir) / "ensemble" / "ensemble.json")["blend"]
    run = timed("scoring: load the heads run", lambda: load_run(heads.out_dir, str(pick_device(heads.device)),
                                                                heads.chunk_size))
    folds = timed("scoring: load the fusion folds", lambda: {
        m: run_folds(Path(cfgs[m].out_dir) / cfgs[m].run_name, pick_device(cfgs[m].device))
        for m in ("qwen_clip", "all_embeddings") if cfgs[m].run_name in record["models"]})
    prices = timed(f"scoring: price {len(table):,} rows (heads, fusion, blend)",
                   lambda: price_encoded(scratch, record, run, folds.__getitem__, table, {}))
    pd.DataFrame({"sample_id": ids, "price": prices}).to_csv(work / "prices.csv", index=False)
    return work / "prices.csv"


def run_size(n: int, root: Path, opts: dict, rest: list[str], vocabulary, log, record) -> None:
    """One catalog of n train and n test rows, through every stage after the encoders."""
    import pipeline
    from core.stages import build_stages, stage_configs
    from core.tables import load_table
    from heads import train as heads_train

    def timed(piece, work):
        with PeakMemory() as memory:
            start = time.time()
            out = work()
            seconds = time.time() - start
        record(piece, seconds, memory.peak)
        return out

    shutil.rmtree(root, ignore_errors=True)
    epochs = opts["fusion_epochs"]
    fusion = [f"{m}.{k}" for m in ("qwen_clip", "all_embeddings") for k in (f"epochs={epochs}", "device=auto")]
    cfgs = stage_configs(opts["profile"], [f"prepare.raw_dir={root / 'raw'}", "prepare.download_images=false",
                                           *fusion, *rest], root)
    stages = {s.name: s for s in build_stages(cfgs, root, opts["profile"])}
    timed("prepare (with writing the catalog)", lambda: (write_catalog(root / "raw", n, n, vocabulary),
                                                         stages["prepare"].run(cfgs["prepare"])))
    data = Path(cfgs["prepare"].out_dir)
    write_random_caches(Path(cfgs["heads"].embeddings_dir),
                        {split: load_table(data, split)["sample_id"].astype(str).to_numpy() for split in ("train", "test")})
    start = time.time()
    if opts["search_only"] == "true":
        time_search_only(cfgs["heads"], log, timed)
        return record("heads: all of the above", time.time() - start, None)
    heads_train.main(cfgs["heads"], timed=lambda piece, work: timed(f"heads: {piece}", work))
    record("heads: the whole stage", time.time() - start, None)
    for name in ("fusion_qwen_clip", "fusion_all"):
        stage = stages[name]
        label = f"{name} ({epochs} epoch{'s' * (epochs != '1')} per fold; the default profile's GPU stage)"
        timed(label, lambda: stage.run(replace(cfgs[stage.group], resume=False)))
    for name in ("evaluate", "predict", "ensemble"):
        timed(name, lambda: stages[name].run(cfgs[stages[name].group]))
    timed("report", lambda: pipeline.report(cfgs, root))
    time_scoring(cfgs, int(opts["score_rows"]), timed)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from core.metrics import format_table
    from core.runtime import setup_logging

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
        def record(piece, seconds, peak):
            if peak is None:  # the whole heads stage: the largest of its pieces' peaks
                peak = max(r["peak_gib"] for r in rows if r["rows"] == n and r["piece"].startswith("heads: ")) * 2**30
            rows.append({"rows": n, "piece": piece, "seconds": round(seconds, 2), "peak_gib": round(peak / 2**30, 2)})
            print(f"[scale] {n:,} rows: {piece}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB", flush=True)

        load = os.getloadavg()[0]
        run_size(n, work / f"n{n}", opts, rest, vocabulary, log, record)
        mine = [r for r in rows if r["rows"] == n]
        cpu = [r for r in mine if r["piece"].split(" (")[0] in CPU_STAGES]
        if opts["search_only"] != "true":
            record("CPU stages: prepare, heads, ensemble, report", sum(r["seconds"] for r in cpu),
                   max(r["peak_gib"] for r in cpu) * 2**30)
        print(f"[scale] {n:,} rows done; load average before it {load:.1f}", flush=True)
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index="piece", columns="rows", values=["seconds", "peak_gib"], sort=False)
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = wide[("seconds", large)] / wide[("seconds", small)]
            wide[("exponent", "")] = (np.log(ratio) / np.log(large / small)).round(2)
    wide.columns = [c if isinstance(c, str) else (f"{c[0]} {c[1]}" if c[1] != "" else c[0]) for c in wide.columns]
    print(f"\n{datetime.date.today().isoformat()}, {device_description()}, profile={opts['profile']} "
          f"{' '.join(rest)}")
    print(format_table(wide.reset_index(), floatfmt="{:.2f}"))
    work.mkdir(parents=True, exist_ok=True)
    table.to_csv(work / "scale.csv", index=False)
    return table


if __name__ == "__main__":
    from core.errors import run_cli

    run_cli(main)
