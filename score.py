"""Price new products with a trained pipeline root; nothing trains and nothing under the root changes.

    python -m pipeline root=R score=NEW.csv out=PRICES.csv
    python -m pipeline root=R score=NEW.csv out=PRICES.csv score_chunk_rows=10000 device=cpu
    python -m pipeline root=R score=NEW.csv out=PRICES.csv image_dir=IMAGES   # relative links read from IMAGES
    torchrun --nproc_per_node=4 -m pipeline root=R score=NEW.csv out=PRICES.csv   # encoding sharded

NEW.csv is in the competition's test format (`sample_id, catalog_content, image_link`). The profile
and settings come from R (pipeline_state.json records what its stages ran with); only placement
keys (device, batch sizes, workers) may be given. The file is validated in one streaming pass with
`data.prepare`'s checks, then priced `score_chunk_rows` rows at a time: each chunk is parsed like
the training rows, its images fetched, encoded by every trained encoder (the same weights the run's
test vectors came from), priced by every model and fold the ensemble blends, and blended with the
stored weights, scale and calibration (ensemble.blend.price_rows). A row's price depends on the
trained run and that row alone, so rows of R's own test file get R/test_out.csv's prices. Under
torchrun each chunk's encoding is sharded across the ranks like the extractors' (chunk i of the
cache by rank i % world_size); rank 0 parses, prices and writes.

Images: a relative `image_link` is read from the folder the trained run read its own links from (the
image root prepare.json records, or the run's raw_dir), not from NEW.csv's folder, so a slice of R's
test.csv saved anywhere finds the same images; `image_dir=` names another folder. When a clearly
larger share of the new rows has no usable image than the run had, a WARNING naming both shares goes
to stderr as soon as a chunk shows it and again with the summary (the prices are still written).

Scoring only reads R: it holds R's lock shared, so many scorings run together but none beside a
pipeline run training R (core.lock). The output's folder (created if missing) must take a file; that
is checked before anything loads. A write that fails (a full or read-only disk) stops with one line naming the
path and the reason: the unfinished chunk's scratch is removed, the finished chunks stay, and the
same command resumes from them (with none finished, no scratch is left).

Scratch (parsed rows, vectors, finished chunks' prices, fetched images) lives in PRICES.csv.scoring/
beside the output; a killed scoring resumes at the first unfinished chunk. PRICES.csv is written
once, checked against NEW.csv, when every chunk is priced; the finished chunks and vectors are then
removed (fetched images stay, for the next scoring of the same links).
"""
from __future__ import annotations

import dataclasses
import errno
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from core.config import ConfigError, field_types
from core.distributed import DistInfo, barrier, cleanup, init_distributed
from core.embedding_cache import mark_source_skipped, skipped_reason
from core.errors import PipelineError, disk_refusal_line
from core.fingerprints import STATE_FILE, describe_changes, file_digest, fingerprint, run_settings, version_changes
from core.io import atomic_save, check_writable, read_json, write_json
from core.runtime import pick_device, setup_logging
from core.submission import write_submission
from core.tables import META_FILE

SCORE_CHUNK_ROWS = 50_000
NOT_NEEDED = {"synthetic", "evaluate", "report"}  # stages a trained root may lack and still price rows
SCRATCH_SUFFIX = ".scoring"
# a WARNING when the new rows' share without a usable image exceeds the run's by both of these
IMAGE_SHARE_MARGIN, IMAGE_SHARE_RATIO = 0.10, 1.5


class ScoringError(PipelineError, ValueError):
    pass


def check_paths(root: Path, new_csv: Path, out: Path) -> None:
    """Refuse an output (or its scratch beside it) inside the trained root, and a missing input file."""
    if not new_csv.exists():
        raise ScoringError(f"score={new_csv}: file not found")
    base = root.resolve()
    for path in (out, Path(str(out) + SCRATCH_SUFFIX)):
        if path.resolve() == base or base in path.resolve().parents:
            raise ScoringError(f"out={out} lies inside the trained root {root}; scoring never writes into a trained run: "
                               "give an output outside it")


