"""Run every stage in order, or some of them, with one set of key=value overrides.

    python -m pipeline profile=tiny                    # the demo: synthetic catalog, tiny models, CPU
    python -m pipeline profile=small raw_dir=DIR root=OUT   # real rows on a CPU: frozen MiniLM, heads, ensemble
    python -m pipeline                                 # real defaults: data/raw/{train,test}.csv, GPU
    python -m pipeline profile=tiny stages=fusion_all,report
    python -m pipeline device=cpu qwen.epochs=1        # `key=value` goes to every stage that has the key,
                                                       # `stage.key=value` to that stage only
    python -m pipeline profile=tiny root=/tmp/demo     # every output under one folder
    python -m pipeline root=R score=NEW.csv out=PRICES.csv  # price new rows with trained root R (score.py)

Stages, in order: synthetic (demo only), prepare, tiny_models (demo only), siglip, clip_train,
clip_extract, qwen_train, qwen_extract, qwen_predict, heads, fusion_qwen_clip, fusion_all, evaluate,
predict, ensemble, report. A stage is fingerprinted on the config fields it reads (a training stage
ignores extraction-only fields; no stage counts placement such as `device` or batch sizes of pure
inference; an extraction from a frozen encoder ignores the training fields), the content of the raw
files and its upstream stages (core/fingerprints.py). A stage that reads train rows only (a
fine-tune, a fusion model) is keyed by its train-side print, so a new test.csv beside the same
train.csv reruns only what reads test rows. Paths under the root count relative to it, so a trained
root copied elsewhere is up to date. A stage whose fingerprint is unchanged since its last
successful run is skipped; one whose fingerprint changed reruns from scratch; one that was
interrupted resumes. The state lives in <root>/pipeline_state.json, with the profile and package
versions the run was trained with. Every model writes its predictions to <root>/predictions/; the
ensemble blends them into <root>/test_out.csv and the report reads that folder alone.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import ConfigError, field_types, parse_args, to_dict
from core.errors import run_cli
from core.fingerprints import (STATE_FILE, StagePrint, describe_changes, file_digest, installed_versions, portable,
                               portable_overrides, stage_print, version_differences)
from core.io import read_json, write_json
from core.metrics import format_table, prices_from_log, smape

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


def stage_configs(profile: str, overrides: list[str], root: Path | None = None) -> dict:
    """Each stage's resolved config, with overrides routed by key (or by `stage.key`)."""
    from clip_finetune.config import PROFILES as CLIP, ClipConfig
    from data.tiny_models import TinyModelsConfig
    from data.config import PREPARE_PROFILES, SYNTHETIC_PROFILES, PrepareConfig, SyntheticConfig
    from ensemble.config import PROFILES as ENSEMBLE, EnsembleConfig
    from fusion.config import FusionConfig
    from fusion.train import model_profiles
    from heads.config import PROFILES as HEADS, HeadsConfig
    from qwen3_finetune.config import PROFILES as QWEN, QwenConfig
    from siglip_extract.config import PROFILES as SIGLIP, SiglipConfig

    root = root or ROOTS[profile]
    overrides = root_overrides(root, profile == "tiny") + list(overrides)
    tiny_models = TinyModelsConfig(out_dir=root / "models", data_dir=root / "data")
    specs = {  # group name -> (class, profiles, stages that use it)
        "synthetic": (SyntheticConfig, SYNTHETIC_PROFILES),
        "prepare": (PrepareConfig, PREPARE_PROFILES),
        "tiny_models": (TinyModelsConfig, {"tiny": tiny_models, "default": tiny_models}),
        "siglip": (SiglipConfig, SIGLIP),
        "clip": (ClipConfig, CLIP),
        "qwen": (QwenConfig, QWEN),
        "qwen_clip": (FusionConfig, model_profiles("qwen_clip")),
        "all_embeddings": (FusionConfig, model_profiles("all_embeddings")),
        "heads": (HeadsConfig, HEADS),
        "ensemble": (EnsembleConfig, ENSEMBLE),
    }
    routed: dict[str, list[str]] = {name: [] for name in specs}
    for token in overrides:
        key, _, value = token.partition("=")
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
    cfgs = {group: parse_args(cls, [f"profile={profile}", *routed[group]], pick_profile(profiles, profile))
            for group, (cls, profiles) in specs.items()}
    # the caches whose encoder trained on (and chose its checkpoint with) the non-holdout folds; with one
    # encoder per fold (encoder_folds=all) every row's vector comes from an encoder that never saw it
    qwen, clip = cfgs["qwen"], cfgs["clip"]
    finetuned = ([qwen.source_name] * (qwen.finetune and qwen.encoder_folds != "all")
                 + [clip.source_name] * (clip.use_finetuned and clip.encoder_folds != "all"))
    cfgs["heads"] = dataclasses.replace(cfgs["heads"], finetuned_sources=finetuned)
    return cfgs


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
    run: object  # fn(cfg) -> anything
    caches: tuple = ()  # embedding sources it writes, cleared when it reruns from scratch
    trainer: bool = False  # understands resume=
    ignores: frozenset = frozenset()  # config fields of its group it does not read (besides PLACEMENT)
    train_only: bool = False  # reads train rows only: keyed by its train-side print, a new test.csv never reruns it


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
    from clip_finetune import extract_embeddings as clip_extract, train as clip_train
    from data import tiny_models
    from data import prepare, synthetic
    from ensemble import blend
    from fusion import evaluate_by_groups, predict_test, train as fusion_train
    from heads import train as heads_train
    from qwen3_finetune import extract_embeddings as qwen_extract, predict as qwen_predict, train as qwen_train
    from siglip_extract import extract as siglip

    demo = profile == "tiny"
    stages = []
    if demo:
        stages.append(Stage("synthetic", "synthetic", (), synthetic.main))
    stages.append(Stage("prepare", "prepare", ("synthetic",), prepare.main))
    if demo:  # its tokenizers learn from the train texts only
        stages.append(Stage("tiny_models", "tiny_models", ("prepare",), tiny_models.main, train_only=True))
    models = ("tiny_models",) if demo else ()
    fusion_models = ("qwen_clip", "all_embeddings")
    # an extraction from a frozen encoder reads the base model, not what its training stage wrote
    clip_frozen, qwen_frozen = not cfgs["clip"].use_finetuned, not cfgs["qwen"].finetune
    clip_source = ("prepare", *models) if clip_frozen else ("clip_train",)
    qwen_source = ("prepare", *models) if qwen_frozen else ("qwen_train",)
    clip_reads = frozenset(TRAINING_ONLY["clip"]) if clip_frozen else frozenset()
    qwen_reads = frozenset(TRAINING_ONLY["qwen"]) if qwen_frozen else frozenset()

    def train_fusion(cfg):
        return fusion_train.main(with_unseen_folds(cfg, cfgs["heads"].finetuned_sources, cfgs["prepare"].holdout_fold))
    stages += [
        Stage("siglip", "siglip", ("prepare", *models), skip_siglip if profile == "small" else siglip.main,
              caches=(cfgs["siglip"].image_source, cfgs["siglip"].text_source)),
        Stage("clip_train", "clip", ("prepare", *models), clip_train.main, trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["clip"]), train_only=True),
        Stage("clip_extract", "clip", clip_source, clip_extract.main, caches=(cfgs["clip"].source_name,),
              ignores=clip_reads),
        Stage("qwen_train", "qwen", ("prepare", *models), qwen_train.main, trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["qwen"]), train_only=True),
        Stage("qwen_extract", "qwen", qwen_source, qwen_extract.main, caches=(cfgs["qwen"].source_name,),
              ignores=qwen_reads),
        Stage("qwen_predict", "qwen", qwen_source, qwen_predict.main, ignores=qwen_reads),
        Stage("heads", "heads", ("prepare", "siglip", "clip_extract", "qwen_extract"), heads_train.main,
              caches=heads_caches(cfgs)),
        Stage("fusion_qwen_clip", "qwen_clip", ("clip_extract", "qwen_extract", "heads"), train_fusion, trainer=True,
              ignores=frozenset(EXTRACTION_ONLY["qwen_clip"]), train_only=True),
        Stage("fusion_all", "all_embeddings", ("siglip", "clip_extract", "qwen_extract", "heads"), train_fusion,
              trainer=True, ignores=frozenset(EXTRACTION_ONLY["all_embeddings"]), train_only=True),
        Stage("evaluate", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              lambda cfg: [evaluate_by_groups.main(cfgs[m]) for m in fusion_models]),
        Stage("predict", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              lambda cfg: [predict_test.main(cfgs[m]) for m in fusion_models]),
        Stage("ensemble", "ensemble", ("heads", "predict", "qwen_predict", "clip_extract"), blend.main),
        Stage("report", "ensemble", ("ensemble",), lambda cfg: report(cfgs, root)),
    ]
    return stages


