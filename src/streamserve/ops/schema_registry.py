"""``streamserve schemas check``, for CI: can the reader schema read the latest registered writer schema of the
input subject, and may the prediction schema be registered after the one already there.

What the worker itself asks of the registry lives in the pipeline: decoding wire-format input in
pipeline/decode.py (RegistryDecoder), subject names and the prediction schema's id in pipeline/subjects.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import fastavro

from streamserve.config import PipelineSettings
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.subjects import answered, prediction_subject, registry_client

_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


# --------------------------------------------------------------------------- local resolution (Avro spec)


def resolution_errors(writer: Any, reader: Any, path: str = "") -> list[str]:
    """Why data written with `writer` cannot be read with `reader` (Avro schema resolution); [] when it can.

    Schemas as fastavro.parse_schema(..., expand=True) returns them (named types inlined).
    """
    where = path or "the record"
    if isinstance(writer, list):  # every branch the writer may have used must be readable
        return [error for branch in writer for error in resolution_errors(branch, reader, path)]
    if isinstance(reader, list):
        if any(not resolution_errors(writer, branch, path) for branch in reader):
            return []
        return [f"{where}: no branch of the reader's union reads the writer's {_type_name(writer)}"]
    w_type, r_type = _type_name(writer), _type_name(reader)
    if w_type != r_type:
        if r_type in _PROMOTIONS.get(w_type, set()):
            return []
        return [f"{where}: the writer's {w_type} cannot be read as {r_type}"]
    if w_type == "record":
        return _record_errors(writer, reader, path)
    if w_type == "enum":
        unknown = sorted(set(writer["symbols"]) - set(reader["symbols"]))
        if unknown and "default" not in reader:
            return [f"{where}: enum symbols {unknown} are unknown to the reader (and it has no default)"]
        return []
    if w_type == "array":
        return resolution_errors(writer["items"], reader["items"], f"{path}[]")
    if w_type == "map":
        return resolution_errors(writer["values"], reader["values"], f"{path}{{}}")
    if w_type == "fixed" and writer["size"] != reader["size"]:
        return [f"{where}: fixed size {writer['size']} cannot be read as size {reader['size']}"]
    return []


def _record_errors(writer: Any, reader: Any, path: str) -> list[str]:
    """resolution_errors() of two records: each reader field from the writer's (by name or alias) or its default."""
    errors = []
    written = {f["name"]: f for f in writer["fields"]}
    for r_field in reader["fields"]:
        names = [r_field["name"], *r_field.get("aliases", [])]
        w_field = next((written[name] for name in names if name in written), None)
        child = f"{path}.{r_field['name']}" if path else r_field["name"]
        if w_field is not None:
            errors += resolution_errors(w_field["type"], r_field["type"], child)
        elif "default" not in r_field:
            errors.append(f"field {child} is not in the writer's schema and has no default in the reader's")
    return errors


def _type_name(schema: Any) -> str:
    return schema if isinstance(schema, str) else str(schema["type"])


def _expanded(schema_str: str) -> Any:
    return fastavro.parse_schema(json.loads(schema_str), expand=True, _write_hint=False)


# --------------------------------------------------------------------------- schemas check


@dataclass
class Check:
    """One question of ``schemas check`` and its answer."""

    title: str
    ok: bool
    lines: list[str] = field(default_factory=list)


def _level(client: Any, subject: str) -> str:
    """The effective compatibility level of `subject`: its own, else the global one.

    Asked with ``defaultToGlobal=true`` (Confluent and Apicurio alike): Apicurio answers a plain
    ``/config/{subject}`` with NONE when the subject has no setting of its own, though BACKWARD applies globally.
    """
    from confluent_kafka.schema_registry import SchemaRegistryError

    rest = getattr(client, "_rest_client", None)  # the client has no parameter for it (confluent-kafka 2.x)
    try:
        if rest is not None:
            return str(rest.get(f"config/{quote(subject, safe='')}", {"defaultToGlobal": "true"})["compatibilityLevel"])
        return str(client.get_compatibility(subject))
    except SchemaRegistryError:  # no subject-level setting and no defaultToGlobal support: the global one applies
        return str(client.get_compatibility())


