"""Batched, resumable encoding into the embedding cache, shared by every encoder stage.

Images are the bounded copies `data.prepare` wrote (it decoded each original once); here they
are decoded and transformed in DataLoader worker processes, and the encoder runs batched under
autocast on the GPU. Rows are visited in the order of the cache's pending chunks, and a chunk is
written as soon as all its rows are encoded, so a killed extraction loses at most one chunk of work.

A copy that `data.prepare` wrote but that no longer decodes is never silent: it is masked
(present=False, blank pixels) like a missing image, counted, and logged with its sample_id and the
reason (`DecodeFailures`).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.embedding_cache import EmbeddingCacheWriter
from core.runtime import autocast, progress


def decode_failure(path) -> str | None:
    """Why the image at `path` cannot be used (the exception, in one line), or None when it decodes."""
    try:
        with Image.open(path) as img:
            img.convert("RGB")
        return None
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


class ImageRows(torch.utils.data.Dataset):
    """(pixels, present, row index) per row; a row without a usable image (has_image False, or a
    file that fails to decode) yields blank pixels and present=False."""

    def __init__(self, paths, has_image, transform, image_size: int):
        self.paths, self.has_image = list(paths), np.asarray(has_image, bool)
        self.transform, self.image_size = transform, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.has_image[i]:
            try:
                with Image.open(self.paths[i]) as img:
                    # a JPEG decodes at the smallest DCT scale still covering the input size (CLIP: 448 -> 224)
                    img.draft("RGB", (self.image_size, self.image_size))
                    return self.transform(img.convert("RGB")), True, i
            except (OSError, ValueError):
                pass  # masked here; DecodeFailures counts it and logs why
        return torch.zeros(3, self.image_size, self.image_size), False, i


class DecodeFailures:
    """Rows an ImageRows loader was told have an image but that came back masked. The loader's
    workers cannot report back, so the reason is read again here, once per failed row (few)."""

    def __init__(self):
        self.reasons: dict[int, str] = {}  # loader row -> reason

    def update(self, dataset: ImageRows, present, idx) -> None:
        for i, ok in zip(np.asarray(idx).tolist(), np.asarray(present, bool).tolist()):
            if not ok and dataset.has_image[i]:
                self.reasons[i] = decode_failure(dataset.paths[i]) or "failed while encoding, decodes now"

    def __len__(self):
        return len(self.reasons)


def describe_failures(reasons: dict[int, str], sample_ids, examples: int = 5) -> str:
    """'N image(s) failed to decode and are masked, e.g. id (reason), ...' for a log line."""
    ids = np.asarray(sample_ids)
    shown = "; ".join(f"{ids[i]} ({reason})" for i, reason in sorted(reasons.items())[:examples])
    return f"{len(reasons)} image(s) failed to decode and are masked (present=false), e.g. {shown}"


def image_loader(paths, has_image, transform, image_size, batch_size, num_workers, device, shuffle=False,
                 drop_last=False, sampler=None, seed: int = 0):
    """Batches of (pixels, present, row) from the bounded copies data.prepare wrote. A reading loader's
    workers stay up between passes; a training loader (`shuffle`) starts its workers each epoch, since a
    worker's random augmentations are seeded from the loader's generator when it starts, which the
    trainer reseeds per epoch: a resumed run then draws the same augmentations as an unbroken one."""
    dataset = ImageRows(paths, has_image, transform, image_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda",
                                       drop_last=drop_last, persistent_workers=num_workers > 0 and not shuffle,
                                       generator=generator)


def fill_cache(writer: EmbeddingCacheWriter, batches, desc: str) -> int:
    """Consume `batches` of (vectors [b, D], present [b]) for the writer's pending rows, in order,
    writing each chunk once complete. Returns the number of rows encoded."""
    pending = writer.pending_chunks()
    if not pending:
        return 0
    total = sum(stop - start for _, start, stop in pending)
    vec_buf, mask_buf, done = [], [], 0
    chunk_iter = iter(pending)
    chunk, start, stop = next(chunk_iter)
    bar = progress(total=total, desc=desc, unit="row")
    for vectors, present in batches:
        vec_buf.append(np.asarray(vectors, np.float32))
        mask_buf.append(np.asarray(present, bool))
        done += len(vectors)
        bar.update(len(vectors))
        while chunk is not None and sum(len(v) for v in vec_buf) >= stop - start:
            vecs, masks = np.concatenate(vec_buf), np.concatenate(mask_buf)
            n = stop - start
            writer.write_chunk(chunk, vecs[:n], masks[:n])
            vec_buf, mask_buf = [vecs[n:]], [masks[n:]]
            chunk, start, stop = next(chunk_iter, (None, None, None))
    bar.close()
    if chunk is not None:
        raise RuntimeError(f"{writer.dir}: encoder produced {done} rows, fewer than the {total} pending")
    return done


def pending_rows(writer: EmbeddingCacheWriter) -> np.ndarray:
    """Row indices of the writer's pending chunks, in writing order."""
    return np.concatenate([np.arange(start, stop) for _, start, stop in writer.pending_chunks()] or [np.zeros(0, int)])


def encode_image_batches(encode_fn, loader, device, dtype, failures: DecodeFailures | None = None):
    """Yield (vectors, present) per batch from an ImageRows loader; rows that failed to decode go
    to `failures` (their vectors are zeroed by the cache writer through `present`)."""
    with torch.no_grad():
        for pixels, present, idx in loader:
            if failures is not None:
                failures.update(loader.dataset, present.numpy(), idx.numpy())
            with autocast(device, dtype):
                vectors = encode_fn(pixels.to(device, non_blocking=True))
            yield vectors.float().cpu().numpy(), present.numpy()


def encode_text_batches(encode_fn, tokenize_fn, texts, batch_size, device, dtype):
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenize_fn(list(texts[start:start + batch_size]))
            with autocast(device, dtype):
                vectors = encode_fn(tokens.to(device))
            yield vectors.float().cpu().numpy(), np.ones(len(vectors), bool)
