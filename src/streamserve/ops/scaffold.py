"""``streamserve init``: a first pipeline config from an event schema and a model, with nothing guessed silently.

Every model input becomes a feature mapped to the event field of its name (exact, then case-insensitive, then
snake/camel: ``deviceType`` is ``device_type``; nested paths match by their last name or joined with ``_``),
typed as the input takes it (a string input reads text, an enum feeding a number gets a vocabulary). The key,
event-id and event-time fields are picked by name and logical type, the score and label outputs by the model's
outputs. An input it cannot map is written as a ``TODO:`` comment with a ``source: redis`` example, and the
summary says how each choice was made, so the user knows exactly what to read before ``streamserve check``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamserve.errors import ConfigError
from streamserve.ops.signature import NUMERIC_TYPES, ModelSignature, Tensor, read_signature
from streamserve.pipeline.fields import SCALAR_KINDS, FieldType, leaf_fields
from streamserve.schemas import schema_text

Fields = list[tuple[str, FieldType]]


@dataclass
class Scaffold:
    """What init proposes: the YAML text, one summary line per choice, and the TODOs left to the user."""

    text: str
    summary: list[str] = field(default_factory=list)
    todos: list[str] = field(default_factory=list)


# --- matching names -----------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    """``deviceType``, ``device_type``, ``DeviceType`` -> ``devicetype`` (the snake/camel-free form)."""
    return re.sub(r"[_.\-]", "", name).lower()


_RULES: tuple[tuple[str, Any], ...] = (
    ("exact name", lambda text: text),
    ("case-insensitive name", str.lower),
    ("snake/camel name", _snake),
)


def _whole(path: str) -> tuple[str, ...]:
    """A path as a name: itself, and joined with ``_`` (``parcel.weight_kg`` is ``parcel_weight_kg``)."""
    return path, path.replace(".", "_")


def _last(path: str) -> tuple[str, ...]:
    """The last name of a path."""
    return (path.rsplit(".", 1)[-1],)


def match_field(name: str, fields: Fields) -> tuple[list[str], str]:
    """The event paths named like ``name`` by the first rule that finds any, and the rule ("" when none): the whole
    path before its last name, exact before case-insensitive before snake/camel."""
    for how, norm in _RULES:
        target = norm(name)
        for forms, part in ((_whole, ""), (_last, " (last part of the path)")):
            found = [path for path, _ in fields if target in {norm(form) for form in forms(path)}]
            if found:
                return found, how + part
    return [], ""


# --- features -----------------------------------------------------------------------------------------------


@dataclass
class _Feature:
    """One proposed feature (or a TODO for a model input no field feeds)."""

    entry: dict[str, Any] | None
    how: str
    notes: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)


def _feature_for(tensor: Tensor, fields: Fields, many_inputs: bool, categories: tuple[str, ...], key: str) -> _Feature:
    """The feature that feeds a model input, or the TODO explaining why none could be proposed."""
    where = f"model input {tensor.name!r} ({tensor.describe()})"
    if tensor.dtype is None:
        return _todo(tensor, many_inputs, f"{where}: streamserve cannot feed this type", key)
    paths, how = match_field(tensor.name, fields)
    if not paths:
        return _todo(tensor, many_inputs, f"{where} matches no event field by name", key)
    if len(paths) > 1:
        return _todo(tensor, many_inputs, f"{where} matches several event fields ({', '.join(paths)}): pick one", key)
    path = paths[0]
    kind = dict(fields)[path]
    entry: dict[str, Any] = {"name": tensor.name, "source": "event", "field": path}
    shaped = _shape_entry(tensor, kind, entry)
    if shaped is not None:
        return _todo(tensor, many_inputs, f"{where}: event field {path!r} ({_kind(kind)}) {shaped}", key)
    if many_inputs:
        entry["input"] = tensor.name
    result = _Feature(entry, f"{how}: event field {path} ({_kind(kind)})")
    if kind.nullable and "default" not in entry:
        result.notes.append(f"{path} may be null: such events go to the dead-letter topic unless you add `default:`")
    if categories and tensor.type == "tensor(string)":
        result.notes.append(
            f"categories the model knows: {', '.join(categories[:6])} (an unknown one is its encoder's business)"
        )
    return result


def _shape_entry(tensor: Tensor, kind: FieldType, entry: dict[str, Any]) -> str | None:
    """Fill dtype, length and encoding so the field feeds the input as it is typed; or say why it cannot."""
    columns, dtype = tensor.columns, tensor.dtype
    if tensor.type == "tensor(string)":
        if columns != 1 or kind.kind not in SCALAR_KINDS:
            return "cannot feed a string input of this shape"
        entry["dtype"] = "string"
        return None
    if kind.kind == "array":
        if columns is None or columns == 1 or kind.items is None or not kind.items.numeric:
            return f"is an array; the input takes {columns or 'a dynamic number of'} column(s)"
        entry["length"] = columns
    elif kind.kind == "enum" and tensor.type in NUMERIC_TYPES:
        if columns == 1:
            entry.update(dtype="string", encoding="ordinal", vocabulary=list(kind.symbols))
            return None
        if columns == len(kind.symbols) + 1:
            entry.update(dtype="string", encoding="onehot", vocabulary=list(kind.symbols))
            return None
        return f"has {len(kind.symbols)} symbols; the input takes {columns} column(s)"
    elif not kind.numeric:
        return f"is not a number; the input takes {tensor.type}"
    elif columns != 1:
        return f"is one value; the input takes {columns or 'a dynamic number of'} columns"
    if dtype != "float32":
        entry["dtype"] = dtype
    return None


def _todo(tensor: Tensor, many_inputs: bool, reason: str, key: str) -> _Feature:
    """A TODO comment for an input init could not feed, with a Redis example (keyed by the key field, ``key``)
    and an event example."""
    columns = tensor.columns or 1
    dtype = "string" if tensor.type == "tensor(string)" else tensor.dtype or "float32"
    lines = [f"TODO: {reason}."]
    lines.append("Feed it from Redis (loaded with `streamserve features load`), e.g.:")
    for i in range(min(columns, 3)):
        name = tensor.name if columns == 1 else f"{tensor.name}_{i}"
        entity = re.sub(r"[_.]?id$", "", key.rsplit(".", 1)[-1], flags=re.IGNORECASE) or "entity"
        example: dict[str, Any] = {"name": name, "source": "redis", "key": f"{entity}:{{{key}}}", "field": name}
        if dtype != "float32":
            example["dtype"] = dtype
        example["default"] = "unknown" if dtype == "string" else 0.0
        if many_inputs:
            example["input"] = tensor.name
        lines.append(f"  - {_flow(example)}")
    if columns > 3:
        lines.append(f"  ... {columns} features in all, in the model's column order")
    lines.append(f"or from an event field: - {{name: {tensor.name}, source: event, field: <path>}}")
    return _Feature(None, "TODO", todo=lines)


def _kind(kind: FieldType) -> str:
    text = kind.logical or kind.kind
    if kind.kind == "array" and kind.items is not None:
        text = f"array of {kind.items.kind}"
    return f"nullable {text}" if kind.nullable else text


def _flow(entry: dict[str, Any]) -> str:
    """One feature as a flow mapping on one line, as the examples write them."""
    return str(yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10_000)).strip()


# --- key, event id, event time ------------------------------------------------------------------------------

_EVENT_ID_NAMES = ("eventid", "id", "uuid", "messageid", "recordid", "requestid")
_EVENT_WORDS = ("event", "reading", "message", "record", "transaction", "txn", "request")
_TIME_NAMES = ("eventtime", "timestamp", "ts", "time", "eventts", "createdat", "occurredat")


def _pick_roles(fields: Fields, record: str) -> dict[str, tuple[str | None, str]]:
    """input.event_id_field, key_field and event_time_field with how each was chosen (None: not found)."""
    scalars = [(path, kind) for path, kind in fields if kind.kind in ("string", "int", "enum", "bytes")]
    top = [(path, kind) for path, kind in scalars if "." not in path] + [p for p in scalars if "." in p[0]]
    words = (*_EVENT_WORDS, _snake(_kebab(record).rsplit("-", 1)[-1]))

    def leaf(path: str) -> str:
        return _snake(path.rsplit(".", 1)[-1])

    event_id = next(((p, "a uuid") for p, k in top if k.logical == "uuid" and "." not in p), None)
    event_id = event_id or next(((p, "named like an event id") for p, _ in top if leaf(p) in _EVENT_ID_NAMES), None)
    event_id = event_id or next(
        (
            (p, "an id named after the event")
            for p, _ in top
            if leaf(p).endswith("id") and any(word in leaf(p) for word in words)
        ),
        None,
    )
    key = next(((p, "the first entity id") for p, _ in top if leaf(p).endswith("id") and p != _first(event_id)), None)
    if key is None and event_id is not None:
        key = (event_id[0], "no other id field: the event id keys the predictions")
    times = [(p, k) for p, k in fields if k.kind in ("timestamp", "date")]
    named_time = [(p, k) for p, k in times if "time" in p.lower() or "ts" in leaf(p)]
    stamp = next(iter(named_time or times), None)
    event_time = (stamp[0], f"logical type {stamp[1].logical or stamp[1].kind}") if stamp else None
    event_time = event_time or next(
        (
            (p, "a long named like a time, read as epoch ms")
            for p, k in fields
            if k.kind == "int" and leaf(p) in _TIME_NAMES
        ),
        None,
    )
    return {
        "event_id_field": event_id or (None, ""),
        "key_field": key or (None, ""),
        "event_time_field": event_time or (None, "none found: the Kafka timestamp is the event time"),
    }


def _first(pair: tuple[str, str] | None) -> str | None:
    return pair[0] if pair else None


# --- outputs ------------------------------------------------------------------------------------------------


def _pick_outputs(signature: ModelSignature) -> tuple[dict[str, Any], list[str], list[str]]:
    """model.score_output, score_column, label_output (and probabilities), the summary lines, and TODOs."""
    outputs = signature.outputs
    zipmap = [o for o in outputs if o.type.startswith("seq(")]
    labels = [o for o in outputs if o.type in ("tensor(int64)", "tensor(string)", "tensor(int32)") and o.columns == 1]
    scores = [o for o in outputs if o.type in ("tensor(float)", "tensor(double)")]
    label = next((o for o in labels if "label" in o.name.lower()), labels[0] if labels else None)
    todos: list[str] = []
    if zipmap:
        todos.append(
            f"TODO: output {zipmap[0].name!r} is {zipmap[0].type} (a ZipMap): streamserve reads probability tensors."
            " Convert the classifier with skl2onnx's options={id(model): {'zipmap': False}} and run init again."
        )
    if not scores:
        todos.append("TODO: the model has no float output to read a score from: set model.score_output")
        return {"score_output": "TODO", "label_output": label.name if label else None}, [], todos
    score = next((o for o in scores if "prob" in o.name.lower() and o.columns != 1), scores[0])
    model: dict[str, Any] = {"score_output": score.name}
    if label is None or score.columns == 1:
        model.update(score_column=None, label_output=label.name if label else None)
        how = f"score: output {score.name!r} ({score.describe()}), a regression value"
        return model, [how + (f"; label: {label.name!r}" if label else "; no label output")], todos
    classes = signature.classes
    texts = label.type == "tensor(string)"
    column: int | str = classes[1] if texts and len(classes) > 1 else 1
    shown = f"class {classes[1]!r}" if len(classes) > 1 else "column 1"
    model.update(score_column=column, label_output=label.name)
    lines = [
        f"score: output {score.name!r} ({score.describe()}), the probability of {shown}"
        + (" (binary: the positive class)" if len(classes) == 2 else "; change model.score_column to your class"),
        f"label: output {label.name!r} ({label.type}), classes {list(classes)}",
    ]
    if len(classes) > 2:
        model["probabilities"] = True
    return model, lines, todos


# --- the config ---------------------------------------------------------------------------------------------


def _kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).replace("_", "-").lower()


def propose(schema_path: Path, model_path: Path, out: Path, topic: str | None = None) -> Scaffold:
    """The config init writes for this schema and model (read, nothing written)."""
    try:
        schema = json.loads(schema_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read Avro schema {schema_path}: {exc}") from exc
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ConfigError(f'{schema_path} is not an Avro record schema (its type must be "record")')
    signature = read_signature(model_path)
    fields = leaf_fields(schema)
    base = out.parent.resolve()
    topic = topic or _kebab(str(schema.get("name", "events")))
    model_name = re.sub(r"[^A-Za-z0-9_.-]", "-", model_path.stem)
    scaffold = Scaffold("")
    roles = _pick_roles(fields, str(schema.get("name", "")))
    features = _features_block(signature, fields, scaffold, roles["key_field"][0] or "<key field>")
    model, model_lines, model_todos = _pick_outputs(signature)
    scaffold.todos += model_todos
    text = [
        f"# Written by `streamserve init --schema {schema_path} --model {model_path}`.",
        "# Every line below was chosen as the summary printed by init says; read the TODOs first, then",
        f"#   streamserve check -c {out}",
        "# Env vars override any key (STREAMSERVE_<SECTION>__<KEY>); KAFKA_BOOTSTRAP_SERVERS and REDIS_URL, as",
        "# `scripts/stack env` prints them, set kafka.bootstrap_servers and redis.url.",
        "input:",
        f"  topic: {topic}",
        f"  schema: {_relative(schema_path, base)}",
    ]
    text += _roles_block(roles, scaffold)
    text += ["", "# One feature per model input, in the model's input order.", "features:", *features, ""]
    text += _model_block(model_name, _relative(model_path, base), model, model_todos)
    scaffold.summary += model_lines
    text += [
        "",
        "output:",
        f"  topic: {topic}-predictions",
        "  schema: prediction.avsc               # streamserve's prediction record (written beside this file)",
        f"  dead_letter_topic: {topic}.dlq",
        "",
        "kafka:",
        "  bootstrap_servers: 127.0.0.1:9092",
        f"  group_id: {model_name}-scorer",
        "",
        "redis:",
        "  url: redis://127.0.0.1:6379/0",
        "",
    ]
    scaffold.text = "\n".join(text)
    return scaffold


def _features_block(signature: ModelSignature, fields: Fields, scaffold: Scaffold, key: str) -> list[str]:
    many = len(signature.inputs) > 1
    lines: list[str] = []
    for tensor in signature.inputs:
        feature = _feature_for(tensor, fields, many, signature.categories.get(tensor.name, ()), key)
        if feature.entry is None:
            lines += [f"  # {line}" for line in feature.todo]
            scaffold.todos.append(feature.todo[0])
            scaffold.summary.append(f"input {tensor.name} ({tensor.describe()}): {feature.todo[0]}")
            continue
        lines += [f"  # {note}" for note in feature.notes]
        lines.append(f"  - {_flow(feature.entry)}")
        shown = {k: v for k, v in feature.entry.items() if k in ("dtype", "length", "encoding")}
        typed = f" as {', '.join(f'{k} {v}' for k, v in shown.items())}" if shown else ""
        scaffold.summary.append(f"input {tensor.name} ({tensor.describe()}): {feature.how}{typed}")
    return lines


def _roles_block(roles: dict[str, tuple[str | None, str]], scaffold: Scaffold) -> list[str]:
    lines = []
    for role, (path, how) in roles.items():
        if path is None and role == "event_time_field":
            lines.append(f"  # {role}: none found, the Kafka timestamp is used (set a timestamp-millis field)")
            scaffold.summary.append(f"{role}: {how}")
        elif path is None:
            todo = f"TODO: no field looks like the {role.removesuffix('_field').replace('_', ' ')}: name one"
            lines.append(f"  {role}: TODO  # {todo}")
            scaffold.todos.append(todo)
            scaffold.summary.append(f"{role}: {todo}")
        else:
            lines.append(f"  {role}: {path}  # {how}")
            scaffold.summary.append(f"{role}: {path} ({how})")
    return lines


def _model_block(name: str, uri: str, model: dict[str, Any], todos: list[str]) -> list[str]:
    lines = ["model:", f"  name: {name}", f"  uri: {uri}", "  version: v1"]
    lines += [f"  # {todo}" for todo in todos]
    for key, value in model.items():
        lines.append(f"  {key}: {'null' if value is None else _flow({'v': value})[4:-1]}")
    return lines


def _relative(path: Path, base: Path) -> str:
    """A path as the config names it: relative to the config's directory (resolved against it when loaded)."""
    return os.path.relpath(path.resolve(), base)


def write(scaffold: Scaffold, out: Path, force: bool = False) -> list[Path]:
    """Write the config (and prediction.avsc beside it when missing); refuse to overwrite without force."""
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: give another --out, or --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(scaffold.text)
    written = [out]
    prediction = out.parent / "prediction.avsc"
    if not prediction.exists():
        prediction.write_text(schema_text("prediction"))
        written.append(prediction)
    return written