def image_share(has_image) -> float:
    """Share of rows without a usable image."""
    return float((~pd.Series(has_image, dtype=bool)).mean()) if len(has_image) else 0.0


def trained_image_root(prepare_cfg, data_meta: dict) -> Path:
    """The folder the trained run read relative image links from: the absolute image root its
    prepare.json records or, where that folder is gone (a copied root) or none is recorded, the run's
    image_dir (default raw_dir) as its settings give it under this root."""
    from data.prepare import image_root

    recorded = data_meta.get("image_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return image_root(prepare_cfg)


def trained_image_share(data_meta: dict, data_dir: Path) -> float:
    """The larger of the run's train and test shares of rows without a usable image (prepare.json's
    record, or its tables)."""
    recorded = data_meta.get("image_unusable_share")
    if isinstance(recorded, dict) and recorded:
        return max(float(v) for v in recorded.values())
    return max(image_share(pd.read_parquet(data_dir / f"{split}.parquet", columns=["has_image"])["has_image"])
               for split in ("train", "test"))


def image_warning(new_share: float, trained_share: float, image_root: Path, rows: int) -> str | None:
    """A WARNING line when clearly more new rows than trained rows lack a usable image, else None."""
    if new_share <= trained_share + IMAGE_SHARE_MARGIN or new_share <= IMAGE_SHARE_RATIO * trained_share:
        return None
    return (f"WARNING: {new_share:.0%} of {rows} new rows have no usable image against {trained_share:.0%} in the "
            f"trained run: their prices come from text alone and may be far off. Relative image links are read from "
            f"{image_root}; if the images lie elsewhere, give image_dir=FOLDER")


def check_trained_root(root: Path) -> None:
    if not (root / STATE_FILE).exists():
        raise ScoringError(f"{root} is not a trained pipeline root (no {STATE_FILE}); train one with "
                           f"`python -m pipeline profile=small raw_dir=DIR root={root}`")


def trained_settings(root: Path) -> tuple[str, list[str], dict]:
    """(profile, overrides, pipeline state) the root's stages ran with; a clear error when `root` is
    no trained root."""
    check_trained_root(root)
    state_path = root / STATE_FILE
    settings = run_settings(root)
    if settings is None:
        raise ScoringError(f"{state_path} does not say what the stages ran with; run `python -m pipeline profile=P "
                           f"root={root}` with the training overrides once (up-to-date stages are skipped)")
    return settings["profile"], settings["overrides"], read_json(state_path)


def placement_overrides(tokens: list[str]) -> list[str]:
    """Scoring takes its settings from the trained root: only placement keys may be given."""
    from core.stages import PLACEMENT

    bad = [t for t in tokens if t.partition("=")[0].split(".")[-1] not in PLACEMENT]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: scoring reads every setting from the trained root; only placement keys "
                          f"({', '.join(sorted(PLACEMENT))}) and score=, out=, score_chunk_rows=, image_dir= "
                          "may be given")
    return tokens


def check_complete(state: dict, stages, root: Path, profile: str, overrides: list[str]) -> None:
    command = " ".join(["python -m pipeline", f"profile={profile}", f"root={root}", *overrides])
    for stage in stages:
        if stage.name not in NOT_NEEDED and not state.get(stage.name, {}).get("complete"):
            raise ScoringError(f"{root}: stage {stage.name!r} has not finished, so the root cannot price rows; "
                               f"finish it with `{command}`")


def scratch_configs(cfgs: dict, work: Path) -> dict:
    """Each group's config reading and writing the chunk's own folders; what a stage loads from the
    trained run (out_dir, models) stays the root's."""
    folders = {"data_dir": work / "data", "embeddings_dir": work / "embeddings",
               "predictions_dir": work / "predictions", "split": "test"}
    out = {}
    for group, cfg in cfgs.items():
        fields = field_types(type(cfg))
        out[group] = dataclasses.replace(cfg, **{k: v for k, v in folders.items() if k in fields})
    return out


