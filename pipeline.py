"""Run every stage in order, or some of them, with one set of key=value overrides.

    python -m pipeline profile=tiny                    # the demo: synthetic catalog, tiny models, CPU
    python -m pipeline                                 # real defaults: data/raw/{train,test}.csv, GPU
    python -m pipeline profile=tiny stages=fusion_all,report
    python -m pipeline device=cpu qwen.epochs=1        # `key=value` goes to every stage that has the key,
                                                       # `stage.key=value` to that stage only
    python -m pipeline profile=tiny root=/tmp/demo     # every output under one folder

Stages, in order: synthetic (demo only), prepare, tiny_models (demo only), siglip, clip_train,
clip_extract, qwen_train, qwen_extract, qwen_predict, fusion_qwen_clip, fusion_all, evaluate,
predict, report. A stage whose inputs, config and upstream stages are unchanged since its last
successful run is skipped; one whose config (or an upstream stage) changed reruns from scratch;
one that was interrupted resumes. The state lives in <root>/pipeline_state.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import ConfigError, field_types, parse_args, to_dict
from core.errors import run_cli
from core.io import read_json, write_json
from core.metrics import format_table, smape

ROOTS = {"tiny": Path("checkpoints/demo"), "default": Path("checkpoints")}


def root_overrides(root: Path, demo: bool) -> list[str]:
    """Put every stage's outputs (and, for the demo, its catalog and tiny models) under `root`."""
    tokens = [f"prepare.out_dir={root / 'data'}", f"tiny_models.out_dir={root / 'models'}",
              f"tiny_models.data_dir={root / 'data'}"]
    if demo:
        tokens += [f"synthetic.out_dir={root / 'raw'}", f"prepare.raw_dir={root / 'raw'}",
                   f"siglip.model={root / 'models' / 'siglip_tiny'}", f"clip.model={root / 'models' / 'clip_tiny'}",
                   f"qwen.model={root / 'models' / 'qwen3_tiny'}"]
    for group in ("siglip", "clip", "qwen", "qwen_clip", "all_embeddings"):
        tokens += [f"{group}.data_dir={root / 'data'}", f"{group}.embeddings_dir={root / 'embeddings'}"]
    tokens += [f"clip.out_dir={root / 'clip_finetune'}", f"qwen.out_dir={root / 'qwen3_finetune'}",
               f"qwen_clip.out_dir={root / 'fusion'}", f"all_embeddings.out_dir={root / 'fusion'}"]
    return tokens


def stage_configs(profile: str, overrides: list[str], root: Path | None = None) -> dict:
    """Each stage's resolved config, with overrides routed by key (or by `stage.key`)."""
    from clip_finetune.config import PROFILES as CLIP, ClipConfig
    from core.tiny_models import TinyModelsConfig
    from data.config import PREPARE_PROFILES, SYNTHETIC_PROFILES, PrepareConfig, SyntheticConfig
    from fusion.config import FusionConfig
    from fusion.train import model_profiles
    from qwen3_finetune.config import PROFILES as QWEN, QwenConfig
    from siglip_extract.config import PROFILES as SIGLIP, SiglipConfig

    if root is not None:
        overrides = root_overrides(root, profile == "tiny") + list(overrides)
    root = root or ROOTS[profile]
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
    return {group: parse_args(cls, [f"profile={profile}", *routed[group]], profiles)
            for group, (cls, profiles) in specs.items()}


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    group: str  # which config it runs with
    after: tuple  # upstream stages whose change reruns this one
    run: object  # fn(cfg) -> anything
    caches: tuple = ()  # embedding sources it writes, cleared when it reruns from scratch
    trainer: bool = False  # understands resume=


def build_stages(cfgs: dict, root: Path, demo: bool) -> list[Stage]:
    from clip_finetune import extract_embeddings as clip_extract, train as clip_train
    from core import tiny_models
    from data import prepare, synthetic
    from fusion import evaluate_by_groups, predict_test, train as fusion_train
    from qwen3_finetune import extract_embeddings as qwen_extract, predict as qwen_predict, train as qwen_train
    from siglip_extract import extract as siglip

    stages = []
    if demo:
        stages.append(Stage("synthetic", "synthetic", (), synthetic.main))
    stages.append(Stage("prepare", "prepare", ("synthetic",), prepare.main))
    if demo:
        stages.append(Stage("tiny_models", "tiny_models", ("prepare",), tiny_models.main))
    models = ("tiny_models",) if demo else ()
    stages += [
        Stage("siglip", "siglip", ("prepare", *models), siglip.main,
              caches=(cfgs["siglip"].image_source, cfgs["siglip"].text_source)),
        Stage("clip_train", "clip", ("prepare", *models), clip_train.main, trainer=True),
        Stage("clip_extract", "clip", ("clip_train",), clip_extract.main, caches=(cfgs["clip"].source_name,)),
        Stage("qwen_train", "qwen", ("prepare", *models), qwen_train.main, trainer=True),
        Stage("qwen_extract", "qwen", ("qwen_train",), qwen_extract.main, caches=(cfgs["qwen"].source_name,)),
        Stage("qwen_predict", "qwen", ("qwen_train",), qwen_predict.main),
        Stage("fusion_qwen_clip", "qwen_clip", ("clip_extract", "qwen_extract"), fusion_train.main, trainer=True),
        Stage("fusion_all", "all_embeddings", ("siglip", "clip_extract", "qwen_extract"), fusion_train.main, trainer=True),
        Stage("evaluate", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              lambda cfg: [evaluate_by_groups.main(c) for c in (cfgs["qwen_clip"], cfg)]),
        Stage("predict", "all_embeddings", ("fusion_qwen_clip", "fusion_all"),
              lambda cfg: [predict_test.main(c) for c in (cfgs["qwen_clip"], cfg)]
              + [predict_test.main(cfg, root / "test_out.csv")]),
        Stage("report", "all_embeddings", ("predict", "qwen_predict", "clip_extract"),
              lambda cfg: report(cfgs, root)),
    ]
    return stages


