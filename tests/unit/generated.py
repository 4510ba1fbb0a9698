"""Hypothesis strategies for the property tests: event schemas, feature specs, ONNX models, records.

A ``Scenario`` is one generated pipeline: an Avro event schema within the supported subset, the features
that read it, a small ONNX model whose inputs those features feed, and records (valid Avro, with nulls,
NaN, extremes and unicode; and raw bytes that are not Avro). Beside each feature it keeps what the
feature should give for a record, worked out here from the written Python values and the documented
rules, not by calling the pipeline's code, so the tests can compare the two.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import fastavro
import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

from streamserve.config import FeatureSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT_RANGES = {"int32": (-(2**31), 2**31), "int64": (-(2**63), 2**63)}
"""[low, high) of the integer feature dtypes."""

NUMERIC_DTYPES = ("float32", "float64", "int32", "int64")
TEXT_LEAVES = ("string", "enum", "uuid", "int", "long", "boolean", "double")
"""Leaf kinds a categorical (dtype string) feature may read."""


class Reject:
    """Expected outcome of a feature for a record: the record goes to the dead-letter topic."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"Reject({self.why!r})"


# --- values ---------------------------------------------------------------------------------------------------

ints32 = st.integers(-(2**31), 2**31 - 1)
longs = st.integers(-(2**63), 2**63 - 1)
doubles = st.one_of(
    st.floats(),  # NaN, +/-Inf, subnormals, 1.7e308
    st.sampled_from([0.0, -0.0, 1.5, FLOAT32_MAX, -FLOAT32_MAX, 3.5e38, 1e300, 2.0**53 + 1, 2.0**63]),
)
floats32 = st.floats(width=32)
texts = st.text(max_size=12)
numeric_texts = st.one_of(
    texts,
    st.floats().map(repr),
    longs.map(str),
    st.sampled_from(["", " 12 ", "1_000", "1e400", "nan", "-Infinity", "0x10", "٣", "9223372036854775807", "1.0"]),
)


def _millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


datetimes_utc = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))


# --- schema pieces --------------------------------------------------------------------------------------------


@dataclass
class Leaf:
    """A scalar or array event field that features read."""

    name: str
    path: str
    kind: str
    """int long float double boolean string numstring enum uuid decimal array"""
    avro: Any
    nullable: bool
    values: st.SearchStrategy[Any]
    pool: list[str] = field(default_factory=list)
    """Texts the values are often drawn from (vocabularies and encoder keys use them too)."""
    items: str | None = None
    """Arrays: the items' kind (float, double, long)."""
    items_nullable: bool = False
    length: int | None = None


@dataclass
class Feature:
    """A FeatureSpec and the leaf it reads (``element``: the index read from an array leaf)."""

    spec: FeatureSpec
    leaf: Leaf
    element: int | None = None

    @property
    def role(self) -> str:
        """numeric, vector, text (string model input), ordinal or onehot."""
        if self.spec.length is not None:
            return "vector"
        if self.spec.dtype == "string":
            return {"none": "text", "ordinal": "ordinal", "onehot": "onehot"}[self.spec.encoding]
        return "numeric"

    def raw(self, record: dict[str, Any]) -> Any:
        """The value the feature reads from a record as it was written (None along a null or past the end)."""
        value: Any = record
        for part in self.leaf.path.split("."):
            if value is None:
                return None
            value = value[part]
        if self.element is not None and value is not None:
            value = value[self.element] if self.element < len(value) else None
        return value

    def expect(self, record: dict[str, Any]) -> list[Any] | Reject:
        """The feature's columns for a record (numbers exact, or texts), or Reject."""
        spec, value = self.spec, self.raw(record)
        if value is None:
            if spec.default is None:
                return Reject(f"{spec.name}: null without default")
            if self.role == "text":
                return [str(spec.default)]
            if self.role in ("ordinal", "onehot"):
                return self._encode(str(spec.default))
            return [spec.default] * (spec.length or 1)
        if self.role == "vector":
            if len(value) != spec.length:
                return Reject(f"{spec.name}: length")
            numbers = [expect_number(item, spec.dtype) for item in value]
            bad = next((n for n in numbers if isinstance(n, Reject)), None)
            return bad if bad is not None else numbers
        if self.role == "numeric":
            number = expect_number(value, spec.dtype)
            return number if isinstance(number, Reject) else [number]
        text = expect_text(value)
        if isinstance(text, Reject):
            return text
        return [text] if self.role == "text" else self._encode(text)

    def _encode(self, text: str) -> list[Any]:
        vocabulary = self.spec.vocabulary or []
        code = vocabulary.index(text) if text in vocabulary else len(vocabulary)
        if self.role == "ordinal":
            return [code]
        return [1 if i == code else 0 for i in range(len(vocabulary) + 1)]