class Scorer:
    """A trained root, loaded once, that prices chunks of new rows."""

    def __init__(self, root: Path, placement: list[str], log, image_dir: Path | None = None):
        from core.stages import build_stages, stage_configs

        self.root, self.log = root, log
        self.profile, overrides, self.state = trained_settings(root)
        self.cfgs = stage_configs(self.profile, overrides + placement, root)
        check_complete(self.state, build_stages(self.cfgs, root, self.profile), root, self.profile, overrides)
        if changes := version_changes(root):
            log.warning("%s was trained with other package versions (%s); prices may differ from the run's own",
                        root, describe_changes(changes))
        ensemble = self.cfgs["ensemble"]
        self.record = read_json(Path(ensemble.predictions_dir) / "ensemble" / "ensemble.json")["blend"]
        data_dir = Path(self.cfgs["prepare"].out_dir)
        self.data_meta = read_json(data_dir / META_FILE)
        self.train_ids = set(pd.read_parquet(data_dir / "train.parquet", columns=["sample_id"])["sample_id"].astype(str))
        self.image_copies = Path(self.cfgs["prepare"].image_cache_dir or data_dir / "images")  # the run's copies
        self.image_root = image_dir or trained_image_root(self.cfgs["prepare"], self.data_meta)
        self.trained_image_share = trained_image_share(self.data_meta, data_dir)
        self._heads = self._fusion = None
        self.warned = False  # the image-share WARNING is printed once while pricing, again in the summary

    def key(self) -> str:
        """What a finished chunk's prices depend on besides its rows: every stage's print in the root."""
        return fingerprint({name: v.get("fingerprint") for name, v in self.state.items() if isinstance(v, dict)},
                           self.record, str(self.image_root))

    @property
    def heads(self):
        from heads.predict import load_run

        if self._heads is None:
            cfg = self.cfgs["heads"]
            self._heads = load_run(cfg.out_dir, str(pick_device(cfg.device)), cfg.chunk_size, self.log)
        return self._heads

    def fusion_folds(self, model: str):
        from fusion.inference import run_folds

        self._fusion = self._fusion or {}
        if model not in self._fusion:
            cfg = self.cfgs[model]
            self._fusion[model] = run_folds(Path(cfg.out_dir) / cfg.run_name, pick_device(cfg.device))
        return self._fusion[model]

    def prepare_rows(self, rows: pd.DataFrame, images: Path, work: Path) -> pd.DataFrame:
        """The chunk as the data stage writes a test table: parsed fields, image columns; written to
        work/data beside the root's train table (the extractors read both)."""
        from data.prepare import attach_images, parse_rows, resolve_images

        table = parse_rows(rows)
        # under the run's image rules; an image the run already copied is read from its copy, never fetched again
        results, _ = resolve_images(table["image_link"].astype(str).tolist(), self.cfgs["prepare"], images,
                                    self.image_root, reuse_dirs=[self.image_copies])
        attach_images(table, results)
        data = work / "data"
        data.mkdir(parents=True, exist_ok=True)
        train = data / "train.parquet"
        if not train.exists():
            try:
                train.symlink_to((Path(self.cfgs["prepare"].out_dir) / "train.parquet").resolve())
            except OSError:
                shutil.copyfile(Path(self.cfgs["prepare"].out_dir) / "train.parquet", train)
        atomic_save(lambda tmp: table.to_parquet(tmp, index=False), data / "test.parquet")
        write_json(data / META_FILE, {**self.data_meta, "scored_rows": len(table)})
        return table

    def encode(self, cfgs: dict) -> dict:
        """Write the chunk's vectors with every trained encoder; a source the run skipped is skipped
        here too. Returns the CLIP head's log predictions when the run has one ({} otherwise)."""
        from clip_finetune import extract_embeddings as clip_extract
        from qwen3_finetune import extract_embeddings as qwen_extract
        from siglip_extract import extract as siglip

        trained_emb = Path(self.cfgs["qwen"].embeddings_dir)
        out = {}

        def copy_skip(source) -> bool:
            reason = skipped_reason(trained_emb, source)
            if reason is not None:
                mark_source_skipped(cfgs["qwen"].embeddings_dir, source, reason)
            return reason is not None

        siglip_cfg = cfgs["siglip"]
        if not all([copy_skip(siglip_cfg.image_source), copy_skip(siglip_cfg.text_source)]):
            siglip.main(siglip_cfg)
            setup_logging("siglip_extract")  # closes its log file in the chunk's scratch, which goes when priced
        if not copy_skip(cfgs["clip"].source_name):
            written = clip_extract.main(cfgs["clip"], run_outputs=False)
            if "head_test_log" in written:
                out["clip_head"] = written["head_test_log"]
        qwen_extract.main(cfgs["qwen"])
        return out

    def price_chunk(self, rows: pd.DataFrame, images: Path, work: Path,
                    dist: DistInfo = DistInfo()) -> pd.DataFrame | None:
        """(sample_id, price, has_image) for one chunk of validated rows. Under torchrun every rank
        encodes its share of the chunk's rows and rank 0 prices them (the other ranks get None)."""
        from data.images import reason_of

        cfgs = scratch_configs(self.cfgs, work)
        if dist.is_main:
            table = self.prepare_rows(rows, images, work)
            missing = int((~table["has_image"]).sum())
            if missing:
                reasons = table.loc[~table["has_image"], "image_status"].map(reason_of).value_counts().head(5)
                self.log.info("%d of %d rows have no usable image (masked, as in training): %s", missing, len(table),
                              ", ".join(f"{k} {v}" for k, v in reasons.items()))
                warning = image_warning(missing / len(table), self.trained_image_share, self.image_root, len(table))
                if warning and not self.warned:
                    print(warning, file=sys.stderr, flush=True)
                    self.warned = True
        barrier(dist)  # the chunk's table is on disk for every rank's extractors
        logs = self.encode(cfgs)
        if not dist.is_main:
            return None
        return pd.DataFrame({"sample_id": table["sample_id"].astype(str).to_numpy(),
                             "price": price_encoded(cfgs, self.record, self.heads, self.fusion_folds, table, logs),
                             "has_image": table["has_image"].to_numpy(dtype=bool)})


