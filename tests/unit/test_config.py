"""The settings tree: YAML, env overrides, errors that name the key, librdkafka dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from streamserve.config import config_from, load_settings
from streamserve.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud" / "pipeline.yaml"


def test_example_config_loads_with_paths_resolved_against_the_file() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.input.schema_path.is_file()
    assert settings.output.schema_path.name == "prediction.avsc"
    assert settings.model.uri == str((EXAMPLE.parent / "models" / "fraud-v1.onnx").resolve())
    assert [f.name for f in settings.features][:3] == ["amount", "hour_of_day", "is_online"]
    assert settings.delivery == "at_least_once"


def test_env_vars_override_nested_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS", "10.1.2.3:9093")
    monkeypatch.setenv("STREAMSERVE_BATCH__MAX_WAIT_MS", "3")
    monkeypatch.setenv("STREAMSERVE_DELIVERY", "exactly_once")
    settings = load_settings(EXAMPLE)
    assert settings.kafka.bootstrap_servers == "10.1.2.3:9093"
    assert settings.kafka.group_id == "fraud-scorer", "the file's other keys in the section survive"
    assert settings.batch.max_wait_ms == 3
    assert settings.batch.max_batch_size == 1024
    assert settings.delivery == "exactly_once"


def test_errors_name_the_bad_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSERVE_BATCH__MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match=r"batch\.max_batch_size"):
        load_settings(EXAMPLE)
    monkeypatch.delenv("STREAMSERVE_BATCH__MAX_BATCH_SIZE")
    broken = tmp_path / "broken.yaml"
    broken.write_text(EXAMPLE.read_text().replace("key_field: card_id", "key_feild: card_id"))
    with pytest.raises(ConfigError) as info:
        load_settings(broken)
    assert "input.key_field" in str(info.value)
    assert "input.key_feild" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_prediction_headers_default_to_the_model_version_and_name_the_key_when_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(EXAMPLE).output.headers == ["model_version"]
    monkeypatch.setenv("STREAMSERVE_OUTPUT__HEADERS", '["source_offset", "model_name"]')
    assert load_settings(EXAMPLE).output.headers == ["source_offset", "model_name"]
    monkeypatch.setenv("STREAMSERVE_OUTPUT__HEADERS", "[]")
    assert load_settings(EXAMPLE).output.headers == []
    monkeypatch.setenv("STREAMSERVE_OUTPUT__HEADERS", '["model_version", "source_offest"]')
    with pytest.raises(ConfigError) as info:
        load_settings(EXAMPLE)
    assert "output.headers.1" in str(info.value)
    assert "'source_offset'" in str(info.value), "the error lists the known headers"
    monkeypatch.setenv("STREAMSERVE_OUTPUT__HEADERS", '["model_version", "model_version"]')
    with pytest.raises(ConfigError, match=r"output\.headers: .*each header once"):
        load_settings(EXAMPLE)


@pytest.mark.parametrize("section", ["producer", "client"])
def test_a_producer_reporting_failures_only_is_refused_with_the_reason(tmp_path: Path, section: str) -> None:
    # Offsets are committed on each output record's delivery report: without success reports nothing would be.
    config = tmp_path / "only-errors.yaml"
    config.write_text(
        EXAMPLE.read_text().replace(
            "  group_id: fraud-scorer", f"  group_id: fraud-scorer\n  {section}: {{delivery.report.only.error: true}}"
        )
    )
    with pytest.raises(ConfigError, match=rf"kafka\.{section}: remove delivery\.report\.only\.error"):
        load_settings(config)
    config.write_text(config.read_text().replace("only.error: true", "only.error: false"))
    assert getattr(load_settings(config).kafka, section) == {"delivery.report.only.error": False}


def test_librdkafka_dicts_layer_defaults_user_settings_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSERVE_KAFKA__SASL_PASSWORD", "s3cret")
    settings = load_settings(EXAMPLE)
    assert "s3cret" not in repr(settings)
    consumer = settings.kafka.consumer_config(enable_auto_commit=False)
    assert consumer["bootstrap.servers"] == settings.kafka.bootstrap_servers
    assert consumer["group.id"] == "fraud-scorer"
    assert consumer["enable.auto.commit"] is False
    assert consumer["sasl.password"] == "s3cret"


def test_config_from_an_example_applies_overrides_by_key_and_by_feature_name(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "fraud" / "pipeline.yaml"
    config = config_from(
        example,
        {
            "batch.max_wait_ms": 3,
            "features.merchant_risk.default": None,
            "features.txn_count_24h.key": "t:card:{card_id}",
            "kafka": {"group_id": "g"},
        },
    )
    assert config["batch"] == {"max_batch_size": 1024, "max_wait_ms": 3}
    by_name = {f["name"]: f for f in config["features"]}
    assert "default" not in by_name["merchant_risk"]
    assert by_name["txn_count_24h"]["key"] == "t:card:{card_id}"
    assert by_name["avg_amount_30d"]["key"] == "card:{card_id}", "other features untouched"
    assert config["kafka"] == {"bootstrap_servers": "127.0.0.1:9092", "group_id": "g"}, "dicts merge"
    assert Path(config["input"]["schema"]).is_absolute()
    assert Path(config["input"]["schema"]).is_file(), "relative paths resolved against the example's folder"
    written = tmp_path / "p.yaml"
    written.write_text(yaml.safe_dump(config))
    settings = load_settings(written)
    assert settings.batch.max_wait_ms == 3
    with pytest.raises(ConfigError, match="no feature named 'nope'"):
        config_from(example, {"features.nope.key": "x"})