def expect_number(value: Any, dtype: str) -> Any:
    """What a numeric feature of ``dtype`` reads from a value, exactly (int or float), or Reject."""
    if value is None:
        return Reject("null element")
    number: int | float
    if dtype == "bool":
        return expect_bool(value)
    if isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value) if dtype in INT_RANGES else float(value)
        except ValueError:
            return Reject(f"unparseable {value!r}")
    elif isinstance(value, Decimal):
        number = float(value)
    else:
        number = value
    if dtype in ("float32", "float64"):
        number = float(number)  # read as a float64, rounded once (float32 only bounds the range)
    if isinstance(number, float):
        if not math.isfinite(number):
            return Reject("not finite")
        if dtype in INT_RANGES:
            if not number.is_integer():
                return Reject("not an integer")
            number = int(number)
    if dtype == "float32" and abs(number) > FLOAT32_MAX:
        return Reject("out of float32 range")
    if dtype in INT_RANGES:
        low, high = INT_RANGES[dtype]
        if not low <= number < high:
            return Reject(f"out of {dtype} range")
    return number


TRUE_WORDS = {"1", "true", "True", "TRUE", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "False", "FALSE", "no", "n", "off"}


def expect_bool(value: Any) -> int | Reject:
    """A bool feature: a boolean, a finite number (non-zero is true), or a yes/no word."""
    if isinstance(value, str):
        word = value.strip()
        if word in TRUE_WORDS | FALSE_WORDS:
            return int(word in TRUE_WORDS)
        return Reject(f"{value!r} is not a boolean word")
    number = float(value)
    return int(number != 0) if math.isfinite(number) else Reject("not finite")


def expect_text(value: Any) -> str | Reject:
    """The category a value stands for."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else Reject("non-finite category")
    return str(value)  # str, enum symbol, UUID, int


def epoch_millis(value: Any) -> int | None:
    """Epoch milliseconds of an event time as written: datetime (floor to the ms), date, or long."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, datetime):
        delta = value - EPOCH
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return micros // 1000
    assert isinstance(value, date)
    return (value - date(1970, 1, 1)).days * 86_400_000


MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
"""Event times a prediction can carry (readers decode timestamp-millis to datetimes)."""


def render(value: Any) -> str | None:
    """An id or key as the prediction carries it."""
    return None if value is None else str(value)


@st.composite
def nullable_type(draw: st.DrawFn, avro: Any, values: st.SearchStrategy[Any]) -> tuple[Any, bool, Any]:
    """(type, nullable, values) with a ["null", T] or [T, "null"] union half the time."""
    if not draw(st.booleans()):
        return avro, False, values
    union = ["null", avro] if draw(st.booleans()) else [avro, "null"]
    return union, True, st.one_of(st.none(), values)