def price_encoded(cfgs: dict, record: dict, heads_run, fusion_folds, table: pd.DataFrame, logs: dict):
    """The prices of `table`'s rows, whose vectors are cached under cfgs' folders (scratch_configs): the
    heads, the fusion models (fusion_folds(model): its trained folds) and the text head where the blend
    `record` needs them, blended. `logs`: log prices already made (the CLIP head's)."""
    from ensemble.blend import price_rows
    from fusion.predict_test import fold_mean_log as fusion_log
    from heads.predict import load_row_vectors, price_table, write_test_caches
    from qwen3_finetune.predict import MODEL_NAME as TEXT_HEAD, fold_mean_log as text_log
    from core.runtime import amp_dtype

    ids = table["sample_id"].astype(str).to_numpy()
    embeddings = Path(cfgs["heads"].embeddings_dir)
    heads, tabular = price_table(heads_run, table, load_row_vectors(heads_run, embeddings, "test", ids))
    logs = {**logs, **heads}
    write_test_caches(heads_run, embeddings, table, tabular)  # what the fusion models read beside the vectors
    for model in ("qwen_clip", "all_embeddings"):
        name = cfgs[model].run_name
        if name in record["models"]:
            logs[name] = fusion_log(cfgs[model], fusion_folds(model), list(ids), pick_device(cfgs[model].device))
    qwen = cfgs["qwen"]
    if TEXT_HEAD in record["models"]:
        device = pick_device(qwen.device)
        logs[TEXT_HEAD] = text_log(qwen, table, device, amp_dtype(device, qwen.precision))
    return price_rows(record, logs)


