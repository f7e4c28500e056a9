"""The stages: their order, the configs they run with, the checks on those settings, and what each
stage's result is keyed by. The pipeline runs these stages and scoring prices with them; neither
imports the other.

Listing the stages and checking their settings imports no torch: each stage's code is imported when
it runs, so a typo in a setting costs seconds.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError, field_types, parse_args, to_dict
from core.fingerprints import StagePrint, file_digest, portable, stage_print
from core.tables import META_FILE

ROOTS = {"tiny": Path("checkpoints/demo"), "small": Path("checkpoints/small"), "default": Path("checkpoints")}

# Fields no stage's result depends on: where it runs and how many rows pure inference takes at once.
PLACEMENT = {"device", "resume", "num_workers", "eval_batch_size", "extract_batch_size", "text_batch_size", "chunk_size"}
# Fields only the extraction (or prediction) half of a group reads: its training stage ignores them.
EXTRACTION_ONLY = {
    "clip": {"split", "use_finetuned", "wise_alpha", "embeddings_dir", "source_name", "storage_dtype"},
    "qwen": {"split", "embeddings_dir", "source_name", "storage_dtype", "predictions_dir"},
    "qwen_clip": {"predictions_dir"},
    "all_embeddings": {"predictions_dir"},
}
# Fields only the training half of a group reads: an extraction from the frozen base encoder
# (qwen.finetune=false, clip.use_finetuned=false) ignores them, and its training stage.
TRAINING_ONLY = {
    "clip": {"out_dir", "run_name", "loss", "l1_warmup_epochs", "epochs", "batch_size", "lr_backbone", "lr_head",
             "weight_decay", "warmup_steps", "freeze_blocks", "freeze_norms", "head_hidden", "grad_clip",
             "early_stopping_patience", "selection_fraction", "encoder_folds", "seed", "wise_alpha"},
    "qwen": {"out_dir", "run_name", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "gradient_checkpointing",
             "head_hidden", "loss", "l1_warmup_epochs", "epochs", "batch_size", "grad_accum", "lr", "head_lr",
             "weight_decay", "warmup_ratio", "grad_clip", "early_stopping_patience", "selection_fraction",
             "encoder_folds", "seed"},
}


# ---------------------------------------------------------------- configs

def root_overrides(root: Path, demo: bool) -> list[str]:
    """Put every stage's outputs (and, for the demo, its catalog and tiny models) under `root`."""
    tokens = [f"prepare.out_dir={root / 'data'}", f"tiny_models.out_dir={root / 'models'}",
              f"tiny_models.data_dir={root / 'data'}"]
    if demo:
        tokens += [f"synthetic.out_dir={root / 'raw'}", f"prepare.raw_dir={root / 'raw'}",
                   f"siglip.model={root / 'models' / 'siglip_tiny'}", f"clip.model={root / 'models' / 'clip_tiny'}",
                   f"qwen.model={root / 'models' / 'qwen3_tiny'}"]
    for group in ("siglip", "clip", "qwen", "qwen_clip", "all_embeddings", "heads"):
        tokens += [f"{group}.data_dir={root / 'data'}", f"{group}.embeddings_dir={root / 'embeddings'}"]
    for group in ("clip", "qwen", "qwen_clip", "all_embeddings", "heads", "ensemble"):
        tokens.append(f"{group}.predictions_dir={root / 'predictions'}")
    tokens += [f"clip.out_dir={root / 'clip_finetune'}", f"qwen.out_dir={root / 'qwen3_finetune'}",
               f"heads.out_dir={root / 'heads'}",
               f"qwen_clip.out_dir={root / 'fusion'}", f"all_embeddings.out_dir={root / 'fusion'}",
               f"ensemble.data_dir={root / 'data'}", f"ensemble.output={root / 'test_out.csv'}"]
    return tokens


def pick_profile(profiles: dict, name: str):
    """A group's instance for `name`; groups without their own (e.g. `small`) start from `default`."""
    return {**profiles, name: profiles.get(name, profiles["default"])}


