"""The embedding cache: what every encoder stage writes and fusion reads.

One folder per (source, split), `<root>/<source>/<split>/`:

    meta.json         source, modality (image|text|tabular), model, dim, dtype, rows, chunk size,
                      the config that made it, and `complete`
    sample_ids.npy    the ids, in row order
    embeddings.npy    float16 or float32 [N, D], readable memory-mapped
    present.npy       bool [N]: False where the input was missing (no usable image); such rows
                      hold zeros and are masked, never silently used
    chunks/           per-chunk arrays while extraction runs; a chunk is written atomically, so an
                      interrupted run resumes at the first missing chunk

Reading aligns rows to a given list of sample_ids and fails loudly on a missing or duplicated id,
a dimension mismatch, an incomplete cache, or NaN/Inf values.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.io import atomic_save, read_json, remove_stale_temps, write_json

MODALITIES = ("image", "text", "tabular")


class CacheError(PipelineError, RuntimeError):
    pass


def cache_dir(root: Path, source: str, split: str) -> Path:
    return Path(root) / source / split


def _ids_digest(ids) -> str:
    return hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()


class EmbeddingCacheWriter:
    """Chunked, resumable writer. Typical use:

        writer = EmbeddingCacheWriter(root, "clip_image", "train", ids, dim=768, modality="image", model=..., config=...)
        for chunk, start, stop in writer.pending_chunks():
            vectors, present = encode(rows[start:stop])
            writer.write_chunk(chunk, vectors, present)
        writer.finalize()

    An existing cache for other ids, dim, model or config is started afresh; one for the same
    inputs resumes. `rank`/`world_size` shard chunks across processes (chunk i goes to rank
    i % world_size); only one process calls `finalize`, after all have written.
    """

    def __init__(self, root: Path, source: str, split: str, sample_ids, dim: int, modality: str, model: str,
                 config: dict | None = None, dtype: str = "float16", chunk_size: int = 1024,
                 rank: int = 0, world_size: int = 1):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        self.dir = cache_dir(root, source, split)
        self.ids = np.asarray([str(i) for i in sample_ids])
        if len(set(self.ids.tolist())) != len(self.ids):
            raise CacheError(f"{self.dir}: duplicate sample_ids in the rows to encode")
        self.dim, self.dtype, self.chunk_size = int(dim), dtype, int(chunk_size)
        self.rank, self.world_size = rank, world_size
        self.meta = {"source": source, "split": split, "modality": modality, "model": model, "dim": self.dim,
                     "dtype": dtype, "rows": len(self.ids), "chunk_size": self.chunk_size,
                     "ids_sha1": _ids_digest(self.ids), "config": config or {}, "complete": False}
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            old = read_json(meta_path)
            same = all(old.get(k) == v for k, v in self.meta.items() if k != "complete")
            if same and old.get("complete"):
                self.meta["complete"] = True
                return
            if not same and rank == 0:
                shutil.rmtree(self.dir)  # made from other inputs: start afresh
        if rank == 0:
            (self.dir / "chunks").mkdir(parents=True, exist_ok=True)
            atomic_save(lambda tmp: np.save(tmp, self.ids), self.dir / "sample_ids.npy")
            write_json(meta_path, self.meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def n_chunks(self) -> int:
        return (len(self.ids) + self.chunk_size - 1) // self.chunk_size

    def _chunk_path(self, chunk: int) -> Path:
        return self.dir / "chunks" / f"{chunk:06d}.npz"

    def pending_chunks(self) -> list[tuple[int, int, int]]:
        """(chunk, start, stop) for this rank's chunks that are not on disk yet."""
        if self.complete:
            return []
        out = []
        for chunk in range(self.rank, self.n_chunks, self.world_size):
            if not self._chunk_path(chunk).exists():
                start = chunk * self.chunk_size
                out.append((chunk, start, min(start + self.chunk_size, len(self.ids))))
        return out

    def write_chunk(self, chunk: int, vectors, present=None) -> None:
        start = chunk * self.chunk_size
        stop = min(start + self.chunk_size, len(self.ids))
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (stop - start, self.dim):
            raise CacheError(f"{self.dir}: chunk {chunk} has shape {vectors.shape}, expected {(stop - start, self.dim)}")
        present = np.ones(stop - start, bool) if present is None else np.asarray(present, bool)
        vectors = np.where(present[:, None], vectors, 0.0)
        if not np.isfinite(vectors).all():
            bad = start + int(np.flatnonzero(~np.isfinite(vectors).all(1))[0])
            raise CacheError(f"{self.dir}: non-finite embedding for sample_id {self.ids[bad]} (row {bad})")
        (self.dir / "chunks").mkdir(parents=True, exist_ok=True)
        atomic_save(lambda tmp: np.savez(tmp, vectors=vectors.astype(self.dtype), present=present),
                    self._chunk_path(chunk))

    def finalize(self, extra_meta: dict | None = None) -> Path:
        """Join the chunks into embeddings.npy and present.npy and mark the cache complete."""
        if self.complete:
            return self.dir
        missing = [c for c in range(self.n_chunks) if not self._chunk_path(c).exists()]
        if missing:
            raise CacheError(f"{self.dir}: cannot finalize, {len(missing)} chunk(s) missing (first: {missing[0]})")
        present = np.zeros(len(self.ids), bool)

        def write_embeddings(tmp: Path) -> None:
            # written front to back, not through a memory map: a full disk is then an OSError, not a SIGBUS
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": False,
                      "shape": (len(self.ids), self.dim)}
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in range(self.n_chunks):
                    with np.load(self._chunk_path(chunk)) as z:
                        start = chunk * self.chunk_size
                        f.write(np.ascontiguousarray(z["vectors"], dtype=self.dtype).tobytes())
                        present[start:start + len(z["vectors"])] = z["present"]

        remove_stale_temps(self.dir / "embeddings.npy")  # an extraction killed while finalizing left one
        atomic_save(write_embeddings, self.dir / "embeddings.npy")
        atomic_save(lambda tmp: np.save(tmp, present), self.dir / "present.npy")
        shutil.rmtree(self.dir / "chunks", ignore_errors=True)
        self.meta.update(extra_meta or {}, complete=True, rows_missing_input=int((~present).sum()))
        write_json(self.dir / "meta.json", self.meta)
        return self.dir