def score_file(root: Path, new_csv: Path, out: Path, chunk_rows: int = SCORE_CHUNK_ROWS,
               placement: list[str] | None = None, image_dir: Path | None = None) -> Path:
    """Price every row of `new_csv` with the trained root and write the checked `out`; see the module doc.
    `image_dir`: the folder relative image links are read from (default: the trained run's)."""
    from core.lock import hold_root

    root, new_csv, out = Path(root), Path(new_csv), Path(out)
    if chunk_rows < 1:
        raise ConfigError(f"score_chunk_rows={chunk_rows}: must be at least 1")
    check_paths(root, new_csv, out)
    if image_dir is not None and not Path(image_dir).is_dir():
        raise ScoringError(f"image_dir={image_dir}: no such folder")
    check_trained_root(root)
    check_writable(out.parent, "the output folder")  # in a second, before anything loads
    with hold_root(root, shared=True):  # many scorings at once, none beside a run that trains the root
        return score_held(root, new_csv, out, chunk_rows, placement or [],
                          Path(image_dir).resolve() if image_dir is not None else None)


def drop_unfinished(scratch: Path) -> int:
    """After a failed write: remove the unfinished chunks' scratch and, when no chunk finished and no
    fetched image is worth keeping, the whole scratch folder. Returns the finished chunks kept."""
    for work in scratch.glob("work_*"):
        shutil.rmtree(work, ignore_errors=True)
    finished = len(list((scratch / "chunks").glob("chunk_*.parquet")))
    if not finished and not any(p.name != "failed.json" for p in (scratch / "images").glob("*")):
        shutil.rmtree(scratch, ignore_errors=True)
    return finished


def write_failure(exc: OSError, scratch: Path) -> ScoringError | None:
    """One line for a file the disk refused (full, read-only, no permission), after dropping the
    unfinished chunk's scratch; None for any other error."""
    if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        exc = OSError(exc.errno, exc.strerror, str(scratch))  # a writer that did not say which file: the scratch
    line = disk_refusal_line(exc)
    if line is None:
        return None
    kept = drop_unfinished(scratch)
    left = (f"the {kept} finished chunk(s) in {scratch} are kept, and the same command resumes from them" if kept
            else "nothing was left behind")
    return ScoringError(f"{line.removeprefix('error: ')}; {left}")