def config_specs() -> dict:
    """{group: (config class, its profiles)} for every group a stage runs with."""
    from clip_finetune.config import PROFILES as CLIP, ClipConfig
    from data.config import PREPARE_PROFILES, SYNTHETIC_PROFILES, PrepareConfig, SyntheticConfig
    from data.tiny_models import TinyModelsConfig
    from ensemble.config import PROFILES as ENSEMBLE, EnsembleConfig
    from fusion.config import FusionConfig, model_profiles
    from heads.config import PROFILES as HEADS, HeadsConfig
    from qwen3_finetune.config import PROFILES as QWEN, QwenConfig
    from siglip_extract.config import PROFILES as SIGLIP, SiglipConfig

    return {
        "synthetic": (SyntheticConfig, SYNTHETIC_PROFILES),
        "prepare": (PrepareConfig, PREPARE_PROFILES),
        "tiny_models": (TinyModelsConfig, {"default": TinyModelsConfig()}),
        "siglip": (SiglipConfig, SIGLIP),
        "clip": (ClipConfig, CLIP),
        "qwen": (QwenConfig, QWEN),
        "qwen_clip": (FusionConfig, model_profiles("qwen_clip")),
        "all_embeddings": (FusionConfig, model_profiles("all_embeddings")),
        "heads": (HeadsConfig, HEADS),
        "ensemble": (EnsembleConfig, ENSEMBLE),
    }


def stage_configs(profile: str, overrides: list[str], root: Path | None = None) -> dict:
    """Each stage's resolved config, with overrides routed by key (or by `stage.key`), checked by `validate`."""
    if profile not in ROOTS:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(ROOTS)}")
    root = Path(root) if root else ROOTS[profile]
    overrides = root_overrides(root, profile == "tiny") + list(overrides)
    specs = config_specs()
    routed: dict[str, list[str]] = {name: [] for name in specs}
    for token in overrides:
        key, sep, value = token.partition("=")
        if not sep:
            raise ConfigError(f"argument {token!r} is not key=value; `python -m pipeline --help` lists the keys")
        if "." in key:
            group, field = key.split(".", 1)
            if group not in specs:
                raise ConfigError(f"{token!r}: no stage group {group!r}; groups: {', '.join(specs)}")
            routed[group].append(f"{field}={value}")
            continue
        takers = [g for g, (cls, _) in specs.items() if key in field_types(cls)]
        if not takers:
            raise ConfigError(f"unknown key {key!r} for every stage; use stage.key=value with a stage from {', '.join(specs)}")
        for group in takers:
            routed[group].append(token)
    cfgs = {}
    for group, (cls, profiles) in specs.items():
        try:
            cfgs[group] = parse_args(cls, [f"profile={profile}", *routed[group]], pick_profile(profiles, profile))
        except ConfigError as exc:  # say which group refused it
            raise ConfigError(f"{group}: {exc}") from None
    # the caches whose encoder trained on (and chose its checkpoint with) the non-holdout folds; with one
    # encoder per fold (encoder_folds=all) every row's vector comes from an encoder that never saw it
    qwen, clip = cfgs["qwen"], cfgs["clip"]
    finetuned = ([qwen.source_name] * (qwen.finetune and qwen.encoder_folds != "all")
                 + [clip.source_name] * (clip.use_finetuned and clip.encoder_folds != "all"))
    cfgs["heads"] = dataclasses.replace(cfgs["heads"], finetuned_sources=finetuned)
    validate(cfgs)
    return cfgs


# ---------------------------------------------------------------- settings checked before any work

@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take; None leaves that side open, and a NaN or infinity never holds."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the low end itself is refused
    high_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.low is None or value > self.low or (value == self.low and not self.low_open))
                and (self.high is None or value < self.high or (value == self.high and not self.high_open)))

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1, AT_LEAST_2 = Range(0, low_open=True), Range(0), Range(1), Range(2)
SHARE, OPEN_SHARE, NONZERO_SHARE = Range(0, 1), Range(0, 1, True, True), Range(0, 1, low_open=True)

