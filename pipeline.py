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
predict, ensemble, report (core/stages.py knows them; this file runs them and writes the report).
Every stage's settings are checked before any stage runs (`python -m pipeline --help` lists every
key, its default and what it is for), a stage set to device=cuda finds no GPU before any work, and
the run holds the root alone (core/lock.py). A stage is fingerprinted on the config fields it reads
(a training stage ignores extraction-only fields; no stage counts placement such as `device` or batch
sizes of pure inference; an extraction from a frozen encoder ignores the training fields), the content
of the raw files and its upstream stages (core/fingerprints.py). A stage that reads train rows only (a
fine-tune, a fusion model) is keyed by its train-side print, so a new test.csv beside the same
train.csv reruns only what reads test rows. Paths under the root count relative to it, so a trained
root copied elsewhere is up to date. A stage whose fingerprint is unchanged since its last
successful run is skipped; one whose fingerprint changed reruns from scratch; one that was
interrupted resumes; one whose recorded files are gone or changed in size (a deleted folder) reruns
from scratch, and writes them again as they were (same settings, same inputs). The state lives in
<root>/pipeline_state.json, with the profile and package versions the run was trained with. Every
model writes its predictions to <root>/predictions/; the ensemble blends them into <root>/test_out.csv
and the report reads that folder alone.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import ConfigError, describe_config
from core.errors import run_cli
from core.fingerprints import (STATE_FILE, StagePrint, describe_changes, installed_versions, portable_overrides,
                               version_differences)
from core.io import check_writable, read_json, write_json
from core.lock import hold_root
from core.metrics import format_table, prices_from_log, smape
# the stages, their configs and checks live in core.stages; these names are kept importable from here
from core.stages import (EXTRACTION_ONLY, PLACEMENT, ROOTS, TRAINING_ONLY, Stage, build_stages,  # noqa: F401
                         cuda_groups, fingerprint_stage, heads_caches, missing_outputs, output_record, pick_profile,
                         root_overrides, skip_siglip, stage_configs, stage_keys, stage_settings, with_unseen_folds)

# the pipeline's own keys; every other key=value goes to the stages
PIPELINE_KEYS = {
    "profile": "default | small | tiny: the preset every stage starts from (tiny: the demo, small: real rows on a CPU)",
    "stages": "comma-separated stages to run (default: every stage, skipping those up to date)",
    "root": "the folder every output goes under (default: checkpoints/, checkpoints/small, checkpoints/demo)",
    "score": "NEW.csv: price new rows with the trained root instead of training (score.py; needs out=)",
}


def help_text(profile: str) -> str:
    """Every key a run takes: the pipeline's own, then each stage group's, with the defaults of `profile`."""
    cfgs = stage_configs(profile, [])
    stages = build_stages(cfgs, ROOTS[profile], profile)
    lines = [__doc__.strip(), "", "pipeline keys:"]
    lines += [f"  {key}=  # {text}" for key, text in PIPELINE_KEYS.items()]
    lines.append(f"\nstage keys (defaults of profile={profile}); key=value sets the key in every group that has it, "
                 "group.key=value in that group only:")
    for group, cfg in cfgs.items():
        users = ", ".join(s.name for s in stages if s.group == group) or "none in this profile"
        lines += ["", describe_config(cfg, f"[{group}] (stages: {users})")]
    return "\n".join(lines)


def check_devices(stages: list[Stage], cfgs: dict, wanted: list[str] | None) -> None:
    """A stage set to device=cuda on a machine without CUDA stops the run now, before any work."""
    if cuda_groups(stages, cfgs, wanted):
        from core.runtime import pick_device

        pick_device("cuda")


def expert_load_text(load) -> str:
    """A fusion model's mean gate load per expert, e.g. "0.31/0.35/0.34" (one list, or one per fold,
    averaged); blank for a model without experts."""
    if not load:
        return ""
    loads = np.array(list(load.values()) if isinstance(load, dict) else load, dtype=np.float64)
    return "/".join(f"{x:.2f}" for x in loads.reshape(-1, loads.shape[-1]).mean(0))


def other_folds_median(prices, folds) -> np.ndarray:
    """Each row's baseline: the median price of the rows in the other folds (one median per fold)."""
    prices, folds = np.asarray(prices, dtype=np.float64), np.asarray(folds)
    kinds, row_fold = np.unique(folds, return_inverse=True)
    medians = np.array([np.median(prices[folds != f]) for f in kinds])
    return medians[row_fold]


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
    median_oof = other_folds_median(train["price"], folds)
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


def run_stages(stages: list[Stage], cfgs: dict, root: Path, profile: str, overrides: list[str],
               wanted: list[str] | None) -> dict:
    """Run each stage that is not up to date, recording in the state what it ran with and what it wrote."""
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
        done = previous.get("fingerprint") == key and previous.get("complete") and stage.name != "report"
        # the files it wrote, checked before it is trusted: a deleted folder reruns the stage that wrote it
        # an edited raw file is new input (prepare's print reads it), not a damaged output
        gone = missing_outputs(previous.get("outputs", {}), root, sizes=not stage.writes_inputs) if done else []
        if done and not gone:
            print(f"[pipeline] {stage.name}: up to date, skipped")
            continue
        if gone:
            shown = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
            print(f"[pipeline] {stage.name}: {len(gone)} of the files it wrote are gone or changed ({shown}); "
                  "rerunning it from scratch")
        changed = previous.get("fingerprint") not in (None, key) or bool(gone)
        if changed and not gone:
            print(f"[pipeline] {stage.name}: config or an upstream stage changed, rerunning from scratch")
        if changed:
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
        if stage.name == "report":
            report(cfgs, root)
        else:
            stage.run(cfg)
        timings[stage.name] = round(time.time() - t0, 1)
        state[stage.name] = {"fingerprint": key, "complete": True, "seconds": timings[stage.name],
                             "outputs": output_record(stage, root)}
        write_json(state_path, state)
    if timings:
        print("[pipeline] seconds per stage: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return timings


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("score=") for a in argv):  # pricing new rows with a trained root: score.py
        import score

        return score.main(argv)
    for key in ("profile", "stages", "root"):
        if sum(a.startswith(f"{key}=") for a in argv) > 1:
            raise ConfigError(f"{key}= is given more than once; give it once")
    profile = next((a.split("=", 1)[1] for a in argv if a.startswith("profile=")), "default")
    if profile not in ROOTS:
        raise ConfigError(f"unknown profile {profile!r}; profiles: {', '.join(ROOTS)}")
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(profile))
        return {}
    wanted = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("stages=")), None)
    root_arg = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("root=")), None)
    overrides = [a for a in argv if not a.startswith(("profile=", "stages=", "root="))]
    # every setting checked, and the GPU found, before the root is locked or its state read
    cfgs = stage_configs(profile, overrides, root_arg)
    root = root_arg or ROOTS[profile]
    stages = build_stages(cfgs, root, profile)
    names = [s.name for s in stages]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ConfigError(f"stages={','.join(wanted)}: unknown stage(s) {unknown}; stages: {', '.join(names)}")
    check_devices(stages, cfgs, wanted)
    check_writable(root, "the run folder")
    with hold_root(root):
        return run_stages(stages, cfgs, root, profile, overrides, wanted)


if __name__ == "__main__":
    run_cli(main)
