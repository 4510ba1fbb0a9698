"""Schema Registry subjects on the worker's behalf: subject names under a strategy, and the prediction schema's id.

With output.wire_format every prediction starts with the magic byte and the prediction schema's id, found (or
registered) once at start. Decoding wire-format input lives in decode.py; the CI checks of the schemas in
ops/schema_registry.py.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from streamserve.config import KafkaSettings, PipelineSettings
from streamserve.errors import ConfigError
from streamserve.pipeline.decode import WIRE_MAGIC

_WIRE_HEADER = struct.Struct(">bI")


def registry_client(kafka: KafkaSettings) -> Any:
    """confluent-kafka's SchemaRegistryClient with the pipeline's URL, TLS, basic auth, timeouts and cache."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf = kafka.schema_registry_config()
    if conf is None:
        raise ConfigError("kafka.schema_registry_url is not set")
    return SchemaRegistryClient.new_client(conf)


def full_name(schema: dict[str, Any]) -> str:
    """The record's full name (namespace.name), as Confluent's RecordNameStrategy uses it."""
    name = str(schema["name"])
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def subject_name(strategy: str, topic: str, schema: dict[str, Any]) -> str:
    """The subject of a record value schema under a subject name strategy (topic, record, topic_record)."""
    if strategy == "topic":
        return f"{topic}-value"
    if strategy == "record":
        return full_name(schema)
    if strategy == "topic_record":
        return f"{topic}-{full_name(schema)}"
    raise ConfigError(f"unknown subject name strategy {strategy!r} (expected topic, record or topic_record)")


def prediction_subject(settings: PipelineSettings) -> str:
    """The subject of the prediction schema: the output topic's under output.subject_name_strategy.

    Shadow predictions carry the same schema id (a consumer resolves ids, not subjects).
    """
    schema = json.loads(settings.output.schema_path.read_text())
    return subject_name(settings.output.subject_name_strategy, settings.output.topic, schema)


def prediction_prefix(settings: PipelineSettings, client: Any | None = None) -> bytes:
    """The 5 bytes (magic byte, schema id) every prediction starts with under output.wire_format; b"" when off.

    With output.auto_register the schema is registered (a no-op when it already is; the registry refuses a
    schema its compatibility rule forbids), otherwise it must be registered already.
    """
    if not settings.output.wire_format:
        return b""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryError

    client = client or registry_client(settings.kafka)
    schema = Schema(settings.output.schema_path.read_text(), "AVRO")
    subject = prediction_subject(settings)
    try:
        if settings.output.auto_register:
            schema_id = client.register_schema(subject, schema)
        else:
            schema_id = client.lookup_schema(subject, schema).schema_id
    except SchemaRegistryError as exc:
        action = "register" if settings.output.auto_register else "find"
        raise ConfigError(
            f"cannot {action} the prediction schema {settings.output.schema_path} under subject {subject!r}: {exc}"
        ) from exc
    return _WIRE_HEADER.pack(WIRE_MAGIC, schema_id)