# Ranges by field name, in every group that has the field; "group.field" wins over the plain name.
RANGES = {
    **dict.fromkeys(["lr", "lr_backbone", "lr_head", "head_lr", "mlp_learning_rate", "lgbm_learning_rate",
                     "stack_learning_rate", "batch_size", "extract_batch_size", "eval_batch_size", "text_batch_size",
                     "mlp_batch_size", "chunk_size", "max_length", "hidden_dim", "head_hidden", "mlp_hidden", "n_heads",
                     "n_tokens", "n_experts", "lora_r", "lora_alpha", "image_size", "n_train", "n_test", "timeout_s",
                     "grad_accum", "knn_k", "neighbour_k", "word_max_features", "char_max_features", "tfidf_svd_dims",
                     "tabular_svd_dims", "mlp_seeds", "lgbm_rounds", "stack_rounds", "ridge_alpha", "distance_eps",
                     "lgbm_huber_delta", "mlp_bin_sigma", "energy_budget", "scale_min", "scale_max", "scale_steps",
                     "calibration_scale_min", "calibration_scale_max", "download_workers", "n_price_bins", "min_df",
                     "image_side", "max_image_bytes",
                     "lgbm_min_child_samples", "stack_min_child_samples",
                     "clip.grad_clip", "qwen.grad_clip"], POSITIVE),  # 0 would zero the gradients there, not switch off
    **dict.fromkeys(["weight_decay", "mlp_weight_decay", "lgbm_lambda_l2", "grad_clip", "warmup_steps",
                     "l1_warmup_epochs", "plateau_patience", "early_stopping_patience", "retries", "freeze_blocks",
                     "load_balance_weight", "router_z_weight", "router_top_k", "energy_weight", "embedding_svd_dims",
                     "lgbm_threads", "calibration_bins", "calibration_shrink_rows", "n_restarts", "num_workers", "seed",
                     "holdout_fold", "target_encoding_m", "smoothing", "tfidf_neighbour_dims", "n_jobs"], NON_NEGATIVE),
    **dict.fromkeys(["epochs", "mlp_epochs"], AT_LEAST_1),
    **dict.fromkeys(["n_folds", "mlp_bins", "lgbm_num_leaves", "stack_leaves"], AT_LEAST_2),
    **dict.fromkeys(["dropout", "lora_dropout", "mlp_dropout", "missing_image_rate", "stack_share", "wise_alpha",
                     "warmup_ratio"], SHARE),
    **dict.fromkeys(["lgbm_feature_fraction", "lgbm_bagging_fraction"], NONZERO_SHARE),
    **dict.fromkeys(["selection_fraction", "plateau_factor"], OPEN_SHARE),
    **dict.fromkeys(["calibration_min_gain", "stack_min_gain"], Range()),  # below 0: kept even a little worse
}

# The names a stage's code knows (the stage modules hold the same lists; tests/test_stages.py checks them).
LOSSES = ("weighted_smape", "smape", "focal_smape", "huber_smape", "l1", "mse")  # core.losses.LOSSES
FUSION_BLOCKS = ("concat_mlp", "gated", "film", "modality_dropout", "transformer_concat", "cross_attention",
                 "bi_cross_attention", "shomr", "energy_aware", "moe")  # fusion.blocks.BLOCKS
