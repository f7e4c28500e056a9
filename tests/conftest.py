import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PRICE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory):
    """A small synthetic catalog and its processed tables, shared by the tests of every stage."""
    from data import prepare, synthetic
    from data.config import PrepareConfig, SyntheticConfig

    root = tmp_path_factory.mktemp("demo")
    raw = synthetic.main(SyntheticConfig(out_dir=root / "raw", n_train=600, n_test=150, seed=3, image_size=32))
    prepare.main(PrepareConfig(raw_dir=raw, out_dir=root / "data", download_workers=4))
    return root
