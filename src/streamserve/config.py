"""One typed settings tree for a pipeline, read from YAML with every key overridable by env vars.

Environment variables use the prefix ``STREAMSERVE_`` and ``__`` between levels, e.g.
``STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092`` or ``STREAMSERVE_BATCH__MAX_WAIT_MS=10``.
Relative paths in the file are resolved against the file's directory.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from streamserve.errors import ConfigError
from streamserve.observe.kafkalog import librdkafka_logger

_yaml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("streamserve_yaml", default=None)

LibrdkafkaValue = str | int | float | bool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Broker connection shared by every client of the worker."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of brokers."""
    group_id: str = "streamserve"
    """Consumer group of the inference consumers; workers with the same group share partitions."""
    client: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    """Extra librdkafka settings for every client (security.protocol, sasl.*, ssl.* ...)."""
    consumer: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    """Extra librdkafka settings for the inference consumer only."""
    producer: dict[str, LibrdkafkaValue] = Field(default_factory=dict)
    """Extra librdkafka settings for the output producer only."""
    sasl_password: SecretStr | None = None
    """Passed as sasl.password; kept out of logs and reprs."""
    schema_registry_url: str | None = None
    """Confluent Schema Registry URL; when set, input values in wire format are decoded through it."""
    schema_registry_username: str | None = None
    """Basic-auth user (or API key) of the Schema Registry."""
    schema_registry_password: SecretStr | None = None
    """Basic-auth password (or API secret) of the Schema Registry; kept out of logs and reprs."""
    schema_registry_ca_location: Path | None = None
    """CA bundle that signed the registry's certificate (https); the system's CAs when unset."""
    schema_registry_certificate_location: Path | None = None
    """Client certificate (PEM) when the registry requires mutual TLS."""
    schema_registry_key_location: Path | None = None
    """Private key (PEM) of the client certificate."""
    schema_registry_timeout_s: float = Field(default=10.0, gt=0)
    """Timeout of one HTTP request to the registry: connecting, and each read of its answer (a registry that
    accepts the connection and never answers costs this much). A request is tried 1 + schema_registry_retries
    times, so a registry that hangs is given up on after about (1 + retries) x this plus the backoff pauses; then
    the worker stops at start with one line naming the URL, and a writer schema's fetch goes to
    schema_registry_on_unavailable."""
    schema_registry_cache_capacity: int = Field(default=1000, ge=1)
    """Schemas kept by the registry client, and writer schemas (resolved to the reader schema) kept by id."""
    schema_registry_retries: int = Field(default=2, ge=0)
    """Retries of one request by the client (connection errors, 408/429/5xx) before the policy below applies."""
    schema_registry_backoff_ms: int = Field(default=200, ge=1)
    """First pause between retries; doubled each time."""
    schema_registry_max_backoff_ms: int = Field(default=5000, ge=1)
    """Longest pause between retries."""
    schema_registry_on_unavailable: Literal["wait", "dead_letter", "fail"] = "wait"
    """When a writer schema cannot be fetched because the registry does not answer (connection refused, timeout,
    TLS or auth failure, 5xx) after the retries: ``wait`` keeps retrying with backoff, blocking intake, until it
    answers (nothing is lost); ``dead_letter`` routes the record to the DLQ (stage decode); ``fail`` stops the
    worker. Ids the registry says do not exist, and writer schemas the reader schema cannot resolve, always go
    to the DLQ: they are the record's fault."""

    @model_validator(mode="after")
    def _check_registry_auth(self) -> KafkaSettings:
        if (self.schema_registry_username is None) != (self.schema_registry_password is None):
            raise ValueError("schema_registry_username and schema_registry_password go together")
        if (self.schema_registry_certificate_location is None) != (self.schema_registry_key_location is None):
            raise ValueError("schema_registry_certificate_location and schema_registry_key_location go together")
        return self

    @model_validator(mode="after")
    def _check_delivery_reports(self) -> KafkaSettings:
        for section, values in (("client", self.client), ("producer", self.producer)):
            if str(values.get("delivery.report.only.error", "false")).lower() not in ("false", "0"):
                raise ValueError(
                    f"kafka.{section}: remove delivery.report.only.error - a worker commits input offsets only "
                    "after each output record's delivery report, so it needs one for every record"
                )
        return self

    def common(self) -> dict[str, LibrdkafkaValue]:
        """librdkafka settings every client of this worker starts from."""
        # librdkafka logs through Python logging (not its own `%3|...|FAIL|` lines on stderr); an idle connection
        # the broker closes is not worth a line. `logger` is no librdkafka value, hence the Any.
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "logger": librdkafka_logger(),
            "log.connection.close": False,
        }
        conf.update(self.client)
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf

    def schema_registry_config(self) -> dict[str, str | int | float] | None:
        """Settings of confluent-kafka's SchemaRegistryClient (url, TLS, basic auth, timeouts, cache, retries);
        None without a registry."""
        if not self.schema_registry_url:
            return None
        conf: dict[str, str | int | float] = {
            "url": self.schema_registry_url,
            "timeout": self.schema_registry_timeout_s,
            "cache.capacity": self.schema_registry_cache_capacity,
            "max.retries": self.schema_registry_retries,
            "retries.wait.ms": self.schema_registry_backoff_ms,
            "retries.max.wait.ms": self.schema_registry_max_backoff_ms,
        }
        if self.schema_registry_username is not None and self.schema_registry_password is not None:
            secret = self.schema_registry_password.get_secret_value()
            conf["basic.auth.user.info"] = f"{self.schema_registry_username}:{secret}"
        for key, path in (
            ("ssl.ca.location", self.schema_registry_ca_location),
            ("ssl.certificate.location", self.schema_registry_certificate_location),
            ("ssl.key.location", self.schema_registry_key_location),
        ):
            if path is not None:
                conf[key] = str(path)
        return conf

    def consumer_config(self, **defaults: LibrdkafkaValue) -> dict[str, LibrdkafkaValue]:
        """The inference consumer's settings: our defaults, then the user's."""
        conf = {**self.common(), "group.id": self.group_id, **_dotted(defaults)}
        conf.update(self.consumer)
        return conf

    def producer_config(self, **defaults: LibrdkafkaValue) -> dict[str, LibrdkafkaValue]:
        """The output producer's settings: our defaults, then the user's."""
        conf = {**self.common(), **_dotted(defaults)}
        conf.update(self.producer)
        return conf