def report(cfgs: dict, root: Path) -> pd.DataFrame:
    """Test SMAPE of every model that predicts, against test_labels.csv where the catalog has one
    (the demo); validation SMAPE otherwise. Also where each output is."""
    from core.submission import check_submission
    from core.tables import META_FILE, load_table

    raw_dir = Path(read_json(Path(cfgs["prepare"].out_dir) / META_FILE)["config"]["raw_dir"])
    submission = root / "test_out.csv"
    problems = check_submission(submission, raw_dir / "test.csv")
    if problems:
        raise ConfigError("the submission failed its check:\n  " + "\n  ".join(problems))
    clip_run = Path(cfgs["clip"].out_dir) / cfgs["clip"].run_name
    qwen_run = Path(cfgs["qwen"].out_dir) / cfgs["qwen"].run_name
    fusion = {m: Path(cfgs[m].out_dir) / cfgs[m].run_name for m in ("qwen_clip", "all_embeddings")}
    outputs = {"CLIP head (image only)": clip_run / "test_predictions.csv", "Qwen head (text only)": qwen_run / "test_out.csv",
               "fusion qwen_clip": fusion["qwen_clip"] / "test_out.csv", "fusion all_embeddings": fusion["all_embeddings"] / "test_out.csv"}
    validation = {"CLIP head (image only)": read_json(clip_run / "metrics.json")["val_smape"],
                  "Qwen head (text only)": read_json(qwen_run / "metrics.json")["val_smape"],
                  "fusion qwen_clip": read_json(fusion["qwen_clip"] / "metrics.json")["val_smape_mean"],
                  "fusion all_embeddings": read_json(fusion["all_embeddings"] / "metrics.json")["val_smape_mean"]}
    train = load_table(cfgs["prepare"].out_dir, "train")
    labels_path = raw_dir / "test_labels.csv"
    labels = pd.read_csv(labels_path, dtype={"sample_id": str}).set_index("sample_id")["price"] if labels_path.exists() else None
    rows = []
    median = float(train["price"].median())
    holdout = train[train["split"] == "val"]
    rows.append({"model": "constant median (baseline)",
                 "val_smape": smape(holdout["price"], np.full(len(holdout), train.loc[train["split"] == "train", "price"].median())),
                 "test_smape": smape(labels, np.full(len(labels), median)) if labels is not None else float("nan"),
                 "output": "-"})
    for name, path in outputs.items():
        pred = pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id")["price"]
        test = smape(labels, pred.loc[labels.index]) if labels is not None else float("nan")
        rows.append({"model": name, "val_smape": validation[name], "test_smape": test, "output": str(path)})
    table = pd.DataFrame(rows)
    table.to_csv(root / "report.csv", index=False)
    print("\n" + format_table(table))
    print(f"\nsubmission: {submission} (checked against {raw_dir / 'test.csv'}); this table: {root / 'report.csv'}")
    return table


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    profile = next((a.split("=", 1)[1] for a in argv if a.startswith("profile=")), "default")
    wanted = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("stages=")), None)
    root_arg = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("root=")), None)
    overrides = [a for a in argv if not a.startswith(("profile=", "stages=", "root="))]
    if profile not in ROOTS:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(ROOTS)}")
    cfgs = stage_configs(profile, overrides, root_arg)
    root = root_arg or ROOTS[profile]
    stages = build_stages(cfgs, root, demo=profile == "tiny")
    names = [s.name for s in stages]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages: {', '.join(names)}")
    state_path = root / "pipeline_state.json"
    state = read_json(state_path) if state_path.exists() else {}
    prints: dict[str, str] = {}
    timings = {}
    for stage in stages:
        cfg = cfgs[stage.group]
        settings = {k: v for k, v in to_dict(cfg).items() if k != "resume"}
        if stage.name == "prepare":  # new competition files rerun everything downstream
            settings["inputs"] = [(p.stat().st_size, p.stat().st_mtime_ns) for p in
                                  (Path(cfg.raw_dir) / "train.csv", Path(cfg.raw_dir) / "test.csv") if p.exists()]
        prints[stage.name] = fingerprint(stage.name, settings, [prints.get(u) for u in stage.after])
        if wanted and stage.name not in wanted:
            continue
        previous = state.get(stage.name, {})
        if previous.get("fingerprint") == prints[stage.name] and previous.get("complete") and stage.name != "report":
            print(f"[pipeline] {stage.name}: up to date, skipped")
            continue
        changed = previous.get("fingerprint") not in (None, prints[stage.name])
        if changed:
            print(f"[pipeline] {stage.name}: config or an upstream stage changed, rerunning from scratch")
            for source in stage.caches:
                shutil.rmtree(Path(cfg.embeddings_dir) / source, ignore_errors=True)
        if stage.trainer:
            cfg = dataclasses.replace(cfg, resume=not changed)
        print(f"[pipeline] {stage.name}: running")
        t0 = time.time()
        state[stage.name] = {"fingerprint": prints[stage.name], "complete": False}
        write_json(state_path, state)
        stage.run(cfg)
        timings[stage.name] = round(time.time() - t0, 1)
        state[stage.name] = {"fingerprint": prints[stage.name], "complete": True, "seconds": timings[stage.name]}
        write_json(state_path, state)
    if timings:
        print("[pipeline] seconds per stage: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings


if __name__ == "__main__":
    run_cli(main)
