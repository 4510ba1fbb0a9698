"""Schema Registry subjects on the worker's behalf: subject names under a strategy, and the prediction schema's id.

With output.wire_format every prediction starts with the magic byte and the prediction schema's id, found (or
registered) once at start. Decoding wire-format input lives in decode.py; the CI checks of the schemas in
ops/schema_registry.py.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from streamserve.config import KafkaSettings, PipelineSettings
from streamserve.errors import ConfigError, RegistryUnreachable
from streamserve.pipeline.decode import WIRE_MAGIC

_WIRE_HEADER = struct.Struct(">bI")


def registry_client(kafka: KafkaSettings) -> Any:
    """confluent-kafka's SchemaRegistryClient with the pipeline's URL, TLS, basic auth, timeouts and cache."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    conf = kafka.schema_registry_config()
    if conf is None:
        raise ConfigError("kafka.schema_registry_url is not set")
    return SchemaRegistryClient.new_client(conf)


def no_answer_errors() -> tuple[type[BaseException], ...]:
    """What the registry client's HTTP layer raises when no answer came (timeouts, refused or reset connections,
    TLS): httpx's TransportError, of the httpx the client uses (newer confluent-kafka prefers httpx2)."""
    try:
        from confluent_kafka.schema_registry.common._httpx_compat import httpx
    except ImportError:  # a confluent-kafka from before httpx2
        try:
            import httpx  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return (OSError,)
    return httpx.TransportError, OSError


@contextmanager
def answered(kafka: KafkaSettings, what: str) -> Iterator[None]:
    """Requests to the registry whose HTTP failure (a timeout, a refused connection, TLS: raised by the client
    once its retries are spent) becomes one RegistryUnreachable line naming the URL. An answer, even a refusal
    (SchemaRegistryError), passes through as it is."""
    started = time.monotonic()
    try:
        yield
    except no_answer_errors() as exc:
        raise RegistryUnreachable(
            str(kafka.schema_registry_url),
            what,
            f"{type(exc).__name__}: {exc}",
            kafka.schema_registry_retries + 1,
            kafka.schema_registry_timeout_s,
            time.monotonic() - started,
        ) from exc


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
    action = "register" if settings.output.auto_register else "find"
    try:
        with answered(settings.kafka, f"when asked to {action} the prediction schema under subject {subject!r}"):
            if settings.output.auto_register:
                schema_id = client.register_schema(subject, schema)
            else:
                schema_id = client.lookup_schema(subject, schema).schema_id
    except SchemaRegistryError as exc:
        raise ConfigError(
            f"cannot {action} the prediction schema {settings.output.schema_path} under subject {subject!r}: {exc}"
        ) from exc
    return _WIRE_HEADER.pack(WIRE_MAGIC, schema_id)