RIDGE_FEATURES = ("text", "name")  # heads.features.RIDGE_FEATURES
CLIP_HEAD = "clip_head"  # clip_finetune.extract_embeddings.HEAD_MODEL
TEXT_HEAD = "text_head"  # qwen3_finetune.predict.MODEL_NAME
TARGET_ENCODING_FIELDS = ("brand1", "brand2", "unit", "pack")  # heads.target_encoding.FIELDS
# Allowed values by field name (a list field: each of its items), "group.field" first as above.
CHOICES = {
    "split": ("train", "test", "both"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "storage_dtype": ("float16", "float32"),
    "encoder_folds": ("holdout", "all"),
    "folds": ("holdout", "all"),
    "selection": ("inner", "scored_fold"),
    "architecture": ("hierarchical", "block"),
    "block": FUSION_BLOCKS,
    "loss": LOSSES,
    "pooling": ("last", "mean"),
    "quantization": ("4bit", "none"),
    "lgbm_objective": ("l1", "huber", "regression"),
    "calibration_shape": ("bins", "loglinear", "auto"),
    "ridge_features": RIDGE_FEATURES,
    "target_encoding_fields": TARGET_ENCODING_FIELDS,
}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def rule_for(table: dict, group: str, field: str):
    """The rule `table` holds for `group`'s field: its "group.field" entry, else its plain field entry."""
    return table.get(f"{group}.{field}", table.get(field))


def setting_problems(group: str, cfg) -> list[str]:
    """What is wrong with one group's settings, one line per field, each naming group.field=value."""
    from heads.config import HEADS

    choices = {**CHOICES, "heads.heads": HEADS}
    problems = []
    for field in field_types(type(cfg)):
        value = getattr(cfg, field)
        key = f"{group}.{field}={value!r}"
        span, allowed = rule_for(RANGES, group, field), rule_for(choices, group, field)
        if span and isinstance(value, (int, float)) and not isinstance(value, bool) and not span.holds(value):
            problems.append(f"{key}: must be {span}")
        if allowed and isinstance(value, str) and value not in allowed:
            problems.append(f"{key}: must be one of {', '.join(allowed)}")
        if allowed and isinstance(value, (list, tuple)) and (unknown := [v for v in value if v not in allowed]):
            problems.append(f"{key}: {', '.join(map(str, unknown))} unknown; each must be one of {', '.join(allowed)}")
        if field == "device" and not DEVICE.fullmatch(value):
            problems.append(f"{key}: must be auto, cpu, cuda or cuda:N")
    return problems


def cross_problems(cfgs: dict) -> list[str]:
    """Settings that are each in range but do not fit together."""
    prepare, ensemble, heads = cfgs["prepare"], cfgs["ensemble"], cfgs["heads"]
    problems = []
    if prepare.holdout_fold >= prepare.n_folds:
        problems.append(f"prepare.holdout_fold={prepare.holdout_fold}: must be below prepare.n_folds={prepare.n_folds}")
    if ensemble.scale_min >= ensemble.scale_max:
        problems.append(f"ensemble.scale_min={ensemble.scale_min}: must be below "
                        f"ensemble.scale_max={ensemble.scale_max}")
    if ensemble.calibration_scale_min > ensemble.calibration_scale_max:
        problems.append(f"ensemble.calibration_scale_min={ensemble.calibration_scale_min}: must be at most "
                        f"ensemble.calibration_scale_max={ensemble.calibration_scale_max}")
    if heads.knn_space != "tfidf" and heads.knn_space not in heads.embedding_sources:
        problems.append(f"heads.knn_space={heads.knn_space!r}: must be tfidf or one of heads.embedding_sources "
                        f"({', '.join(heads.embedding_sources)})")
    for group in ("qwen_clip", "all_embeddings"):
        cfg = cfgs[group]
        if cfg.router_top_k == 1 or cfg.router_top_k > cfg.n_experts:
            problems.append(f"{group}.router_top_k={cfg.router_top_k}: must be 0 (soft gate) or 2..n_experts "
                            f"({cfg.n_experts})")
        if len(cfg.tier_weights) != len(cfg.price_thresholds) + 1:
            problems.append(f"{group}.tier_weights: needs one weight per price tier ({len(cfg.price_thresholds) + 1} "
                            f"for {len(cfg.price_thresholds)} price_thresholds), got {len(cfg.tier_weights)}")
    return problems


def validate(cfgs: dict) -> None:
    """Refuse, before any work, every setting out of its range or not among its known values: one
    ConfigError listing each, by group.key."""
    problems = [line for group, cfg in cfgs.items() for line in setting_problems(group, cfg)] + cross_problems(cfgs)
    if problems:
        raise ConfigError("bad settings (nothing has run):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- the stages

def entry(target: str):
    """fn(cfg) that calls `module:function`, imported when the stage runs (listing stages imports no torch)."""
    module, _, name = target.partition(":")

    def run(cfg):
        return getattr(importlib.import_module(module), name)(cfg)

    run.__qualname__ = target
    return run


def with_unseen_folds(cfg, finetuned: list[str], holdout: int):
    """A fusion config that records which folds no fine-tuned encoder saw, from the sources it really
    reads (a skipped source, e.g. no images, does not count)."""
    from core.embedding_cache import skipped_reason

    used = [s for s in cfg.sources if skipped_reason(cfg.embeddings_dir, s) is None]
    return dataclasses.replace(cfg, encoder_unseen_folds=[holdout] if set(used) & set(finetuned) else None)


@dataclass
class Stage:
    name: str
    group: str  # which config it runs with
    after: tuple  # upstream stages whose change reruns this one
    run: object  # fn(cfg) -> anything; None for the report, which the pipeline itself writes
    caches: tuple = ()  # embedding sources it writes, cleared when it reruns from scratch
    trainer: bool = False  # understands resume=
    ignores: frozenset = frozenset()  # config fields of its group it does not read (besides PLACEMENT)
    train_only: bool = False  # reads train rows only: keyed by its train-side print, a new test.csv never reruns it
    outputs: tuple = ()  # files and folders it writes, none of them written by another stage (output_record)
    other_groups: tuple = ()  # groups besides `group` whose configs it runs with (evaluate, predict: both fusion models)
    writes_inputs: bool = False  # its outputs are raw files a user may edit: only a missing one reruns it


def stage_settings(stage: Stage, cfg) -> dict:
    """The part of the group's config this stage's result depends on."""
    skip = PLACEMENT | stage.ignores
    return {k: v for k, v in to_dict(cfg).items() if k not in skip}


def fingerprint_stage(stage: Stage, cfgs: dict, root: Path, prints: dict[str, StagePrint]) -> StagePrint:
    """The stage's train-side and full prints (core.fingerprints), from its settings with paths made
    relative to the root, the raw files' bytes (prepare) and its upstream stages' prints."""
    cfg = cfgs[stage.group]
    settings = portable(stage_settings(stage, cfg), root)
    train_inputs = test_inputs = None
    if stage.name == "prepare":
        # the rows count, not where they lie; the folder counts on the test side only, because the
        # stages that check the submission against raw test.csv find it through prepare's record
        test_inputs = [settings.pop("raw_dir"), file_digest(Path(cfg.raw_dir) / "test.csv")]
        train_inputs = file_digest(Path(cfg.raw_dir) / "train.csv")
    upstream = [prints[u] for u in stage.after if u in prints]
    return stage_print(stage.name, settings, upstream, train_inputs, test_inputs)


def stage_keys(stages: list[Stage], cfgs: dict, root: Path) -> dict[str, str]:
    """What each stage would be keyed by now (its train-side print or its full print), without running it."""
    prints, keys = {}, {}
    for stage in stages:
        prints[stage.name] = fingerprint_stage(stage, cfgs, root, prints)
        keys[stage.name] = prints[stage.name].train if stage.train_only else prints[stage.name].full
    return keys


def skip_siglip(cfg) -> None:
    """The small profile has no SigLIP weights that run offline on a CPU: both caches step aside."""
    from core.embedding_cache import mark_source_skipped

    for source in (cfg.image_source, cfg.text_source):
        mark_source_skipped(cfg.embeddings_dir, source, "profile=small runs no SigLIP model (no CPU-sized SigLIP "
                            "weights ship offline); give siglip.model a local folder to add it")
    print("[pipeline] siglip: profile=small runs no SigLIP model; its sources step aside")


def heads_caches(cfgs: dict) -> tuple:
    """The caches the heads stage writes: the tabular source and one target-encoding source per fold."""
    from core.embedding_cache import fold_source

    heads = cfgs["heads"]
    encodings = heads.target_encoding_source
    return (*([heads.tabular_source] if heads.tabular_source else []),
            *(fold_source(encodings, k) for k in range(cfgs["prepare"].n_folds) if encodings))


def build_stages(cfgs: dict, root: Path, profile: str) -> list[Stage]:
    """Every stage of a run with `profile`, in order."""
    demo = profile == "tiny"
    stages = []
    if demo:
        raw = Path(cfgs["synthetic"].out_dir)
        stages.append(Stage("synthetic", "synthetic", (), entry("data.synthetic:main"),
                            outputs=(raw / "train.csv", raw / "test.csv"), writes_inputs=True))
    prepare_dir = Path(cfgs["prepare"].out_dir)
    # its tables and record; the image folder is left out (one file per product: no cheap listing)
    stages.append(Stage("prepare", "prepare", ("synthetic",), entry("data.prepare:main"),
                        outputs=(prepare_dir / "train.parquet", prepare_dir / "test.parquet", prepare_dir / META_FILE)))
    if demo:  # its tokenizers learn from the train texts only
        stages.append(Stage("tiny_models", "tiny_models", ("prepare",), entry("data.tiny_models:main"),
                            train_only=True, outputs=(Path(cfgs["tiny_models"].out_dir),)))
    models = ("tiny_models",) if demo else ()
    fusion_models = ("qwen_clip", "all_embeddings")
    # an extraction from a frozen encoder reads the base model, not what its training stage wrote
    clip, qwen, siglip, heads = cfgs["clip"], cfgs["qwen"], cfgs["siglip"], cfgs["heads"]
    clip_frozen, qwen_frozen = not clip.use_finetuned, not qwen.finetune
    clip_source = ("prepare", *models) if clip_frozen else ("clip_train",)
    qwen_source = ("prepare", *models) if qwen_frozen else ("qwen_train",)
    clip_reads = frozenset(TRAINING_ONLY["clip"]) if clip_frozen else frozenset()
    qwen_reads = frozenset(TRAINING_ONLY["qwen"]) if qwen_frozen else frozenset()
    caches = lambda cfg, sources: tuple(Path(cfg.embeddings_dir) / s for s in sources)
    predictions = lambda cfg, *models: tuple(Path(cfg.predictions_dir) / m for m in models)
    run_dir = lambda cfg: (Path(cfg.out_dir) / cfg.run_name,)
    ensemble = cfgs["ensemble"]
    submission = Path(ensemble.output or Path(ensemble.predictions_dir).parent / "test_out.csv")

    def train_fusion(cfg):
        return entry("fusion.train:main")(with_unseen_folds(cfg, heads.finetuned_sources, cfgs["prepare"].holdout_fold))

    def each_fusion_model(target):
        return lambda cfg: [entry(target)(cfgs[m]) for m in fusion_models]

    siglip_caches = (siglip.image_source, siglip.text_source)
    stages += [
        Stage("siglip", "siglip", ("prepare", *models),
              skip_siglip if profile == "small" else entry("siglip_extract.extract:main"), caches=siglip_caches,
              outputs=caches(siglip, siglip_caches)),
        Stage("clip_train", "clip", ("prepare", *models), entry("clip_finetune.train:main"), trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["clip"]), train_only=True, outputs=run_dir(clip)),
        Stage("clip_extract", "clip", clip_source, entry("clip_finetune.extract_embeddings:main"),
              caches=(clip.source_name,), ignores=clip_reads,
              outputs=(*caches(clip, [clip.source_name]), *predictions(clip, CLIP_HEAD))),
        Stage("qwen_train", "qwen", ("prepare", *models), entry("qwen3_finetune.train:main"), trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["qwen"]), train_only=True, outputs=run_dir(qwen)),
        Stage("qwen_extract", "qwen", qwen_source, entry("qwen3_finetune.extract_embeddings:main"),
              caches=(qwen.source_name,), ignores=qwen_reads, outputs=caches(qwen, [qwen.source_name])),
        Stage("qwen_predict", "qwen", (*qwen_source, "qwen_extract"), entry("qwen3_finetune.predict:main"), ignores=qwen_reads,
              outputs=predictions(qwen, TEXT_HEAD)),
        Stage("heads", "heads", ("prepare", "siglip", "clip_extract", "qwen_extract"), entry("heads.train:main"),
              caches=heads_caches(cfgs), outputs=(Path(heads.out_dir), *caches(heads, heads_caches(cfgs)),
                                                  *predictions(heads, *heads.heads))),
        Stage("fusion_qwen_clip", "qwen_clip", ("clip_extract", "qwen_extract", "heads"), train_fusion, trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["qwen_clip"]), train_only=True, outputs=run_dir(cfgs["qwen_clip"])),
        Stage("fusion_all", "all_embeddings", ("siglip", "clip_extract", "qwen_extract", "heads"), train_fusion,
              trainer=True, ignores=frozenset(EXTRACTION_ONLY["all_embeddings"]), train_only=True,
              outputs=run_dir(cfgs["all_embeddings"])),
        Stage("evaluate", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              each_fusion_model("fusion.evaluate_by_groups:main"), other_groups=fusion_models),
        Stage("predict", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              each_fusion_model("fusion.predict_test:main"), other_groups=fusion_models,
              outputs=predictions(cfgs["all_embeddings"], *(cfgs[m].run_name for m in fusion_models))),
        Stage("ensemble", "ensemble", ("heads", "predict", "qwen_predict", "clip_extract"),
              entry("ensemble.blend:main"), outputs=(submission, *predictions(ensemble, "ensemble"))),
        Stage("report", "ensemble", ("ensemble",), None),
    ]
    return stages