@st.composite
def leaves(draw: st.DrawFn, name: str, path: str, enum_name: str) -> Leaf:
    """One feature-bearing field of a generated kind."""
    kind = draw(
        st.sampled_from(
            ["int", "long", "float", "double", "boolean", "string", "numstring", "enum", "uuid", "decimal", "array"]
        )
    )
    pool = draw(st.lists(texts, min_size=1, max_size=4, unique=True))
    items = None
    length = None
    items_nullable = False
    avro: Any
    if kind == "int":
        avro, values = "int", ints32
    elif kind == "long":
        avro, values = "long", longs
    elif kind == "float":
        avro, values = "float", floats32
    elif kind == "double":
        avro, values = "double", doubles
    elif kind == "boolean":
        avro, values = "boolean", st.booleans()
    elif kind == "string":
        avro, values = "string", st.one_of(st.sampled_from(pool), texts)
    elif kind == "numstring":
        avro, values = "string", numeric_texts
    elif kind == "enum":
        symbols = draw(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=5))
        symbols = list(dict.fromkeys(symbols))
        pool = symbols
        avro, values = {"type": "enum", "name": enum_name, "symbols": symbols}, st.sampled_from(symbols)
    elif kind == "uuid":
        avro, values = {"type": "string", "logicalType": "uuid"}, st.uuids()
        pool = [str(draw(st.uuids()))]
    elif kind == "decimal":
        scale = draw(st.integers(0, 6))
        precision = draw(st.integers(max(scale, 1), 30))
        avro = {"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale}
        values = st.integers(-(10**precision) + 1, 10**precision - 1).map(lambda i, s=scale: Decimal(i).scaleb(-s))
    else:
        items = draw(st.sampled_from(["float", "double", "long"]))
        length = draw(st.integers(1, 4))
        item_values = {"float": floats32, "double": doubles, "long": longs}[items]
        item_type, items_nullable, item_values = draw(nullable_type(items, item_values))
        avro = {"type": "array", "items": item_type}
        sizes = st.one_of(st.just(length), st.integers(0, length + 1))
        values = sizes.flatmap(lambda n, v=item_values: st.lists(v, min_size=n, max_size=n))
    avro, nullable, values = draw(nullable_type(avro, values))
    return Leaf(name, path, kind, avro, nullable, values, pool, items, items_nullable, length)


@st.composite
def features_of(draw: st.DrawFn, leaf: Leaf, prefix: str) -> list[Feature]:
    """Zero to two features reading a leaf, of the kinds the leaf supports."""
    found = []
    for n in range(draw(st.integers(0, 2))):
        name = f"{prefix}_{n}"
        if leaf.kind == "array":
            assert leaf.length is not None
            int_items = leaf.items == "long"
            dtype = draw(st.sampled_from(NUMERIC_DTYPES if int_items else ("float32", "float64")))
            default = draw(st.one_of(st.none(), st.integers(-3, 3).map(float)))
            if draw(st.booleans()):
                spec = FeatureSpec(name=name, source="event", field=leaf.path, dtype=dtype, length=leaf.length)
                found.append(Feature(spec.model_copy(update={"default": default}), leaf))
            else:
                index = draw(st.integers(0, leaf.length))
                spec = FeatureSpec(name=name, source="event", field=f"{leaf.path}[{index}]", dtype=dtype)
                found.append(Feature(spec.model_copy(update={"default": default}), leaf, element=index))
            continue
        categorical = leaf.kind in ("string", "enum", "uuid") or (
            leaf.kind in TEXT_LEAVES and draw(st.integers(0, 3)) == 0
        )
        if categorical:
            encoding = draw(st.sampled_from(["none", "ordinal", "onehot"]))
            vocabulary = None
            if encoding != "none":
                vocabulary = draw(st.lists(st.one_of(st.sampled_from(leaf.pool), texts), max_size=4, unique=True))
            default = draw(st.one_of(st.none(), st.sampled_from(leaf.pool), texts))
            spec = FeatureSpec(
                name=name,
                source="event",
                field=leaf.path,
                dtype="string",
                encoding=encoding,
                vocabulary=vocabulary,
                default=default,
            )
        else:
            dtype = draw(st.sampled_from(("bool", *NUMERIC_DTYPES)))
            default = draw(st.one_of(st.none(), st.integers(-3, 3).map(float)))
            if dtype == "bool" and default is not None:
                default = float(default > 0)
            spec = FeatureSpec(name=name, source="event", field=leaf.path, dtype=dtype, default=default)
        found.append(Feature(spec, leaf))
    return found


# --- the model ------------------------------------------------------------------------------------------------

INPUT_TYPES = {
    "float": TensorProto.FLOAT,
    "double": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}
NUMPY_TYPES: dict[str, Any] = {
    "float": np.float32,
    "double": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
    "string": object,
}
INPUT_RANGES = {"float": (-FLOAT32_MAX, FLOAT32_MAX), "int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}
"""[low, high] of the numbers an input can hold; others are dead-lettered before inference."""


@dataclass
class ModelInput:
    """One model input: its element type, rank, the features feeding it, and how the graph weighs its columns."""

    name: str
    element: str
    """float, double, int64, int32, bool or string"""
    rank: int
    features: list[Feature]
    weights: list[float]
    keys: list[str] = field(default_factory=list)
    """string inputs: the LabelEncoder's keys (values are ``codes``; unknown texts give ``unknown``)."""
    codes: list[float] = field(default_factory=list)
    unknown: float = -1.0

    @property
    def width(self) -> int:
        return sum(f.spec.width for f in self.features)

    def tensor(self, rows: list[list[Any]]) -> np.ndarray:
        """The input tensor for rows of expected columns (exact numbers or texts), cast as C casts them."""
        if self.element == "string":
            tensor = np.empty((len(rows), self.width), dtype=object)
            for i, row in enumerate(rows):
                tensor[i, :] = row
        else:
            tensor = np.array([[cast(v, self.element) for v in row] for row in rows], dtype=NUMPY_TYPES[self.element])
        return tensor.reshape(len(rows)) if self.rank == 1 else tensor


def cast(value: int | float, element: str) -> Any:
    """One exact number as an input of ``element`` type holds it: rounded once, or truncated toward zero."""
    if element == "bool":
        return value != 0
    if element in ("int64", "int32"):
        return int(value)  # Python's int() truncates toward zero, like a C cast
    if element == "float" and isinstance(value, int):
        return np.array([value], dtype=np.int64).astype(np.float32)[0]  # one rounding, not two via float64
    return NUMPY_TYPES[element](value)


MODULUS = 1009


def extra_outputs(inputs: list[ModelInput]) -> list[str]:
    """The model's outputs beside probabilities and label."""
    return ["total", *(["low_digits"] if any(i.element == "int64" for i in inputs) else [])]


def build_model(inputs: list[ModelInput]) -> bytes:
    """total = sum over inputs of (columns as double) @ weights; probabilities = [1 - s, s] with s = sigmoid(total).

    Outputs: ``probabilities`` [N, 2] float, ``label`` [N] int64 (argmax), ``total`` [N] double; with an int64
    input also ``low_digits`` [N] double: the sum of its values modulo MODULUS, computed in int64, which shows
    whether integers beyond 2**53 reached the model exactly.
    """
    nodes, initializers, graph_inputs, parts = [], [], [], []
    one_axis = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    initializers.append(one_axis)
    for model_input in inputs:
        name, width = model_input.name, model_input.width
        shape = [None] if model_input.rank == 1 else [None, width]
        element = TensorProto.STRING if model_input.element == "string" else INPUT_TYPES[model_input.element]
        graph_inputs.append(helper.make_tensor_value_info(name, element, shape))
        current = name
        if model_input.element == "string":
            nodes.append(
                helper.make_node(
                    "LabelEncoder",
                    [current],
                    [f"{name}_codes"],
                    domain="ai.onnx.ml",
                    keys_strings=model_input.keys,
                    values_floats=model_input.codes,
                    default_float=model_input.unknown,
                )
            )
            current = f"{name}_codes"
        if model_input.rank == 1:
            nodes.append(helper.make_node("Unsqueeze", [current, "axis1"], [f"{name}_2d"]))
            current = f"{name}_2d"
        if model_input.element == "int64":  # low digits in int64 arithmetic: exact where doubles are not
            nodes.append(helper.make_node("Mod", [current, "modulus"], [f"{name}_mod"]))
            nodes.append(helper.make_node("ReduceSum", [f"{name}_mod", "axis1"], [f"{name}_low"], keepdims=0))
            nodes.append(helper.make_node("Cast", [f"{name}_low"], ["low_digits"], to=TensorProto.DOUBLE))
            initializers.append(helper.make_tensor("modulus", TensorProto.INT64, [], [MODULUS]))
        nodes.append(helper.make_node("Cast", [current], [f"{name}_double"], to=TensorProto.DOUBLE))
        weights = helper.make_tensor(f"{name}_weights", TensorProto.DOUBLE, [width, 1], model_input.weights)
        initializers.append(weights)
        nodes.append(helper.make_node("MatMul", [f"{name}_double", f"{name}_weights"], [f"{name}_part"]))
        parts.append(f"{name}_part")
    initializers.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    nodes += [
        helper.make_node("Sum", parts, ["total_2d"]),
        helper.make_node("Squeeze", ["total_2d", "axis1"], ["total"]),
        helper.make_node("Cast", ["total_2d"], ["total_float"], to=TensorProto.FLOAT),
        helper.make_node("Sigmoid", ["total_float"], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_tensor_value_info("total", TensorProto.DOUBLE, [None]),
    ]
    if any(i.element == "int64" for i in inputs):
        outputs.append(helper.make_tensor_value_info("low_digits", TensorProto.DOUBLE, [None]))
    graph = helper.make_graph(
        nodes,
        "generated",
        graph_inputs,
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


# --- the scenario ---------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """A generated pipeline and the records to push through it."""

    schema: dict[str, Any]
    id_field: str
    key_field: str
    time_field: str | None
    features: list[Feature]
    inputs: list[ModelInput]
    records: list[dict[str, Any] | bytes | None]
    """Valid records as written (dicts) and raw values that are not Avro (bytes, or None: a tombstone)."""
    truncated: set[int]
    """Positions in ``records`` of raw values that are valid records cut short."""

    @property
    def specs(self) -> list[FeatureSpec]:
        return [f.spec for f in self.features]

    def encode(self, record: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, fastavro.parse_schema(self.schema), record)
        return buffer.getvalue()

    def expect(self, record: dict[str, Any]) -> dict[str, list[Any] | Reject]:
        """Per feature, its expected columns or Reject, for a valid record."""
        return {f.spec.name: f.expect(record) for f in self.features}


@st.composite
def scalar_field(draw: st.DrawFn, name: str, kinds: list[str]) -> tuple[dict[str, Any], st.SearchStrategy[Any]]:
    """An id, key or time field: its Avro field definition and its values."""
    kind = draw(st.sampled_from(kinds))
    avro, values = {
        "string": ("string", texts),
        "long": ("long", longs),
        "uuid": ({"type": "string", "logicalType": "uuid"}, st.uuids()),
        "timestamp-millis": ({"type": "long", "logicalType": "timestamp-millis"}, datetimes_utc.map(_millis)),
        "timestamp-micros": ({"type": "long", "logicalType": "timestamp-micros"}, datetimes_utc),
        "date": ({"type": "int", "logicalType": "date"}, st.dates(date(1, 1, 2), date(9999, 12, 30))),
    }[kind]
    avro, _, values = draw(nullable_type(avro, values))
    return {"name": name, "type": avro}, values


@st.composite
def scenarios(draw: st.DrawFn, max_records: int = 8) -> Scenario:
    """A schema in the supported subset, features reading it, a model for them, and records."""
    id_field, id_values = draw(scalar_field("event_id", ["string", "long", "uuid"]))
    key_field, key_values = draw(scalar_field("key", ["string", "long"]))
    time_field = None
    fields: list[dict[str, Any]] = [id_field, key_field]
    value_strategies: dict[str, st.SearchStrategy[Any]] = {"event_id": id_values, "key": key_values}
    if draw(st.booleans()):
        time_field, time_values = draw(
            scalar_field("event_time", ["timestamp-millis", "timestamp-micros", "date", "long"])
        )
        fields.append(time_field)
        value_strategies["event_time"] = time_values
    # Unused fields the pipeline must not trip over: NaN, a map, a union of several types.
    fields += [
        {"name": "unused_double", "type": "double"},
        {"name": "unused_map", "type": {"type": "map", "values": "double"}},
        {"name": "unused_union", "type": ["null", "int", "string"]},
    ]
    value_strategies["unused_double"] = doubles
    value_strategies["unused_map"] = st.dictionaries(texts, doubles, max_size=2)
    value_strategies["unused_union"] = st.one_of(st.none(), ints32, texts)

    all_leaves: list[Leaf] = []
    nested: dict[str, tuple[list[dict[str, Any]], dict[str, st.SearchStrategy[Any]]]] = {}
    for i in range(draw(st.integers(1, 5))):
        where = draw(st.sampled_from(["", "outer", "outer.inner"]))
        name = f"f{i}"
        path = f"{where}.{name}" if where else name
        leaf = draw(leaves(name, path, f"Enum{i}"))
        all_leaves.append(leaf)
        if where:
            nested.setdefault(where, ([], {}))
            nested[where][0].append({"name": name, "type": leaf.avro})
            nested[where][1][name] = leaf.values
        else:
            fields.append({"name": name, "type": leaf.avro})
            value_strategies[name] = leaf.values
    if "outer.inner" in nested:
        nested.setdefault("outer", ([], {}))
    for where in ("outer.inner", "outer"):
        if where not in nested:
            continue
        record_fields, record_values = nested[where]
        short = where.rsplit(".", 1)[-1]
        avro: Any = {"type": "record", "name": short.capitalize(), "fields": record_fields}
        values: st.SearchStrategy[Any] = st.fixed_dictionaries(record_values)
        avro, _, values = draw(nullable_type(avro, values))
        if where == "outer.inner":
            nested["outer"][0].append({"name": "inner", "type": avro})
            nested["outer"][1]["inner"] = values
        else:
            fields.append({"name": "outer", "type": avro})
            value_strategies["outer"] = values

    features: list[Feature] = []
    for i, leaf in enumerate(all_leaves):
        features += draw(features_of(leaf, f"x{i}"))
    if not features:
        leaf = all_leaves[0]
        spec = (
            FeatureSpec(name="only", source="event", field=leaf.path, dtype="string", default="?")
            if leaf.kind in ("string", "enum", "uuid")
            else FeatureSpec(
                name="only",
                source="event",
                field=f"{leaf.path}[0]" if leaf.kind == "array" else leaf.path,
                dtype="float64",
                default=0.0,
            )
        )
        features.append(Feature(spec, leaf, element=0 if leaf.kind == "array" else None))
    features = draw(st.permutations(features))
    inputs = draw(model_inputs(features, [leaf.pool for leaf in all_leaves]))

    schema = {"type": "record", "name": "Event", "namespace": "test.generated", "fields": fields}
    record_values = st.fixed_dictionaries(value_strategies)
    records: list[dict[str, Any] | bytes | None] = draw(st.lists(record_values, min_size=1, max_size=max_records))
    scenario = Scenario(schema, "event_id", "key", "event_time" if time_field else None, features, inputs, [], set())
    for _ in range(draw(st.integers(0, 3))):
        junk = draw(st.sampled_from(["random", "truncated", "empty", "tombstone"]))
        position = draw(st.integers(0, len(records)))
        if junk == "random":
            records.insert(position, draw(st.binary(min_size=1, max_size=40)))
        elif junk == "truncated":
            whole = scenario.encode(draw(record_values))
            records.insert(position, whole[: draw(st.integers(0, len(whole) - 1))])
            scenario.truncated = {p + 1 if p >= position else p for p in scenario.truncated} | {position}
        else:
            records.insert(position, b"" if junk == "empty" else None)
            scenario.truncated = {p + 1 if p >= position else p for p in scenario.truncated}
    scenario.records = records
    return scenario


@st.composite
def model_inputs(draw: st.DrawFn, features: list[Feature], pools: list[list[str]]) -> list[ModelInput]:
    """Assign every feature to a model input: numbers to float/double/int64/int32/bool inputs, texts to a
    string input. The features' specs are replaced by copies naming their input."""
    chosen: dict[str, str] = {}
    for feature in features:
        if feature.role == "text":
            chosen[feature.spec.name] = "string"
        else:
            chosen[feature.spec.name] = draw(st.sampled_from(["float", "double", "int64", "int32", "bool"]))
    inputs = []
    for element in ("float", "double", "int64", "int32", "bool", "string"):
        fed = [f for f in features if chosen[f.spec.name] == element]
        if not fed:
            continue
        name = f"input_{element}"
        for f in fed:
            f.spec = f.spec.model_copy(update={"input": name})
        width = sum(f.spec.width for f in fed)
        rank = draw(st.sampled_from([1, 2])) if width == 1 else 2
        weights = draw(st.lists(st.sampled_from([0.5, -0.75, 1.25, -2.0, 0.001]), min_size=width, max_size=width))
        model_input = ModelInput(name, element, rank, fed, weights)
        if element == "string":
            keys = sorted({key for pool in pools for key in pool} | {"", "\u00e9"})
            model_input.keys = keys
            model_input.codes = [float(i % 7) - 3.0 for i in range(len(keys))]
            model_input.unknown = 0.25
        inputs.append(model_input)
    return inputs


def expected_columns(model_input: ModelInput, expected: dict[str, list[Any] | Reject]) -> list[Any]:
    """One row of a model input from the features' expected columns (all of them valid)."""
    row: list[Any] = []
    for feature in model_input.features:
        columns = expected[feature.spec.name]
        assert not isinstance(columns, Reject)
        row += columns
    return row


def unfit(model_input: ModelInput, row: list[Any]) -> bool:
    """A number the input's type cannot hold (beyond float32's range, or int64's, or int32's)."""
    if model_input.element not in INPUT_RANGES:
        return False
    low, high = INPUT_RANGES[model_input.element]
    if model_input.element != "float":  # truncated toward zero, so up to (not including) high + 1
        return any(not low <= v < high + 1 for v in row)
    return any(not low <= v <= high for v in row)
