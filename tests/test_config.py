"""Tests of the typed configuration: defaults, files, overrides, and rejection of unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.config import AuditConfig, build_config, flatten, load_config_file
from audit.errors import ConfigError


def test_defaults_fill_everything_but_data(tmp_path: Path) -> None:
    config = build_config(data=tmp_path)
    assert isinstance(config, AuditConfig)
    assert config.data == tmp_path
    assert config.methods == ("gradcam",)
    assert config.probe.epochs == 30
    assert config.findings.enrichment_bar == 2.0
    assert config.model.arch is None
    assert config.fail_on is None


def test_data_is_required() -> None:
    with pytest.raises(ConfigError, match="data"):
        build_config()


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError, match="methodz"):
        build_config(data="d", methodz="gradcam")


def test_unknown_nested_key_is_named_with_its_path(tmp_path: Path) -> None:
    file = tmp_path / "audit.toml"
    file.write_text('data = "d"\n[probe]\nepochz = 3\n')
    with pytest.raises(ConfigError, match=r"probe\.epochz"):
        build_config(file)


def test_toml_file(tmp_path: Path) -> None:
    file = tmp_path / "audit.toml"
    file.write_text('data = "images"\nmethods = ["gradcam", "gradcampp"]\nfail_on = "watch"\n[probe]\nepochs = 7\n')
    config = build_config(file)
    assert config.data == Path("images")
    assert config.methods == ("gradcam", "gradcampp")
    assert config.fail_on == "watch"
    assert config.probe.epochs == 7
    assert config.probe.batch_size == 32  # untouched nested default


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"audit{suffix}"
    file.write_text("data: images\nmodel:\n  arch: resnet18\nfindings:\n  min_images: 9\n")
    config = build_config(file)
    assert config.model.arch == "resnet18"
    assert config.findings.min_images == 9


def test_dotted_overrides_beat_the_file(tmp_path: Path) -> None:
    file = tmp_path / "audit.toml"
    file.write_text('data = "images"\n[probe]\nepochs = 7\nwidth = 8\n')
    config = build_config(file, **{"probe.epochs": 3, "findings.leakage_auc_bar": 0.7, "data": "other"})
    assert config.probe.epochs == 3
    assert config.probe.width == 8  # sibling from the file kept
    assert config.findings.leakage_auc_bar == 0.7
    assert config.data == Path("other")


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    file = tmp_path / "audit.toml"
    file.write_text('data = "images"\nbatch_size = 8\n[probe]\nepochs = 7\n')
    config = build_config(file, batch_size=None, **{"probe.epochs": None, "fail_on": None})
    assert config.batch_size == 8
    assert config.probe.epochs == 7
    assert config.fail_on is None


def test_methods_string_is_split_and_stripped() -> None:
    assert build_config(data="d", methods="a, b").methods == ("a", "b")
    assert build_config(data="d", methods=" gradcam ,").methods == ("gradcam",)


@pytest.mark.parametrize("methods", ["", " , ", []])
def test_empty_methods_rejected(methods: object) -> None:
    with pytest.raises(ConfigError, match="methods"):
        build_config(data="d", methods=methods)


def test_out_of_range_value_rejected_with_key() -> None:
    with pytest.raises(ConfigError, match=r"probe\.epochs"):
        build_config(data="d", **{"probe.epochs": 0})


def test_config_is_frozen(tmp_path: Path) -> None:
    config = build_config(data=tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for a frozen model
        config.batch_size = 1  # type: ignore[misc]


def test_bad_suffix_rejected(tmp_path: Path) -> None:
    file = tmp_path / "audit.json"
    file.write_text('{"data": "d"}')
    with pytest.raises(ConfigError, match=r"\.toml"):
        build_config(file)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.toml")


def test_invalid_toml_rejected(tmp_path: Path) -> None:
    file = tmp_path / "audit.toml"
    file.write_text("data = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(file)


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "audit.yaml"
    file.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(file)


def test_flatten_gives_dotted_string_keys(tmp_path: Path) -> None:
    config = build_config(data=tmp_path, methods="gradcam,gradcampp", **{"probe.epochs": 4})
    flat = flatten(config)
    assert flat["probe.epochs"] == "4"
    assert flat["methods"] == "gradcam,gradcampp"
    assert flat["regions.detectors"] == "text,border"
    assert flat["model.arch"] == "None"
    assert flat["data"] == str(tmp_path)
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values())
