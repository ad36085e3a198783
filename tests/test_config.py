from __future__ import annotations

from pathlib import Path

import pytest

from egcmf_model.config import Config, ConfigError, from_dict, load_config, to_dict


def test_presets_load_and_differ() -> None:
    tiny, paper = load_config("tiny"), load_config("paper")
    assert isinstance(tiny, Config)
    assert tiny.model.in_size == 64
    assert paper.model.in_size == 512
    assert paper.model.width == 1.0
    assert paper.train.lr == 1e-4


def test_config_is_frozen() -> None:
    cfg = load_config("tiny")
    with pytest.raises(AttributeError):
        cfg.model.width = 2.0  # type: ignore[misc]


def test_overrides_from_the_command_line() -> None:
    cfg = load_config("tiny", overrides=["model.width=0.25", "train.epochs=3", "loss.gamma=1"])
    assert cfg.model.width == 0.25
    assert cfg.train.epochs == 3
    assert cfg.loss.gamma == 1.0
    # PyYAML reads 3e-3 (no dot) as a string; a float field still takes it.
    assert load_config("tiny", overrides=["train.lr=3e-3"]).train.lr == 0.003
    with pytest.raises(ConfigError, match=r"train\.lr must be float"):
        load_config("tiny", overrides=["train.lr=fast"])


def test_user_file_overrides_preset_and_may_choose_it(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("preset: paper\ntrain:\n  epochs: 7\n")
    cfg = load_config("tiny", path)
    assert cfg.preset == "paper"
    assert cfg.model.in_size == 512
    assert cfg.train.epochs == 7


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widht: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.widht"):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match=r"command line.*trian"):
        load_config("tiny", overrides=["trian.epochs=1"])


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochs must be int"):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match=r"augment must be bool"):
        load_config("tiny", overrides=["data.augment=3"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", overrides=["model.variant=resnet"])


def test_bad_yaml_and_preset(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_round_trip_through_dict() -> None:
    cfg = load_config("paper", overrides=["model.variant=mrfm"])
    assert from_dict(to_dict(cfg)) == cfg


def test_fields_checked_together_may_come_from_any_layer_in_any_order(tmp_path) -> None:
    """dp.frozen=encoders needs model.weights: refused alone, accepted with the weights from
    another layer (a file, then an override) or earlier in the same command line; a section
    given as a value merges into what the command line already set."""
    with pytest.raises(ConfigError, match=r"dp\.frozen=encoders .* give them with model\.weights"):
        load_config("tiny", overrides=["dp.frozen=encoders"])
    (tmp_path / "dp.yaml").write_text("dp:\n  frozen: encoders\n")
    with pytest.raises(ConfigError, match=r"dp\.frozen=encoders"):
        load_config(path=tmp_path / "dp.yaml")
    assert load_config(path=tmp_path / "dp.yaml",
                       overrides=["model.weights=/w.pt"]).dp.frozen == "encoders"
    both = load_config("tiny", overrides=["dp.frozen=encoders", "model.weights=/w.pt"])
    assert (both.dp.frozen, both.model.weights) == ("encoders", "/w.pt")
    merged = load_config("tiny", overrides=["train.lr=0.5", "train={epochs: 2}"])
    assert (merged.train.lr, merged.train.epochs) == (0.5, 2)
    assert load_config("tiny", overrides=["train.lr=0.5", "train.lr=0.25"]).train.lr == 0.25
    with pytest.raises(ConfigError, match=r"'train\.lr\.x=2': lr is a value, not a section"):
        load_config("tiny", overrides=["train.lr=1", "train.lr.x=2"])
    with pytest.raises(ConfigError, match=r"dp\.public_epochs must be 0 or more"):
        load_config("tiny", overrides=["dp.public_epochs=-1"])
    for views in (0, 9):
        with pytest.raises(ConfigError, match=rf"dp\.augmentations must be 1 to 8.*not {views}"):
            load_config("tiny", overrides=[f"dp.augmentations={views}"])
    with pytest.raises(ConfigError, match=r"dp\.augmentations=2 .* needs data\.augment=true "
                                          r"\(or set dp\.augmentations=1"):
        load_config("tiny", overrides=["dp.augmentations=2", "data.augment=false"])
