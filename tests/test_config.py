"""The key=value configuration every stage shares."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from core.config import ConfigError, from_dict, parse_args, to_dict


@dataclass
class Example:
    lr: float = 1e-3
    epochs: int = 10
    use_amp: bool = True
    name: str = "run"
    out_dir: Path = Path("out")
    init: Optional[Path] = None
    dims: list[int] = field(default_factory=lambda: [768, 1152])


PROFILES = {"tiny": Example(epochs=1, dims=[8, 8])}


def test_overrides_are_parsed_to_the_field_types():
    cfg = parse_args(Example, ["lr=0.5", "epochs=3", "use_amp=false", "out_dir=/tmp/x", "dims=4,5,6", "init=none"])
    assert cfg.lr == 0.5 and cfg.epochs == 3 and cfg.use_amp is False
    assert cfg.out_dir == Path("/tmp/x") and cfg.dims == [4, 5, 6] and cfg.init is None
    assert parse_args(Example, ["dims=[1, 2]"]).dims == [1, 2]


def test_profile_is_the_starting_point_and_overrides_win():
    cfg = parse_args(Example, ["profile=tiny", "epochs=7"], PROFILES)
    assert cfg.epochs == 7 and cfg.dims == [8, 8]
    assert PROFILES["tiny"].epochs == 1  # the preset itself is not mutated


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        parse_args(Example, ["learning_rate=1"])
    assert "learning_rate" in str(err.value) and "lr" in str(err.value) and "epochs" in str(err.value)


@pytest.mark.parametrize("token", ["epochs=three", "lr=fast", "use_amp=maybe", "dims=a,b"])
def test_wrong_type_is_a_clear_error(token):
    with pytest.raises(ConfigError) as err:
        parse_args(Example, [token])
    assert token.split("=")[0] in str(err.value)


def test_token_without_equals_and_unknown_profile_are_errors():
    with pytest.raises(ConfigError):
        parse_args(Example, ["epochs"])
    with pytest.raises(ConfigError, match="tiny"):
        parse_args(Example, ["profile=huge"], PROFILES)


def test_saved_config_round_trips():
    cfg = parse_args(Example, ["init=/a/b", "dims=1,2"])
    assert from_dict(Example, to_dict(cfg)) == cfg