def rule_errors(level: str, registered: Any, new: Any, what: str) -> list[str]:
    """Why `new` breaks the compatibility rule `level` against the `registered` schema (its latest version)."""
    errors = []
    if level.startswith(("BACKWARD", "FULL")):
        errors += [f"the new schema cannot read old {what}: {e}" for e in resolution_errors(registered, new)]
    if level.startswith(("FORWARD", "FULL")):
        errors += [
            f"readers of the registered schema cannot read new {what}: {e}" for e in resolution_errors(new, registered)
        ]
    return errors


def _reasons(compatible: bool, errors: list[str], level: str) -> list[str]:
    """The reasons of a NO: the rule's errors, or a line saying the registry gave none we could reproduce."""
    if compatible or errors:
        return errors
    return [f"the registry gave no reason, and {level} against the latest version finds none: a transitive level "
            "also checks older versions (GET /subjects/<subject>/versions lists them)"]  # fmt: skip


def check_input(settings: PipelineSettings, client: Any) -> Check:
    """Can the pipeline's reader schema read the latest writer schema registered for its input subject?"""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryError

    subject = settings.input.subject or f"{settings.input.topic}-value"
    title = f"input: reader schema {settings.input.schema_path.name} vs. latest writer schema of {subject!r}"
    try:
        latest = client.get_latest_version(subject)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return Check(title, True, ["no writer schema registered yet: nothing to read"])
        raise
    reader_str = settings.input.schema_path.read_text()
    errors = resolution_errors(_expanded(latest.schema.schema_str), _expanded(reader_str))
    lines = [f"latest: version {latest.version}, id {latest.schema_id}"]
    lines += [f"cannot resolve: {error}" for error in errors] or ["resolves: the reader schema reads it"]
    compatible = bool(client.test_compatibility(subject, Schema(reader_str, "AVRO")))
    level = _level(client, subject)
    lines.append(f"registry ({level}): the reader schema is {'' if compatible else 'NOT '}compatible with {subject!r}")
    if not compatible:  # the reasons of the registry's NO, those not printed above already
        printed = set(errors)
        rule = rule_errors(level, _expanded(latest.schema.schema_str), _expanded(reader_str), "events")
        rule = [reason for reason in rule if reason.split(": ", 1)[1] not in printed]
        lines += rule or ([] if errors else _reasons(False, [], level))
    return Check(title, not errors and compatible, lines)


def check_output(settings: PipelineSettings, client: Any) -> Check:
    """Is the prediction schema compatible with the one registered under its subject (registry's rule)?"""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryError

    subject = prediction_subject(settings)
    title = f"output: prediction schema {settings.output.schema_path.name} vs. subject {subject!r}"
    schema_str = settings.output.schema_path.read_text()
    load_schema(settings.output.schema_path)  # a ConfigError naming the file when it is not valid Avro
    try:
        latest = client.get_latest_version(subject)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return Check(title, True, ["not registered yet: the first worker with output.wire_format registers it"])
        raise
    level = _level(client, subject)
    ours, theirs = _expanded(schema_str), _expanded(latest.schema.schema_str)
    lines = [f"latest: version {latest.version}, id {latest.schema_id}"]
    if ours == theirs:
        lines.append("the same schema is registered")
    errors = rule_errors(level, theirs, ours, "predictions")  # checked here too: Apicurio's answers carry no reasons
    compatible = bool(client.test_compatibility(subject, Schema(schema_str, "AVRO")))
    lines += _reasons(compatible, errors, level)
    lines.append(f"registry ({level}): the prediction schema is {'' if compatible else 'NOT '}compatible")
    return Check(title, compatible and not errors, lines)


def check_schemas(settings: PipelineSettings, client: Any | None = None) -> list[Check]:
    """Both checks of ``streamserve schemas check``, answered by the registry of the pipeline's settings."""
    client = client or registry_client(settings.kafka)
    with answered(settings.kafka, "the schemas check"):  # RegistryUnreachable: one line naming the URL
        return [check_input(settings, client), check_output(settings, client)]