def expert_load_text(load) -> str:
    """A fusion model's mean gate load per expert, e.g. "0.31/0.35/0.34" (one list, or one per fold,
    averaged); blank for a model without experts."""
    if not load:
        return ""
    loads = np.array(list(load.values()) if isinstance(load, dict) else load, dtype=np.float64)
    return "/".join(f"{x:.2f}" for x in loads.reshape(-1, loads.shape[-1]).mean(0))


def report(cfgs: dict, root: Path) -> pd.DataFrame:
    """Every model in <root>/predictions/, scored on the train rows it predicted out of fold (or on
    the holdout fold), with what that figure is; test SMAPE against test_labels.csv where the
    catalog has one (the demo)."""
    from core.predictions import list_models, read_predictions
    from core.submission import check_submission
    from core.tables import load_table

    raw_dir = Path(cfgs["prepare"].raw_dir)
    submission = Path(cfgs["ensemble"].output or root / "test_out.csv")
    problems = check_submission(submission, raw_dir / "test.csv")
    if problems:
        raise ConfigError("the submission failed its check:\n  " + "\n  ".join(problems))
    train = load_table(cfgs["prepare"].out_dir, "train")
    truth = train.set_index(train["sample_id"].astype(str))["price"]
    floor = float(train["price"].min())
    labels_path = raw_dir / "test_labels.csv"
    labels = pd.read_csv(labels_path, dtype={"sample_id": str}).set_index("sample_id")["price"] if labels_path.exists() else None
    folds = train["fold"].to_numpy()
    median_oof = np.array([train.loc[folds != f, "price"].median() for f in folds])  # median of the other folds
    rows = [{"model": "constant median (baseline)", "figure": "out_of_fold", "rows": len(train),
             "smape": smape(train["price"], median_oof),
             "test_smape": smape(labels, np.full(len(labels), train["price"].median())) if labels is not None else float("nan"),
             "expert_load": "", "how": "median price of the other folds"}]
    for name in list_models(cfgs["ensemble"].predictions_dir):
        preds = read_predictions(cfgs["ensemble"].predictions_dir, name)
        meta = preds.meta
        scored = preds.oof[preds.oof["sample_id"].isin(truth.index)]
        figure = meta["oof_kind"]
        unseen = meta.get("encoder_unseen_folds")
        if unseen is not None and set(unseen) != set(folds.tolist()):
            # the other folds' rows fed a fine-tuned encoder that trained on them: scoring them would flatter
            scored = scored[scored["fold"].isin(unseen)]
            figure += f", fold {','.join(map(str, unseen))} only"
        pred = prices_from_log(scored["log_pred"], floor)
        test_smape = float("nan")
        if labels is not None:
            test = preds.test.set_index("sample_id")["log_pred"]
            test_smape = smape(labels, prices_from_log(test.loc[labels.index], floor))
        rows.append({"model": name, "figure": figure + (" (nested CV)" if name == "ensemble" else ""),
                     "rows": len(scored), "smape": smape(truth.loc[scored["sample_id"]], pred),
                     "test_smape": test_smape, "expert_load": expert_load_text(meta.get("expert_load")),
                     "how": meta.get("selection", "")})
    table = pd.DataFrame(rows)
    table.to_csv(root / "report.csv", index=False)
    shown = table.drop(columns=["test_smape"]) if labels is None else table
    print("\n" + format_table(shown))
    print("\nout_of_fold: every train row, each predicted by a model that never trained on it; holdout: the "
          "holdout fold only; 'fold k only': the rows no fine-tuned encoder saw; `how` says how each model chose "
          "its checkpoint or weights.")
    print(f"submission: {submission} (checked against {raw_dir / 'test.csv'}); this table: {root / 'report.csv'}")
    return table


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("score=") for a in argv):  # pricing new rows with a trained root: score.py
        import score

        return score.main(argv)
    profile = next((a.split("=", 1)[1] for a in argv if a.startswith("profile=")), "default")
    wanted = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("stages=")), None)
    root_arg = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("root=")), None)
    overrides = [a for a in argv if not a.startswith(("profile=", "stages=", "root="))]
    if profile not in ROOTS:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(ROOTS)}")
    cfgs = stage_configs(profile, overrides, root_arg)
    root = root_arg or ROOTS[profile]
    stages = build_stages(cfgs, root, profile)
    names = [s.name for s in stages]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(names)}")
    state_path = root / STATE_FILE
    state = read_json(state_path) if state_path.exists() else {}
    recorded = state.get("trained_with")
    changes = version_differences(recorded["versions"]) if recorded else {}
    if changes:
        print(f"[pipeline] warning: this run was trained with other package versions ({describe_changes(changes)}); "
              "stages that are up to date are not rerun for that")
    prints: dict[str, StagePrint] = {}
    timings = {}
    for stage in stages:
        cfg = cfgs[stage.group]
        # computed when the stage's turn comes: prepare's print reads the raw files the synthetic stage writes
        prints[stage.name] = fingerprint_stage(stage, cfgs, root, prints)
        key = prints[stage.name].train if stage.train_only else prints[stage.name].full
        if wanted and stage.name not in wanted:
            continue
        previous = state.get(stage.name, {})
        if previous.get("fingerprint") == key and previous.get("complete") and stage.name != "report":
            print(f"[pipeline] {stage.name}: up to date, skipped")
            continue
        changed = previous.get("fingerprint") not in (None, key)
        if changed:
            print(f"[pipeline] {stage.name}: config or an upstream stage changed, rerunning from scratch")
            for source in stage.caches:
                shutil.rmtree(Path(cfg.embeddings_dir) / source, ignore_errors=True)
        if stage.trainer:
            cfg = dataclasses.replace(cfg, resume=not changed)
        print(f"[pipeline] {stage.name}: running")
        t0 = time.time()
        state[stage.name] = {"fingerprint": key, "complete": False}
        if stage.train_only:  # what a scoring run on this root compares its packages against
            state["trained_with"] = {"profile": profile, "versions": installed_versions()}
        # what scoring new rows with this root rebuilds the stages' configs from
        state["run_with"] = {"profile": profile, "overrides": portable_overrides(overrides, root)}
        write_json(state_path, state)
        stage.run(cfg)
        timings[stage.name] = round(time.time() - t0, 1)
        state[stage.name] = {"fingerprint": key, "complete": True, "seconds": timings[stage.name]}
        write_json(state_path, state)
    if timings:
        print("[pipeline] seconds per stage: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings


if __name__ == "__main__":
    run_cli(main)