def price_chunks(scorer: Scorer, new_csv: Path, scratch: Path, chunk_rows: int, n_rows: int, dist: DistInfo,
                 log) -> pd.DataFrame | None:
    """Every chunk's (sample_id, price, has_image), each chunk kept in the scratch once priced, so a
    later call with the same file, root and chunk size starts at the first unfinished one. Rank 0
    gets the rows; the other ranks None."""
    from data.prepare import competition_chunks

    chunks_dir, images = scratch / "chunks", scratch / "images"
    manifest = {"new_csv": file_digest(new_csv), "root": scorer.key(), "chunk_rows": chunk_rows}
    if dist.is_main:
        if (scratch / "scoring.json").exists() and read_json(scratch / "scoring.json") != manifest:
            log.info("%s belongs to another file, root, image folder or chunk size: starting over", scratch)
            shutil.rmtree(chunks_dir, ignore_errors=True)
            for work in scratch.glob("work_*"):
                shutil.rmtree(work, ignore_errors=True)
        chunks_dir.mkdir(parents=True, exist_ok=True)
        write_json(scratch / "scoring.json", manifest)
    barrier(dist)

    n_chunks = -(-n_rows // chunk_rows)
    parts = []
    for k, rows in enumerate(competition_chunks(new_csv, False, chunk_rows)):
        done = chunks_dir / f"chunk_{k:05d}.parquet"
        parts.append(done)
        if done.exists():
            log.info("chunk %d/%d: priced in an earlier call", k + 1, n_chunks)
            continue
        t_chunk = time.time()
        work = scratch / f"work_{k:05d}"
        prices = scorer.price_chunk(rows.drop(columns="line"), images, work, dist)
        if dist.is_main:
            atomic_save(lambda tmp: prices.to_parquet(tmp, index=False), done)
            shutil.rmtree(work, ignore_errors=True)
            log.info("chunk %d/%d: %d rows in %.1f s", k + 1, n_chunks, len(rows), time.time() - t_chunk)
        barrier(dist)  # every rank sees the chunk done before the next one starts
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if dist.is_main else None


def score_held(root: Path, new_csv: Path, out: Path, chunk_rows: int, placement: list[str],
               image_dir: Path | None) -> Path:
    """score_file's work, with the root's lock held."""
    from data.prepare import competition_records, raise_problems

    log = setup_logging("score")
    setup_logging("data.prepare")  # its warnings go to the console, never to a log file under the root
    t0 = time.time()
    scorer = Scorer(root, placement, log, image_dir)
    dist = init_distributed(scorer.cfgs["qwen"].device)  # under torchrun the extractors share this group

    # one streaming pass: every bad row named before any work, rows that trained the run counted
    problems, n_rows, in_train = [], 0, 0
    for record in competition_records(new_csv, False, problems):
        n_rows += 1
        in_train += record["sample_id"] in scorer.train_ids
    raise_problems(new_csv, problems, n_rows)
    if in_train and dist.is_main:
        log.warning("%d of %d rows of %s are training rows of %s: their prices are in-sample (the models saw "
                    "their prices), not estimates", in_train, n_rows, new_csv.name, root)
    if dist.is_main:
        log.info("relative image links are read from %s", scorer.image_root)

    scratch = Path(str(out) + SCRATCH_SUFFIX)
    try:
        priced = price_chunks(scorer, new_csv, scratch, chunk_rows, n_rows, dist, log)
        if priced is not None:
            write_submission(out, priced["sample_id"], priced["price"].to_numpy(), test_csv=new_csv)
    except OSError as exc:
        if (failure := write_failure(exc, scratch)) is None:
            raise
        raise failure from None
    if priced is None:
        cleanup(dist)
        return out
    shutil.rmtree(scratch / "chunks", ignore_errors=True)
    (scratch / "scoring.json").unlink(missing_ok=True)
    if not any(p.name != "failed.json" for p in (scratch / "images").glob("*")):  # no fetched image worth keeping
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.time() - t0
    share = image_share(priced["has_image"])
    log.info("wrote %s: %d rows priced with %s (profile %s) in %.1f s (%.0f rows/s); prices %.2f to %.2f; "
             "%.0f%% of rows without a usable image (the trained run: %.0f%%)", out, len(priced), root, scorer.profile,
             seconds, len(priced) / max(seconds, 1e-9), priced["price"].min(), priced["price"].max(), 100 * share,
             100 * scorer.trained_image_share)
    if warning := image_warning(share, scorer.trained_image_share, scorer.image_root, len(priced)):
        print(warning, file=sys.stderr, flush=True)
    cleanup(dist)
    return out


def parse_cli(argv: list[str]) -> dict:
    """score_file's arguments from `root=R score=NEW.csv out=PRICES.csv [score_chunk_rows=N] [image_dir=DIR]
    [placement keys]`; `profile` only if given (it must be the root's)."""
    own = ("root", "score", "out", "score_chunk_rows", "image_dir", "profile")
    options = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in own)
    missing = [k for k in ("root", "score", "out") if not options.get(k)]
    if missing:
        raise ConfigError(f"scoring needs {', '.join(f'{k}=' for k in missing)}: python -m pipeline root=R "
                          "score=NEW.csv out=PRICES.csv")
    try:
        chunk_rows = int(options.get("score_chunk_rows", SCORE_CHUNK_ROWS))
    except ValueError:
        raise ConfigError(f"score_chunk_rows={options['score_chunk_rows']!r}: expected a whole number") from None
    return {"root": Path(options["root"]), "new_csv": Path(options["score"]), "out": Path(options["out"]),
            "chunk_rows": chunk_rows, "placement": placement_overrides([a for a in argv if a.split("=", 1)[0] not in own]),
            "image_dir": Path(options["image_dir"]) if options.get("image_dir") else None,
            "profile": options.get("profile")}


def main(argv: list[str]) -> Path:
    """`python -m pipeline root=R score=NEW.csv out=PRICES.csv ...` (pipeline.py routes here)."""
    args = parse_cli(argv)
    profile, root = args.pop("profile"), args["root"]
    if profile and (recorded := run_settings(root)) and recorded["profile"] != profile:
        raise ConfigError(f"profile={profile}: {root} was trained with profile={recorded['profile']}; scoring reads "
                          "the profile from the root, leave it out")
    return score_file(**args)
