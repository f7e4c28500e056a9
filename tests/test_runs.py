"""The one resume bookkeeping every trainer uses: last.pt with its config, RNG and history."""
from dataclasses import dataclass, replace

import pytest
import torch

from core.config import ConfigError
from core.runs import load_last, save_last


@dataclass
class Cfg:
    lr: float = 1e-3
    resume: bool = True


def test_resume_state_round_trips_with_its_rng_and_history(tmp_path):
    torch.manual_seed(3)
    save_last(tmp_path / "last.pt", Cfg(), {"epoch": 4, "best": 1.5}, [{"epoch": 4, "loss": 0.2}])
    expected = torch.rand(3)  # what the run would draw next
    torch.manual_seed(99)
    state = load_last(tmp_path / "last.pt", Cfg())
    assert state["epoch"] == 4 and state["history"] == [{"epoch": 4, "loss": 0.2}]
    assert torch.equal(torch.rand(3), expected)
    assert (tmp_path / "history.csv").read_text().splitlines() == ["epoch,loss", "4,0.2"]


def test_a_state_from_another_config_is_refused_and_resume_false_ignores_it(tmp_path):
    save_last(tmp_path / "last.pt", Cfg(), {"epoch": 0}, [])
    with pytest.raises(ConfigError, match="another config"):
        load_last(tmp_path / "last.pt", Cfg(lr=5e-4))
    assert load_last(tmp_path / "last.pt", replace(Cfg(lr=5e-4), resume=False)) is None
    assert load_last(tmp_path / "missing.pt", Cfg()) is None