@dataclass
class CachedEmbeddings:
    values: np.ndarray  # [N, D] float32, rows in the order asked for
    present: np.ndarray  # [N] bool
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


def read_meta(root: Path, source: str, split: str) -> dict:
    path = cache_dir(root, source, split) / "meta.json"
    if not path.exists():
        raise CacheError(f"no embedding cache at {path.parent} (source {source!r}, split {split!r}); run its extraction stage first")
    return read_json(path)


def load_embeddings(root: Path, source: str, split: str, sample_ids=None, expected_dim: int | None = None) -> CachedEmbeddings:
    """Read one cache, aligned to `sample_ids` when given (else in stored order)."""
    folder = cache_dir(root, source, split)
    meta = read_meta(root, source, split)
    if not meta.get("complete"):
        raise CacheError(f"{folder}: cache is incomplete (extraction was interrupted); rerun the extraction to resume it")
    values = np.load(folder / "embeddings.npy", mmap_mode="r")
    present = np.load(folder / "present.npy")
    ids = np.load(folder / "sample_ids.npy").astype(str)
    if values.shape != (len(ids), meta["dim"]):
        raise CacheError(f"{folder}: embeddings.npy has shape {values.shape}, meta says {(len(ids), meta['dim'])}")
    if expected_dim is not None and meta["dim"] != expected_dim:
        raise CacheError(f"{folder}: dimension {meta['dim']}, expected {expected_dim}")
    if sample_ids is None:
        order = np.arange(len(ids))
    else:
        position = {}
        for i, sid in enumerate(ids.tolist()):
            if sid in position:
                raise CacheError(f"{folder}: sample_id {sid} appears twice (rows {position[sid]} and {i})")
            position[sid] = i
        wanted = [str(s) for s in sample_ids]
        seen = set()
        for sid in wanted:
            if sid in seen:
                raise CacheError(f"{folder}: sample_id {sid} is asked for twice")
            seen.add(sid)
        missing = [sid for sid in wanted if sid not in position]
        if missing:
            raise CacheError(f"{folder}: {len(missing)} sample_id(s) not in the cache, e.g. {missing[:5]}")
        order = np.fromiter((position[s] for s in wanted), dtype=np.int64, count=len(wanted))
    out = np.asarray(values[order], dtype=np.float32)
    if not np.isfinite(out).all():
        row = int(order[np.flatnonzero(~np.isfinite(out).all(1))[0]])
        raise CacheError(f"{folder}: NaN or Inf in the embedding of sample_id {ids[row]} (row {row})")
    return CachedEmbeddings(values=out, present=present[order].astype(bool), meta=meta)


SKIPPED_FILE = "skipped.json"


def fold_source(source: str, fold: int) -> str:
    """The cache of a source written once per fold model (e.g. out-of-fold target encodings): the
    model scored on `fold` reads this one."""
    return f"{source}_fold{fold}"


def mark_source_skipped(root: Path, source: str, reason: str, config: dict | None = None) -> Path:
    """Record that a stage wrote no cache for `source` (e.g. no row has a usable image), so later
    stages leave the source out with a log line instead of failing or inventing vectors."""
    folder = Path(root) / source
    if folder.exists():
        shutil.rmtree(folder)
    write_json(folder / SKIPPED_FILE, {"source": source, "reason": reason, "config": config or {}})
    return folder


def skipped_reason(root: Path, source: str) -> str | None:
    """Why `source` has no cache, when its stage stepped aside; None when it was not skipped."""
    path = Path(root) / source / SKIPPED_FILE
    return read_json(path)["reason"] if path.exists() else None