class InputSettings(_Section):
    """The topic events are read from and how to decode them."""

    topic: str
    """Kafka topic the events are read from."""
    schema_path: Path = Field(alias="schema")
    """Avro schema (.avsc) of the events: the writer schema, or the reader schema with a registry."""
    key_field: str
    """Event field path used as the output record key (and for canary routing); may be nullable."""
    event_id_field: str
    """Event field path that identifies the event; copied into its prediction; may be nullable."""
    event_time_field: str | None = None
    """Event field path with the event time (timestamp-millis/micros, date, or a long in epoch ms); the
    Kafka timestamp when unset. A null event time is valid: the prediction carries null."""
    subject: str | None = None
    """Registry subject of the producers' writer schemas (``streamserve schemas check``); ``<topic>-value``
    (Confluent's TopicNameStrategy) when unset."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FeatureSpec(_Section):
    """One model feature: where its value comes from, how it is parsed, and which model input it feeds.

    Features feeding the same model input become its columns in the order they are listed here.
    """

    name: str
    """Name of the feature, unique in the pipeline."""
    source: Literal["event", "redis"]
    """``event``: a field of the event; ``redis``: a field of the Redis entry under ``key``."""
    field: str
    """Event field path (source=event), e.g. ``amount``, ``device.os.version``, ``scores[2]``; or the Redis
    hash field (source=redis)."""
    key: str | None = None
    """Redis key template filled from event field paths, e.g. ``card:{card_id}`` or ``dev:{device.id}``
    (source=redis). A null in a key field means "no entity": the group's features count as missing."""
    dtype: Literal["float32", "float64", "int32", "int64", "bool", "string"] = "float32"
    """How the raw value is read: a number of this type, a boolean, or a string (a categorical value passed
    to a string model input, or mapped through ``vocabulary``). Numbers are cast to the model input's type."""
    default: float | str | None = None
    """Used when the value is null, missing or stale; without one, such an event goes to the DLQ."""
    length: int | None = Field(default=None, ge=1)
    """Reads an Avro array of this many numbers as a vector feature of ``length`` columns."""
    input: str | None = None
    """Model input this feature feeds; the model's only input (or ``model.input_name``) when unset."""
    encoding: Literal["none", "ordinal", "onehot"] = "none"
    """Categorical mapping with ``vocabulary``: ``ordinal`` gives the index of the value (the vocabulary's
    length for an unknown value), ``onehot`` one column per value plus a last ``unknown`` column."""
    vocabulary: list[str] | None = None
    """The known categories, in order; or use ``vocabulary_file``."""
    vocabulary_file: Path | None = None
    """A file with one category per line (or a JSON list), e.g. shipped beside the model."""
    max_age_s: float | None = None
    """Older values (by ``updated_at_field``) count as missing."""
    updated_at_field: str | None = None
    """Hash field holding the epoch-milliseconds time the entity's features were written."""
    layout: Literal["hash", "packed"] = "hash"
    """How the entity is stored in Redis (source=redis): ``hash`` reads hash field ``field`` with HMGET;
    ``packed`` reads one little-endian float32 vector per entity with MGET (one command per key template
    and batch, much cheaper per key) and takes its element ``index``. Features of one key template share
    one layout; NaN in a vector counts as missing."""
    index: int | None = Field(default=None, ge=0)
    """Position of the feature in the packed float32 vector (layout=packed)."""

    @model_validator(mode="after")
    def _check_source(self) -> FeatureSpec:
        if self.source == "redis" and not self.key:
            raise ValueError(f"feature {self.name!r}: source 'redis' needs a key template")
        if self.max_age_s is not None and not self.updated_at_field:
            raise ValueError(f"feature {self.name!r}: max_age_s needs updated_at_field")
        self._check_layout()
        self._check_encoding()
        if self.length is not None and self.source != "event":
            raise ValueError(f"feature {self.name!r}: vector features (length) read an event array field")
        if self.length is not None and self.dtype in ("string", "bool"):
            raise ValueError(f"feature {self.name!r}: vector features are numeric")
        if isinstance(self.default, str) and not self.categorical:
            raise ValueError(f"feature {self.name!r}: a text default needs dtype 'string'")
        return self

    def _check_layout(self) -> None:
        """A packed feature is a single float32 of a Redis vector, at its index; index is for packed alone."""
        if self.layout == "packed":
            if self.source != "redis":
                raise ValueError(f"feature {self.name!r}: layout 'packed' is for source 'redis'")
            if self.index is None:
                raise ValueError(f"feature {self.name!r}: layout 'packed' needs the vector index")
            if self.max_age_s is not None:
                raise ValueError(f"feature {self.name!r}: max_age_s needs layout 'hash' (a vector has no time)")
            if self.dtype == "string" or self.length is not None:
                raise ValueError(f"feature {self.name!r}: a packed vector holds single float32 values")
        elif self.index is not None:
            raise ValueError(f"feature {self.name!r}: index is for layout 'packed'")

    def _check_encoding(self) -> None:
        """An encoding needs a vocabulary and a vocabulary needs an encoding; vectors have neither."""
        if self.encoding != "none":
            if self.vocabulary is None and self.vocabulary_file is None:
                raise ValueError(
                    f"feature {self.name!r}: encoding {self.encoding!r} needs vocabulary or vocabulary_file"
                )
            if self.length is not None:
                raise ValueError(f"feature {self.name!r}: a vector feature cannot have a vocabulary")
        elif self.vocabulary is not None or self.vocabulary_file is not None:
            raise ValueError(f"feature {self.name!r}: a vocabulary needs encoding 'ordinal' or 'onehot'")

    @property
    def categorical(self) -> bool:
        """Read as text: passed to a string input, or mapped through the vocabulary."""
        return self.dtype == "string"

    @property
    def text(self) -> bool:
        """Feeds a string model input as it is (no vocabulary)."""
        return self.dtype == "string" and self.encoding == "none"

    @property
    def width(self) -> int:
        """Columns this feature gives its model input."""
        if self.length is not None:
            return self.length
        if self.encoding == "onehot":
            return len(self.vocabulary or []) + 1
        return 1


