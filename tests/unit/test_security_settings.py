"""Security settings: Redis TLS and ACL user, Schema Registry TLS and basic auth, secrets kept out of reprs."""

from __future__ import annotations

import shutil
from pathlib import Path

import certifi
import pytest
import yaml
from confluent_kafka.admin import AclBinding
from pydantic import ValidationError

from streamserve.config import KafkaSettings, RedisSettings, load_settings
from streamserve.errors import ConfigError
from streamserve.ops.admin import publisher_acls, worker_acls
from streamserve.pipeline.decode import RegistryDecoder, load_schema

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud" / "pipeline.yaml"
SCHEMAS = EXAMPLE.parents[2] / "schemas"


def _example_with(tmp_path: Path, **sections: dict[str, object]) -> Path:
    """The example pipeline copied next to its schemas' relative paths, with sections updated."""
    directory = tmp_path / "examples" / "fraud"
    directory.mkdir(parents=True)
    shutil.copytree(SCHEMAS, tmp_path / "schemas")
    config = yaml.safe_load(EXAMPLE.read_text())
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_redis_tls_files_resolve_against_the_config_file_and_the_password_stays_secret(tmp_path: Path) -> None:
    path = _example_with(
        tmp_path,
        redis={
            "url": "rediss://127.0.0.1:6380/0",
            "username": "worker",
            "password": "hunter2-redis",
            "ssl_ca_certs": "tls/ca.pem",
            "ssl_certfile": "tls/client.pem",
            "ssl_keyfile": "tls/client.key",
        },
    )
    settings = load_settings(path)
    assert settings.redis.ssl_ca_certs == path.parent / "tls" / "ca.pem"
    assert settings.redis.ssl_keyfile == path.parent / "tls" / "client.key"
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "hunter2-redis"
    assert "hunter2-redis" not in repr(settings)
    assert "hunter2-redis" not in str(settings.model_dump())


def test_redis_rejects_a_password_in_the_url_and_tls_files_without_tls() -> None:
    with pytest.raises(ValidationError, match=r"redis\.password"):
        RedisSettings(url="redis://worker:hunter2@127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="rediss://"):
        RedisSettings(url="redis://127.0.0.1:6379/0", ssl_ca_certs=Path("ca.pem"))
    with pytest.raises(ValidationError, match="go together"):
        RedisSettings(url="rediss://127.0.0.1:6379/0", ssl_certfile=Path("client.pem"))


def test_schema_registry_client_config_carries_tls_and_basic_auth() -> None:
    ca_bundle = Path(certifi.where())  # any readable CA bundle: the client loads it when it is built
    kafka = KafkaSettings(
        schema_registry_url="mock://registry",
        schema_registry_username="svc",
        schema_registry_password="hunter2-registry",  # type: ignore[arg-type]
        schema_registry_ca_location=ca_bundle,
    )
    conf = kafka.schema_registry_config()
    assert conf == {
        "url": "mock://registry",
        "basic.auth.user.info": "svc:hunter2-registry",
        "ssl.ca.location": str(ca_bundle),
        "timeout": 10.0,
        "cache.capacity": 1000,
        "max.retries": 2,
        "retries.wait.ms": 200,
        "retries.max.wait.ms": 5000,
    }
    assert "hunter2-registry" not in repr(kafka)
    assert KafkaSettings().schema_registry_config() is None
    decoder = RegistryDecoder.from_config(conf, load_schema(SCHEMAS / "card_transaction.avsc"))
    assert isinstance(decoder, RegistryDecoder)
    with pytest.raises(ValidationError, match="go together"):
        KafkaSettings(schema_registry_url="https://registry", schema_registry_username="svc")


def test_a_bad_security_setting_names_its_key(tmp_path: Path) -> None:
    path = _example_with(tmp_path, redis={"url": "redis://u:p@127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load_settings(path)


def test_acls_let_the_worker_read_control_and_only_the_publisher_write_it() -> None:
    settings = load_settings(EXAMPLE)
    control = settings.control.topic

    def grants(bindings: list[AclBinding], topic: str) -> set[str]:
        return {b.operation.name for b in bindings if b.restype.name == "TOPIC" and b.name == topic}

    worker, publisher = worker_acls(settings, "User:worker"), publisher_acls(settings, "User:publisher")
    assert grants(worker, control) == {"READ"}
    assert grants(publisher, control) == {"READ", "WRITE"}
    assert grants(worker, settings.input.topic) == {"READ"}
    assert grants(worker, settings.output.topic) == {"WRITE", "DESCRIBE_CONFIGS"}  # its size limit, read at start
    assert grants(worker, settings.output.dead_letter_topic) == {"WRITE", "DESCRIBE_CONFIGS"}
    assert {b.principal for b in worker} == {"User:worker"}
    assert {b.permission_type.name for b in worker + publisher} == {"ALLOW"}