# ---------------------------------------------------------------- what a finished stage left on disk

# Names inside a stage's output folders that are not its own: a log every run appends to, and what a
# later stage writes into a training run's folder (its extraction's or prediction's test output, evaluation).
NOT_RECORDED = {"log.txt", "test_predictions.csv", "test_out.csv", "eval"}


def output_record(stage: Stage, root: Path) -> dict[str, int]:
    """{path (under the root: "<root>/..."): size in bytes} of every file the stage's outputs hold: what
    the next run checks before it trusts the stage as done."""
    record = {}
    for output in map(Path, stage.outputs):
        files = [output] if output.is_file() else sorted(
            p for p in output.rglob("*") if p.is_file() and not NOT_RECORDED & set(p.relative_to(output).parts)
            and not p.name.startswith("."))  # a writer's temporary file, or the root's lock
        for path in files:
            record[portable(path, root)] = path.stat().st_size
    return record


def missing_outputs(record: dict[str, int], root: Path, sizes: bool = True) -> list[str]:
    """The recorded files that are gone or (with `sizes`) whose size changed since they were recorded."""
    missing = []
    for name, size in record.items():
        path = Path(root) / name.removeprefix("<root>/") if name.startswith("<root>/") else Path(name)
        if not path.is_file() or (sizes and path.stat().st_size != size):
            missing.append(name)
    return missing


def cuda_groups(stages: list[Stage], cfgs: dict, wanted: list[str] | None) -> list[str]:
    """The groups of the stages this run will run whose device is set to CUDA."""
    groups = {g for s in stages if wanted is None or s.name in wanted for g in (s.group, *s.other_groups)}
    return sorted(g for g in groups if str(getattr(cfgs[g], "device", "")).startswith("cuda"))
