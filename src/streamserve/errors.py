"""One root exception; one subclass per failure, each building its own message."""

from __future__ import annotations


class StreamServeError(Exception):
    """Root of every error streamserve raises on purpose."""


class ConfigError(StreamServeError):
    """The pipeline configuration is invalid; the message names the bad key."""


class FieldNotFound(ConfigError):
    """A field path names a field the event schema does not have."""


class RecordError(StreamServeError):
    """A single record could not go through a stage; it is routed to the dead-letter topic."""

    stage = "unknown"


class DecodeError(RecordError):
    """The record's bytes are not a valid Avro event for the configured schema."""

    stage = "decode"


class FeatureError(RecordError):
    """A model input could not be built for the event (missing field, NaN without default...)."""

    stage = "features"


class EnrichError(RecordError):
    """Redis could not be read for the batch after the configured retries."""

    stage = "enrich"


class InferenceError(RecordError):
    """The model produced no usable output (non-finite values) for the event."""

    stage = "infer"


class RecordTooLarge(RecordError):
    """A record exceeds what the producer or its topic accepts; the input it came from is dead-lettered."""

    stage = "produce"

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"a {size}-byte record exceeds the {limit}-byte limit for topic {topic}")
        self.topic = topic
        self.size = size
        self.limit = limit


class RegistryUnavailable(StreamServeError):
    """The Schema Registry did not answer (a platform failure, not the record's): the worker stops
    (kafka.schema_registry_on_unavailable=fail)."""


class ModelError(StreamServeError):
    """A model artifact cannot serve: fetch, digest, signature or warm-up failed."""


class DigestMismatch(ModelError):
    """The artifact's sha256 differs from the announced digest."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {uri}: announced {expected}, artifact has {actual}")
        self.expected = expected
        self.actual = actual


class SignatureMismatch(ModelError):
    """The model's inputs or outputs do not fit the pipeline's feature spec and output mapping."""


class ScoreContractChanged(ModelError):
    """A new version would change what the published score, label or probabilities mean."""


class DeliveryError(StreamServeError):
    """The broker did not acknowledge an output record; its input offset is never committed."""


class TransactionAborted(StreamServeError):
    """A micro-batch's transaction was aborted; its input is read again from the committed offsets."""


class Fenced(StreamServeError):
    """Another producer with this worker's transactional.id took over: this worker must stop."""


class ProducerFailed(StreamServeError):
    """The transactional producer hit a fatal error that is not fencing (e.g. after a broker restart):
    a new producer with the same transactional.id replaces it."""


class ArtifactUnavailable(ModelError):
    """The artifact could not be read or downloaded (possibly transient: the worker retries)."""


class ControlPlaneFailed(StreamServeError):
    """The control-topic follower stopped or stalled: the worker stops rather than serve a stale state."""


class Unreachable(StreamServeError):
    """A server a command needs did not answer within the command's --timeout (checked before any work)."""


class BrokerUnreachable(Unreachable):
    """No Kafka broker answered a metadata request."""

    def __init__(self, bootstrap: str, timeout_s: float, reason: str, hint: str) -> None:
        super().__init__(f"Kafka at {bootstrap} did not answer within {timeout_s:g}s ({reason}): {hint}")
        self.bootstrap = bootstrap


class RedisUnreachable(Unreachable):
    """Redis did not answer PING."""

    def __init__(self, url: str, timeout_s: float, reason: str, hint: str) -> None:
        # A refused connection is known at once: saying "within 10s" after a fraction of a second misleads.
        if "refused" in reason.lower():
            super().__init__(f"Redis at {url} refused the connection ({reason}): {hint}")
        else:
            super().__init__(f"Redis at {url} does not answer within {timeout_s:g}s ({reason}): {hint}")
        self.url = url


class RegistryUnreachable(Unreachable):
    """The Schema Registry gave no answer (a timeout, a refused or reset connection, TLS) to a request the client
    tried 1 + kafka.schema_registry_retries times, each bounded by kafka.schema_registry_timeout_s."""

    def __init__(self, url: str, what: str, reason: str, attempts: int, timeout_s: float, waited_s: float) -> None:
        super().__init__(
            f"the Schema Registry at {url} did not answer {what} ({' '.join(reason.split())}; "
            f"{attempts} attempt(s) of up to {timeout_s:g}s each, gave up after {waited_s:.1f}s): check that it runs "
            "and answers at kafka.schema_registry_url (kafka.schema_registry_timeout_s and "
            "kafka.schema_registry_retries bound the wait)"
        )
        self.url = url


class FileMissing(StreamServeError):
    """A file a command reads does not exist; the message says how to get it."""

    def __init__(self, what: str, path: str, hint: str) -> None:
        super().__init__(f"{what} {path} not found: {hint}")
        self.path = path


class BatchInputError(StreamServeError):
    """An input file of a batch job cannot be read as the pipeline's events (one line naming file and column)."""

    def __init__(self, path: object, problem: str, column: str | None = None) -> None:
        where = f"{path}: column {column!r}: " if column else f"{path}: "
        super().__init__(where + problem)
        self.path = path
        self.column = column