class ModelSettings(_Section):
    """The model the worker serves until the control topic says otherwise, and how its outputs are read."""

    name: str
    """Name of the model: predictions carry it, and announcements on the control topic name it."""
    uri: str
    """Artifact location: a path, file:// or http(s):// URI of an .onnx file."""
    version: str = "1"
    """Version served until the control topic announces another; predictions carry it."""
    input_name: str | None = None
    """Model input fed by the features that name no ``input``; the model's only input when unset."""
    score_output: str = "probabilities"
    """Output tensor that gives the score (a probability matrix or a regression vector)."""
    score_column: int | str | None = 1
    """Column of a 2-D score output: an index, or a class label (e.g. ``failure``) looked up in the model's
    classes; None for 1-D outputs."""
    label_output: str | None = "label"
    """Output tensor with class labels (int or string), or None for regressors."""
    probabilities: bool = False
    """Also write the whole probability vector (score_output) into the prediction, keyed by class label."""
    extra_outputs: list[str] = Field(default_factory=list)
    """Further output tensors with one number per row, written to the prediction's ``outputs`` map."""
    classes: list[str] | None = None
    """Class labels in the column order of score_output; read from the model's classifier node when unset."""
    intra_op_threads: int = 1
    """onnxruntime's threads within one operator (intra_op_num_threads)."""
    inter_op_threads: int = 1
    """onnxruntime's threads across operators (inter_op_num_threads)."""
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    """onnxruntime execution providers in order of preference; unavailable ones are skipped."""
    sha256: str | None = None
    """Expected digest of the artifact, checked when set."""


PredictionHeader = Literal["model_name", "model_version", "source_topic", "source_partition", "source_offset"]
"""A Kafka header a prediction may carry (``streamserve.model.name``, ... ``streamserve.source.offset``)."""
DEFAULT_PREDICTION_HEADERS: tuple[PredictionHeader, ...] = ("model_version",)


