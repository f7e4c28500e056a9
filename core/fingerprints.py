"""Stage fingerprints that follow what a stage reads, and the package versions a run was trained with.

Each stage gets two prints. The train-side print covers its settings, the train file's content and
its upstream stages' train-side prints: a stage that reads only train rows (a fine-tune, a fusion
model) is keyed by it, so a new test.csv never retrains. The full print adds the test file's content
and the upstream stages' full prints: a stage that reads test rows is keyed by it. Raw files count
by their bytes, never their times, and paths under the run's root count relative to it, so touching
the files or copying the whole root elsewhere reruns nothing.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from core.io import read_json

STATE_FILE = "pipeline_state.json"  # under the run's root: each stage's print, and what the run was trained with
# the packages whose version can change a trained model or its predictions
PACKAGES = ("torch", "numpy", "pandas", "scikit-learn", "transformers", "peft", "open_clip_torch", "lightgbm")
BLOCK = 1 << 20  # bytes read at a time when hashing a file


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str | None:
    """sha1 of the file's bytes, read in blocks; None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def portable(value, root: Path):
    """`value` with every path under `root` written relative to it (recursing into lists and dicts).
    A string counts as a path only if it is absolute or holds a separator; anything else, and any
    path outside the root, is kept exactly as written (a hub name such as Qwen/Qwen3-Embedding-0.6B
    is never turned into a local path)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and (os.path.isabs(value) or os.sep in value)):
        absolute, base = os.path.abspath(value), os.path.abspath(root)
        if absolute == base or absolute.startswith(base + os.sep):
            return "<root>/" + Path(os.path.relpath(absolute, base)).as_posix()
        return str(value)
    return value


def portable_overrides(tokens: list[str], root: Path) -> list[str]:
    """`key=value` command-line tokens with each value written by `portable`."""
    out = []
    for token in tokens:
        key, sep, value = token.partition("=")
        out.append(f"{key}{sep}{portable(value, root)}" if sep else token)
    return out


def rooted_overrides(tokens: list[str], root: Path) -> list[str]:
    """The inverse of `portable_overrides`: "<root>/x" values point under `root` again."""
    out = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if value == "<root>/." or value.startswith("<root>/"):
            value = str(Path(root) / value.removeprefix("<root>/"))
        out.append(f"{key}{sep}{value}")
    return out


def run_settings(root: Path) -> dict | None:
    """{"profile", "overrides"} the last pipeline run under `root` ran its stages with (overrides
    pointing under `root` again), or None when none is recorded."""
    path = Path(root) / STATE_FILE
    recorded = read_json(path).get("run_with") if path.exists() else None
    if recorded is None:
        return None
    return {"profile": recorded["profile"], "overrides": rooted_overrides(recorded["overrides"], root)}


@dataclass(frozen=True)
class StagePrint:
    train: str  # settings + train content + upstream train-side prints
    full: str  # the train-side print + test content + upstream full prints


def stage_print(name: str, settings: dict, upstream: list[StagePrint], train_inputs=None,
                test_inputs=None) -> StagePrint:
    """Both prints of one stage; `train_inputs`/`test_inputs` describe raw files it reads (their digests)."""
    train = fingerprint(name, settings, [u.train for u in upstream], train_inputs)
    return StagePrint(train, fingerprint(train, [u.full for u in upstream], test_inputs))


def installed_versions() -> dict[str, str | None]:
    """python and each package in PACKAGES, None for one that is not installed."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def version_differences(recorded: dict) -> dict[str, tuple]:
    """{package: (recorded version, installed version)} for each package whose version changed."""
    installed = installed_versions()
    return {name: (recorded.get(name), installed.get(name)) for name in sorted(set(recorded) | set(installed))
            if recorded.get(name) != installed.get(name)}


def trained_with(root: Path) -> dict | None:
    """{"profile", "versions"} recorded in <root>/pipeline_state.json by the last run that trained, or None."""
    path = Path(root) / STATE_FILE
    return read_json(path).get("trained_with") if path.exists() else None


def version_changes(root: Path) -> dict[str, tuple]:
    """How the installed versions differ from those the run under `root` was trained with ({} if none recorded)."""
    recorded = trained_with(root)
    return version_differences(recorded["versions"]) if recorded else {}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