class OutputSettings(_Section):
    """Where predictions and rejected records go."""

    topic: str
    """Kafka topic the predictions are written to."""
    schema_path: Path = Field(alias="schema")
    """Avro schema of prediction records."""
    dead_letter_topic: str
    """Where records that cannot be scored go, with their original bytes and the stage and reason in headers."""
    shadow_topic: str | None = None
    """Topic for shadow-model predictions; ``<topic>.shadow`` when unset."""
    copy_fields: dict[str, str] = Field(default_factory=dict)
    """Event fields copied into each prediction: prediction field name -> event field path, e.g.
    ``{region: region, os: device.os.name}``; the output schema must have these fields."""
    wire_format: bool = False
    """Write predictions in Schema Registry wire format (magic byte 0, the 4-byte schema id, the Avro body), so
    any Confluent-compatible consumer (AvroDeserializer, Connect, ksqlDB, Flink) reads them; needs
    kafka.schema_registry_url. Off: schemaless Avro, as before. Dead letters keep the original bytes either way."""
    subject_name_strategy: Literal["topic", "record", "topic_record"] = "topic"
    """Subject of the prediction schema (wire_format): ``topic`` is ``<topic>-value``, ``record`` the schema's
    full name, ``topic_record`` ``<topic>-<full name>`` (Confluent's TopicName/RecordName/TopicRecordName)."""
    auto_register: bool = True
    """Register the prediction schema at start (wire_format); off: it must already be registered (a CI step
    registers it) and the worker only looks its id up."""
    headers: list[PredictionHeader] = Field(default_factory=lambda: list(DEFAULT_PREDICTION_HEADERS))
    """Kafka headers each prediction carries, named ``streamserve.<name with dots>`` (``model_version`` is
    ``streamserve.model.version``). They repeat fields of the value, so each costs bytes on every record (see
    docs/models-and-signatures.md); the model version alone by default, so a consumer can route or filter without
    decoding. ``[]``: none. The trace header (``traceparent``) is added whenever the batch is traced, whatever this
    says."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("headers")
    @classmethod
    def _unique_headers(cls, headers: list[PredictionHeader]) -> list[PredictionHeader]:
        if len(set(headers)) != len(headers):
            raise ValueError(f"each header once, got {headers}")
        return headers


class BatchSettings(_Section):
    """Micro-batches close at whichever bound comes first."""

    max_batch_size: int = Field(default=1024, ge=1, le=100_000)
    """Reached only when records are waiting (a backlog); below that max_wait_ms closes batches. A batch has a
    fixed CPU cost of ~1 ms (`python -m bench.batch_cost`): 1024 keeps it under 5% of the batch."""
    max_wait_ms: int = Field(default=10, ge=0, le=60_000)
    """The longest a batch's first record waits in the worker before the batch is scored while the worker keeps
    up. It also sets the CPU floor: once events arrive faster than one per max_wait_ms, the worker scores
    ~1000/max_wait_ms batches a second (`python -m bench.rate_cost`)."""
    max_inflight_batches: int = Field(default=16, ge=1)
    """Batches produced but not yet acknowledged before intake pauses (backpressure)."""


class RedisSettings(_Section):
    """Feature store connection and failure policy."""

    url: str = "redis://127.0.0.1:6379/0"
    """``redis://`` or, for TLS, ``rediss://`` host, port and database; credentials go in username/password."""
    username: str | None = None
    """ACL user (Redis 6+); the ``default`` user when unset."""
    password: SecretStr | None = None
    """Password of the ACL user; kept out of logs and reprs."""
    ssl_ca_certs: Path | None = None
    """CA bundle that signed the server's certificate (``rediss://``); the system's CAs when unset."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) when the server requires one (``tls-auth-clients yes``)."""
    ssl_keyfile: Path | None = None
    """Private key (PEM) of the client certificate."""
    ssl_check_hostname: bool = True
    """Check that the server's certificate names the host of ``url``."""
    timeout_ms: int = Field(default=1000, ge=1)
    """Socket and connect timeout of the Redis client."""
    retries: int = Field(default=3, ge=0)
    """Retries of a failed round trip, with backoff, before ``on_error`` applies."""
    backoff_ms: int = Field(default=100, ge=0)
    """First pause between retries; doubled each time up to ``max_backoff_ms``."""
    on_error: Literal["dead_letter", "wait", "defaults", "fail"] = "dead_letter"
    """When Redis fails after the retries: ``dead_letter`` routes the batch's events to the DLQ; ``wait``
    keeps retrying (intake stops) until Redis answers; ``defaults`` scores with each feature's default and
    flags the predictions ``degraded`` (events of features without a default go to the DLQ); ``fail`` stops
    the worker."""
    max_backoff_ms: int = Field(default=5000, ge=1)
    """Longest pause between retries."""

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        if urlsplit(url).password is not None:
            raise ValueError("put the password in redis.password (STREAMSERVE_REDIS__PASSWORD), not in the URL")
        return url

    @model_validator(mode="after")
    def _check_tls(self) -> RedisSettings:
        tls_files = (self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile)
        if any(path is not None for path in tls_files) and urlsplit(self.url).scheme != "rediss":
            raise ValueError("ssl_* files need a rediss:// URL (TLS)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        return self


class ControlSettings(_Section):
    """Control plane: model announcements in, worker status out."""

    topic: str = "streamserve.control"
    """Compacted topic of model announcements (one partition); every worker reads it from its beginning."""
    status_topic: str = "streamserve.status"
    """Where each worker reports the version it serves, its state and its last rejection (``models status``)."""
    enabled: bool = True
    """Follow the control topic; off: serve the config's model only."""
    artifact_cache_dir: Path = Path("~/.cache/streamserve/models")
    """Verified http(s) artifacts are kept here under their sha256, so restarts need no download."""
    keep_versions: int = Field(default=3, ge=1)
    """Loaded versions kept in memory so a rollback needs no reload."""
    trusted_keys: list[str] = Field(default_factory=list)
    """Ed25519 public keys (``ed25519:<base64>``, from ``streamserve keys generate``) whose signed
    announcements are accepted; several at once during a key rotation. As an env var:
    ``STREAMSERVE_CONTROL__TRUSTED_KEYS='["ed25519:..."]'``."""
    trusted_keys_file: Path | None = None
    """A file of trusted public keys, one per line (``#`` comments), e.g. a mounted Kubernetes secret."""
    require_signatures: bool | None = None
    """Reject unsigned announcements. Unset: required as soon as a trusted key is configured."""
    allowed_uri_schemes: list[str] = Field(default_factory=lambda: ["file", "http", "https"])
    """Artifact URI schemes an announcement may use (plain paths count as ``file``)."""
    follower_timeout_s: float = Field(default=300.0, gt=0)
    """The control-topic follower must go round within this time (a load included), or the worker turns
    unready and exits non-zero: a worker never serves a stale state silently."""
    retry_interval_s: float = Field(default=5.0, gt=0)
    """First pause before loading again an accepted version whose artifact could not be fetched
    (doubling up to five minutes)."""
    max_generation_step: int = Field(default=1_000_000, ge=1, le=2**40)
    """An announcement's generation may be at most this far above the highest accepted one: a record that
    claims a huge generation is rejected, so it can never use up the generations of later publishes."""

    @model_validator(mode="after")
    def _check_trust(self) -> ControlSettings:
        if self.require_signatures and not self.trusted_keys and self.trusted_keys_file is None:
            raise ValueError("require_signatures needs trusted_keys or trusted_keys_file")
        return self


class ObserveSettings(_Section):
    """Metrics and health probes on one HTTP port."""

    port: int | None = Field(default=None, ge=0, le=65535)
    """Port of /metrics (Prometheus), /healthz and /readyz; disabled when unset (0 picks a free port)."""
    host: str = "0.0.0.0"
    """Address to listen on; Kubernetes probes reach the pod IP."""
    liveness_timeout_s: float = Field(default=120.0, gt=0)
    """/healthz fails when the micro-batch loop has not gone round for this long (unless it waits by policy:
    a Redis outage under ``redis.on_error: wait``)."""
    targets_dir: Path | None = None
    """Prometheus file-based discovery: while the worker serves, ``<targets_dir>/<worker_id>.json`` names its
    observe address (``scripts/stack up --monitoring`` sets it through ``stack env``)."""
    stalled_after_s: float = Field(default=30.0, gt=0)
    """/readyz fails while a micro-batch has been stuck in one stage (e.g. enrich waiting for Redis) this long."""
    trace_sample_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of micro-batches traced (OpenTelemetry, exported over OTLP/HTTP); 0 turns tracing off at no cost."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP base URL of the trace collector, e.g. http://otel-collector:4318; unset: the exporter's own
    default (OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else http://localhost:4318)."""


QualityMetric = Literal["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "brier", "mae", "rmse"]
_LOWER_IS_BETTER = ("log_loss", "brier", "mae", "rmse")


class MonitorSettings(_Section):
    """``streamserve monitor``: predictions joined with delayed labels by event id, quality per model version and
    window, shadow and canary versions compared with the live one (docs/monitor.md)."""

    labels_topic: str | None = None
    """Labels (schemas/label.avsc: event id, true label or value, label time); ``<input.topic>.labels`` when unset."""
    labels_dead_letter_topic: str | None = None
    """Labels the monitor cannot use (garbage, wrong type, unknown event id, duplicate, after the TTL), with the
    reason in headers; ``<labels topic>.dlq`` when unset."""
    quality_topic: str = "streamserve.quality"
    """Quality reports (schemas/quality_report.avsc), keyed ``<model>|<window start>``; read by `models quality`."""
    app_id: str | None = None
    """faust application id: its consumer group and the prefix of its internal topics (by-event records, the
    join table's changelog); ``<kafka.group_id>-monitor`` when unset."""
    partitions: int = Field(default=8, ge=1)
    """Partitions of the join: of the monitor's internal topics (by-event records, the join table's changelog).
    The processes of a monitor group split them, so up to this many processes join (docs/monitor.md, Scale-out);
    the one owning partition 0 also reports, from every partition's changelog. Fixed when the internal topics are
    created: to change it, give the monitor a new ``app_id``."""
    window_s: float = Field(default=3600.0, gt=0)
    """Tumbling event-time window of the reports."""
    label_ttl_s: float = Field(default=86400.0, gt=0)
    """How long (event time) a prediction waits for its label, and a label for its prediction; after it the
    prediction counts as never labelled and the label as one for an unknown event id."""
    sweep_s: float = Field(default=60.0, gt=0)
    """Step (event time) in which each partition's clock advances and expired entries are swept."""
    idle_s: float = Field(default=30.0, gt=0)
    """A source (a partition of the predictions, shadow or labels topic) that sent nothing for this long
    (processing time) no longer holds back the event-time clock (docs/monitor.md). After a restart or a
    rebalance every source holds it this long: keep it above the time a dead monitor process's partitions take
    to resume in another (faust's 10 s session, then the changelog read back)."""
    report_every_s: float = Field(default=10.0, gt=0)
    """How often changed windows are reported (quality topic, Prometheus)."""
    task: Literal["auto", "classification", "regression"] = "auto"
    """What the model does; ``auto``: regression when model.label_output is null."""
    positive_class: str | None = None
    """The class ``score`` is the probability of (binary precision, recall, F1, ROC AUC): model.score_column when
    that is a class label, else ``"1"``."""
    min_labels: int = Field(default=100, ge=1)
    """Labelled pairs a version needs before its quality counts as measured (not estimated), before a
    comparison names a better version, and before the floor alerts may fire."""
    confidence: float = Field(default=0.95, gt=0, lt=1)
    """Confidence level of the comparisons' intervals."""
    bootstrap_samples: int = Field(default=1000, ge=50, le=100_000)
    """Resamples of the bootstrap intervals of the comparisons (all measures but ROC AUC, compared by DeLong)."""
    compare_metric: Literal["auto"] | QualityMetric = "auto"
    """Measure of the comparisons; ``auto``: ROC AUC (binary), accuracy (more classes), MAE (regressors)."""
    floors: dict[QualityMetric, float] = Field(default_factory=dict)
    """Alert when a live or canary version's measure is below this (higher-is-better measures), e.g.
    ``{roc_auc: 0.8}``; exported as ``streamserve_quality_floor`` for the StreamserveQualityBelowFloor rule."""
    ceilings: dict[QualityMetric, float] = Field(default_factory=dict)
    """The same for lower-is-better measures (log_loss, brier, mae, rmse), e.g. ``{brier: 0.2}``."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the monitor's /metrics, /healthz and /readyz; disabled when unset."""
    host: str = "0.0.0.0"
    """Address the monitor's port listens on."""
    data_dir: Path | None = None
    """faust's data directory; a fresh temporary one when unset (the tables live in memory and their changelog)."""

    # --- feature log, training set and drift (issue 24, items 3 and 4) ---
    feature_log: bool = False
    """Write a sample of the scored events (inputs as fed, prediction, version) to ``feature_log_topic``."""
    feature_log_topic: str = "streamserve.features"
    """Topic of the feature log (schemas/feature_log.avsc)."""
    feature_log_share: float = Field(default=0.01, ge=0.0, le=1.0)
    """Share of scored events logged, chosen by a hash of the event id, so a replay logs the same events."""
    training_set_topic: str = "streamserve.training"
    """Topic of (inputs as served, prediction, label) rows (schemas/training_example.avsc)."""
    drift_topic: str = "streamserve.drift"
    """Topic of drift records (schemas/drift.avsc): a feature whose PSI went above ``psi_threshold``."""
    psi_threshold: float = Field(default=0.25, gt=0)
    """Population stability index above which a feature (or the score) counts as drifted."""
    drift_window: int = Field(default=5000, ge=100)
    """Scored events per PSI window: a version's PSI is computed each time this many of its events were scored."""

    @model_validator(mode="after")
    def _check_thresholds(self) -> MonitorSettings:
        for metric in self.floors:
            if metric in _LOWER_IS_BETTER:
                raise ValueError(f"monitor.floors: {metric} is lower-is-better; put it in monitor.ceilings")
        for metric in self.ceilings:
            if metric not in _LOWER_IS_BETTER:
                raise ValueError(f"monitor.ceilings: {metric} is higher-is-better; put it in monitor.floors")
        if self.label_ttl_s < self.sweep_s:
            raise ValueError("monitor.label_ttl_s must be at least monitor.sweep_s")
        return self


# --- streaming features (`streamserve features stream`): aggregates per entity over event-time windows ---------


class AggregateSpec(_Section):
    """One streaming feature: an aggregate of the events of one entity over an event-time window."""

    name: str
    """The Redis hash field written (layout hash); what a model feature reads with ``field``."""
    key: str
    """Redis key template of the entity, filled from ``input.key_field`` alone (checked when the app starts: the
    input is partitioned by it, so one app writes each entity), e.g. ``card_stats:{card_id}``. Use a key of its
    own: the app stamps it with ``updated_at`` (the entity's latest event time)."""
    function: Literal["count", "sum", "mean", "min", "max", "distinct_count"]
    """What is computed over the window: the events (count), or ``field`` (the others)."""
    field: str | None = None
    """Event field path aggregated (every function but count); numbers for sum/mean/min/max, any value for
    distinct_count."""
    window_s: float = Field(gt=0)
    """Window length in seconds, e.g. 600 for "in the last 10 minutes"."""
    hop_s: float | None = Field(default=None, gt=0)
    """Hopping windows start every ``hop_s`` (a divisor of window_s); tumbling windows when unset."""
    layout: Literal["hash", "packed"] = "hash"
    """``hash``: one hash field per aggregate; ``packed``: a float32 at ``index`` of the entity's vector."""
    index: int | None = Field(default=None, ge=0)
    """Position in the packed vector (layout packed)."""

    @property
    def window_ms(self) -> int:
        """Window length in milliseconds."""
        return round(self.window_s * 1000)

    @property
    def hop_ms(self) -> int:
        """Window start interval in milliseconds (the window length when tumbling)."""
        return self.window_ms if self.hop_s is None else round(self.hop_s * 1000)

    @model_validator(mode="after")
    def _check(self) -> AggregateSpec:
        where = f"aggregate {self.name!r}"
        if (self.function == "count") != (self.field is None):
            raise ValueError(f"{where}: {self.function} {'takes no' if self.field else 'needs a'} field")
        if abs(self.window_s * 1000 - self.window_ms) > 1e-6 or self.window_ms < 1:
            raise ValueError(f"{where}: window_s must be a whole number of milliseconds")
        if self.hop_s is not None and (self.hop_ms < 1 or self.window_ms % self.hop_ms or self.hop_ms > self.window_ms):
            raise ValueError(f"{where}: hop_s must divide window_s into whole milliseconds")
        if (self.layout == "packed") != (self.index is not None):
            raise ValueError(f"{where}: layout 'packed' and index go together")
        return self


class StreamFeatureSettings(_Section):
    """The faust-streaming app that keeps windowed aggregates per entity in Redis (``features stream``)."""

    app_id: str = "streamserve-features"
    """faust app id: the consumer group, and the prefix of the state's changelog topic."""
    aggregates: list[AggregateSpec] = Field(default_factory=list)
    updated_at_field: str = "updated_at"
    """Hash field stamped with the entity's latest event time (epoch ms): a model feature's updated_at_field."""
    dead_letter_topic: str | None = None
    """Where events the aggregates cannot use go, with the reason; ``output.dead_letter_topic`` when unset."""
    max_batch_size: int = Field(default=1000, ge=1)
    """Events folded per step (one Redis round trip per step)."""
    max_wait_ms: int = Field(default=50, ge=1)
    """Longest an event waits for its step to fill."""
    commit_interval_s: float = Field(default=1.0, gt=0)
    """How often input offsets are committed (the state's changelog is flushed first)."""
    replication_factor: int = Field(default=1, ge=1)
    """Replication factor of the changelog topic the app creates."""
    session_timeout_s: float = Field(default=10.0, gt=0)
    """After this long without a heartbeat an app is out of the group and its partitions move to the others (a
    killed app's partitions wait this long before another app, or its restart, takes them)."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the app's /metrics, /healthz and /readyz (docs/streaming-features.md); disabled when unset."""
    host: str = "0.0.0.0"
    """Address the app's port listens on."""

    @field_validator("aggregates")
    @classmethod
    def _consistent(cls, aggregates: list[AggregateSpec]) -> list[AggregateSpec]:
        seen: dict[tuple[str, str], AggregateSpec] = {}
        for spec in aggregates:
            first = seen.setdefault((spec.key, spec.name), spec)
            if first is not spec:
                raise ValueError(f"aggregate {spec.name!r} appears twice under key {spec.key!r}")
            same_key = [s for s in aggregates if s.key == spec.key]
            if any(s.layout != spec.layout for s in same_key):
                raise ValueError(f"aggregates of key {spec.key!r} mix layouts 'hash' and 'packed'")
            if spec.index is not None and sum(s.index == spec.index for s in same_key) > 1:
                raise ValueError(f"aggregates of key {spec.key!r} share index {spec.index}")
        return aggregates


class PipelineSettings(BaseSettings):
    """A streamserve pipeline: input, features, model, output, batching, clients."""

    model_config = SettingsConfigDict(env_prefix="STREAMSERVE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    worker_id: str | None = None
    """Name of this worker in status reports; host name and pid when unset."""
    input: InputSettings
    features: list[FeatureSpec]
    model: ModelSettings
    output: OutputSettings
    batch: BatchSettings = BatchSettings()
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    control: ControlSettings = ControlSettings()
    observe: ObserveSettings = ObserveSettings()
    monitor: MonitorSettings = MonitorSettings()
    stream_features: StreamFeatureSettings = StreamFeatureSettings()
    """Windowed aggregates per entity kept in Redis by ``streamserve features stream``."""
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """``at_least_once`` commits input offsets after outputs are acknowledged (duplicates possible after a
    crash); ``exactly_once`` commits outputs and input offsets in one Kafka transaction per micro-batch
    (readers with isolation.level=read_committed see each prediction once)."""
    transaction_timeout_ms: int = Field(default=60_000, ge=1000)
    """transaction.timeout.ms of the exactly-once producer."""
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM/SIGINT: time to finish the open batch, flush and commit (keep below Kubernetes'
    terminationGracePeriodSeconds)."""
    log_every_s: float = 10.0
    """Interval of the progress log line; 0 disables it."""

    @field_validator("features")
    @classmethod
    def _unique_names(cls, features: list[FeatureSpec]) -> list[FeatureSpec]:
        names = [f.name for f in features]
        if not features:
            raise ValueError("at least one feature is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        layouts: dict[str, str] = {}
        for feature in features:
            if feature.source == "redis" and layouts.setdefault(feature.key or "", feature.layout) != feature.layout:
                raise ValueError(f"features of key {feature.key!r} mix layouts 'hash' and 'packed'")
        return features

    @model_validator(mode="after")
    def _wire_format_needs_a_registry(self) -> PipelineSettings:
        if self.output.wire_format and not self.kafka.schema_registry_url:
            raise ValueError("output.wire_format needs kafka.schema_registry_url")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def shadow_topic(self) -> str:
        """Topic of shadow predictions."""
        return self.output.shadow_topic or f"{self.output.topic}.shadow"

    @property
    def labels_topic(self) -> str:
        """Topic of the labels the monitor joins with the predictions."""
        return self.monitor.labels_topic or f"{self.input.topic}.labels"

    @property
    def labels_dead_letter_topic(self) -> str:
        """Topic of the labels the monitor cannot use."""
        return self.monitor.labels_dead_letter_topic or f"{self.labels_topic}.dlq"

    @property
    def monitor_app_id(self) -> str:
        """faust application id of the monitor."""
        return self.monitor.app_id or f"{self.kafka.group_id}-monitor"

    @property
    def monitor_task(self) -> Literal["classification", "regression"]:
        """What the model does, as the monitor measures it."""
        if self.monitor.task != "auto":
            return self.monitor.task
        return "regression" if self.model.label_output is None else "classification"

    @property
    def positive_class(self) -> str | None:
        """The class a binary classifier's score is the probability of (None for regressors)."""
        if self.monitor_task == "regression":
            return None
        if self.monitor.positive_class is not None:
            return self.monitor.positive_class
        column = self.model.score_column
        return column if isinstance(column, str) else "1"


def load_settings(path: str | os.PathLike[str], **overrides: Any) -> PipelineSettings:
    """Read a pipeline YAML file (env vars win over it, keyword overrides over both)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    _check_yaml(file)
    check_environment(os.environ)
    token = _yaml_path.set(file)
    try:
        settings = PipelineSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(file, exc, os.environ)) from exc
    finally:
        _yaml_path.reset(token)
    _register_secrets(settings)
    return _resolve_paths(settings, file.parent)


_PATH_KEYS = (("input", "schema"), ("output", "schema"), ("model", "uri"), ("control", "trusted_keys_file"))


def config_from(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A pipeline YAML as a dict - its relative file paths made absolute - with overrides applied.

    For tests, benchmarks and tools that start from an example pipeline instead of retyping one. Overrides
    are dotted keys (``batch.max_wait_ms``); ``features.<name>.<key>`` edits the feature of that name; a dict
    value is merged into a dict; ``None`` removes the key.
    """
    file = Path(path).expanduser().resolve()
    config: dict[str, Any] = yaml.safe_load(file.read_text()) or {}
    for section, key in _PATH_KEYS:
        value = config.get(section, {}).get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute():
            config[section][key] = str((file.parent / value).resolve())
    return apply_overrides(config, overrides or {})


def apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides to a pipeline config dict in place (see config_from) and return it."""
    for dotted, value in overrides.items():
        node: Any = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            if isinstance(node, list):  # features: addressed by name
                found = next((item for item in node if item.get("name") == part), None)
                if found is None:
                    raise ConfigError(f"override {dotted!r}: no feature named {part!r}")
                node = found
            else:
                node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        elif isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return config


def _register_secrets(settings: PipelineSettings) -> None:
    """Tell the log redactor every secret of the config, so no log line ever shows one."""
    from urllib.parse import urlsplit

    from streamserve.observe.logs import register_secret

    if settings.kafka.sasl_password is not None:
        register_secret(settings.kafka.sasl_password.get_secret_value())
    register_secret(urlsplit(settings.redis.url).password)
    for secret in (settings.redis.password, settings.kafka.schema_registry_password):
        if secret is not None:
            register_secret(secret.get_secret_value())
    for key, value in settings.kafka.client.items():
        if any(word in key for word in ("password", "secret", "token")):
            register_secret(str(value))


def _check_yaml(file: Path) -> None:
    """A file that is no YAML mapping, in one line naming where the YAML breaks."""
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"{file} is not valid YAML ({where}{problem}); check the indentation and quotes there"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not a text file (a pipeline config is UTF-8 YAML)") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{file} holds a YAML {type(data).__name__}, not a mapping: a pipeline config has keys input:, features:,"
            " model:, output: (`streamserve init` writes one)"
        )


_ENV_PREFIX = "STREAMSERVE_"


def check_environment(environ: Mapping[str, str]) -> None:
    """Every STREAMSERVE_<SECTION>__<KEY> variable names a section of the config: a typo is reported, not ignored
    (variables without ``__`` may be other tools' settings, e.g. STREAMSERVE_LOG_LEVEL)."""
    sections = list(PipelineSettings.model_fields)
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX) or "__" not in name:
            continue
        section, rest = name.removeprefix(_ENV_PREFIX).split("__", 1)
        if section.lower() in sections:
            continue
        near = difflib.get_close_matches(section.lower(), sections, n=1, cutoff=0.6)
        hint = f"did you mean {_ENV_PREFIX}{near[0].upper()}__{rest}?" if near else f"sections: {', '.join(sections)}"
        raise ConfigError(
            f"environment variable {name}: the pipeline config has no section {section.lower()!r}; {hint}"
            " (unset it, or fix its name)"
        )


def _env_paths(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """The config path each STREAMSERVE_ variable sets, e.g. ("batch", "max_wait_ms") -> its name."""
    paths = {}
    for name in environ:
        if name.startswith(_ENV_PREFIX):
            paths[tuple(name.removeprefix(_ENV_PREFIX).lower().split("__"))] = name
    return paths


def _explain(file: Path, exc: ValidationError, environ: Mapping[str, str]) -> str:
    """The validation errors, one line each, blaming the environment variable that set a key when one did."""
    from_env = _env_paths(environ)
    lines, blamed_file = [], False
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "(root)"
        message = _unknown_key(loc) if error["type"] == "extra_forbidden" else error["msg"]
        variable = next((name for path, name in from_env.items() if loc[: len(path)] == path), None)
        if variable is not None:
            lines.append(f"  {key}: {message} (set by environment variable {variable})")
        else:
            blamed_file = True
            lines.append(f"  {key}: {message}")
    header = f"invalid pipeline config {file}:" if blamed_file else f"invalid environment setting(s) for {file}:"
    if len(lines) == 1:  # the usual case: one line, as every error of the CLI
        return f"{header} {lines[0].strip()}"
    return "\n".join([header, *lines])


def _unknown_key(loc: tuple[str, ...]) -> str:
    """Why a key is refused, with the nearest valid key of its section ("did you mean `max_wait_ms`?")."""
    valid = _keys_at(loc[:-1])
    if not valid:
        return "unknown key"
    near = difflib.get_close_matches(loc[-1].lower(), valid, n=1, cutoff=0.6)
    if near:
        return f"unknown key; did you mean `{near[0]}`?"
    return f"unknown key; valid keys here: {', '.join(valid)}"


def _keys_at(loc: tuple[str, ...]) -> list[str]:
    """The keys the settings accept at a path (aliases as the YAML spells them); [] when it is not a section."""
    model: Any = PipelineSettings
    for part in loc:
        if part.isdigit():
            continue  # an item of a list (features)
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        info = fields.get(part)
        if info is None:
            return []
        model = next((t for t in _types_of(info.annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _types_of(annotation: Any) -> list[Any]:
    """The types inside an annotation: ``list[X] | None`` -> [X, None]."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [inner for arg in args for inner in _types_of(arg)]


def _resolve_paths(settings: PipelineSettings, base: Path) -> PipelineSettings:
    def resolve(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    def resolve_files(section: _Section) -> Any:
        """The section with its optional certificate/key paths made absolute."""
        files = {name: resolve(value) for name, value in section if isinstance(value, Path)}
        return section.model_copy(update=files)

    model_uri = settings.model.uri
    if "://" not in model_uri:
        model_uri = str(resolve(Path(model_uri)))
    features = [
        spec.model_copy(update={"vocabulary": read_vocabulary(spec.name, resolve(spec.vocabulary_file))})
        if spec.vocabulary_file and spec.vocabulary is None
        else spec
        for spec in settings.features
    ]
    return settings.model_copy(
        update={
            "features": features,
            "input": settings.input.model_copy(update={"schema_path": resolve(settings.input.schema_path)}),
            "output": settings.output.model_copy(update={"schema_path": resolve(settings.output.schema_path)}),
            "model": settings.model.model_copy(update={"uri": model_uri}),
            "kafka": resolve_files(settings.kafka),
            "redis": resolve_files(settings.redis),
        }
    )


def read_vocabulary(feature: str, path: Path) -> list[str]:
    """A vocabulary file: a JSON list of strings, or one category per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"feature {feature!r}: cannot read vocabulary_file {path}: {exc.strerror}") from exc
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"feature {feature!r}: vocabulary_file {path} is not a JSON list: {exc}") from exc
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"feature {feature!r}: vocabulary_file {path} must be a JSON list of strings")
        return values
    return [line.strip() for line in text.splitlines() if line.strip()]


def _dotted(options: dict[str, LibrdkafkaValue]) -> dict[str, LibrdkafkaValue]:
    """Keyword-friendly names (``enable_idempotence``) to librdkafka's (``enable.idempotence``)."""
    return {name.replace("_", "."): value for name, value in options.items()}
