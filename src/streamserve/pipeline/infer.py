"""ONNX Runtime inference on micro-batches: the model's signature bound to the feature spec by input name.

A model may take several named inputs of different element types (float, double, int64, int32, bool,
string), each fed by the features that name it, as exported from scikit-learn pipelines by skl2onnx. Its
outputs are read by name: a score (a probability column chosen by index or class label, or a regression
value), int or string labels, the whole probability vector, further numeric outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.errors import ModelError, SignatureMismatch
from streamserve.pipeline.profile import ReferenceProfile
from streamserve.records import ModelOutputs

log = logging.getLogger(__name__)

_ELEMENT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}
_NUMERIC_OUTPUTS = {"tensor(float)", "tensor(double)", "tensor(int64)", "tensor(int32)"}
_CLASS_ATTRIBUTES = ("classlabels_strings", "classlabels_int64s", "classlabels_ints")
_CATEGORY_ATTRIBUTES = ("cats_strings", "keys_strings", "classes_strings")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def session_options(settings: ModelSettings) -> ort.SessionOptions:
    """Threading and graph options for a serving session."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def available_providers(requested: list[str]) -> list[str]:
    """The requested execution providers this onnxruntime build has, CPU always last."""
    have = set(ort.get_available_providers())
    chosen = [p for p in requested if p in have and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


@dataclass(frozen=True)
class InputBinding:
    """One model input and the features whose columns, side by side, feed it."""

    name: str
    dtype: np.dtype
    features: tuple[str, ...]
    width: int
    rank: int
    samples: tuple[str, ...] = ()
    """Categories the graph knows for a string input (used by the warm-up batch)."""

    def feed(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The input tensor for a batch of feature columns."""
        # Each column takes the input's type before they are put side by side: stacking an exact int64
        # column beside a float one would round it through float64.
        parts = [columns[name].astype(self.dtype, copy=False) for name in self.features]
        tensor = parts[0][:, None] if len(parts) == 1 and parts[0].ndim == 1 else np.column_stack(parts)
        return tensor.reshape(len(tensor)) if self.rank == 1 else tensor

    def unfit_rows(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Rows whose numbers do not fit this input's element type (1e300 for a float or int64 input...)."""
        n = len(next(iter(columns.values()))) if columns else 0
        bad = np.zeros(n, dtype=bool)
        if self.dtype.kind == "f" and self.dtype.itemsize < 8:
            low, high = -_FLOAT32_MAX, _FLOAT32_MAX
        elif self.dtype.kind == "i":
            info = np.iinfo(self.dtype)
            low, high = int(info.min), int(info.max)
        else:
            return bad
        for name in self.features:
            column = columns[name]
            if column.dtype.kind == "f":  # float bounds: 2**63 itself is out for int64
                over = ~((column >= low) & (column < float(high) + (1 if self.dtype.kind == "f" else 0)))
                if self.dtype.kind == "f":
                    over = ~((column >= low) & (column <= high))
            elif column.dtype.kind == "i":
                over = (column < low) | (column > high)
            else:
                continue
            bad |= over.any(axis=1) if over.ndim == 2 else over
        return bad


@dataclass
class OnnxModel:
    """A loaded, validated model version ready to score batches of feature columns."""

    name: str
    version: str
    session: ort.InferenceSession
    inputs: list[InputBinding]
    score_output: str
    score_column: int | None
    label_output: str | None
    label_is_text: bool = False
    probabilities: bool = False
    extra_outputs: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    sha256: str = ""
    uri: str = ""
    profile: ReferenceProfile | None = None
    """The version's reference profile (drift), verified against its announced digest; None: none."""
    profile_sha256: str = ""

    @classmethod
    def load(
        cls,
        model_bytes: bytes,
        settings: ModelSettings,
        version: str,
        features: Sequence[FeatureSpec],
        sha256: str = "",
        uri: str = "",
        profile: tuple[ReferenceProfile, str] | None = None,
    ) -> OnnxModel:
        """Create the session, check its signature against the feature spec, and warm it up."""
        try:
            session = ort.InferenceSession(
                model_bytes,
                sess_options=session_options(settings),
                providers=available_providers(settings.providers),
            )
        except (RuntimeError, ValueError) as exc:  # onnxruntime raises its own RuntimeError subclasses
            raise ModelError(f"onnxruntime cannot load {settings.name} {version}: {exc}") from exc
        graph = _Graph.parse(model_bytes)
        classes = tuple(settings.classes) if settings.classes else graph.classes
        outputs = {o.name: o for o in session.get_outputs()}
        _check_outputs(settings, version, outputs)
        model = cls(
            name=settings.name,
            version=version,
            session=session,
            inputs=bind_inputs(session, settings, features, graph),
            score_output=settings.score_output,
            score_column=_score_column(settings, outputs, classes),
            label_output=settings.label_output,
            label_is_text=bool(settings.label_output) and outputs[settings.label_output or ""].type == "tensor(string)",
            probabilities=settings.probabilities,
            extra_outputs=list(settings.extra_outputs),
            classes=classes,
            sha256=sha256,
            uri=uri,
            profile=profile[0] if profile else None,
            profile_sha256=profile[1] if profile else "",
        )
        model.warm_up(features)
        return model

    @property
    def wanted(self) -> list[str]:
        """Output names to fetch, in order: score, label, extras."""
        return [self.score_output, *([self.label_output] if self.label_output else []), *self.extra_outputs]

    def warm_up(self, features: Sequence[FeatureSpec], rows: int = 64) -> None:
        """Run a few batches so the first real batch does not pay for lazy initialisation; check shapes."""
        rng = np.random.default_rng(0)
        specs = {spec.name: spec for spec in features}
        columns: dict[str, np.ndarray] = {}
        for binding in self.inputs:
            for name in binding.features:
                spec = specs[name]
                if spec.text:
                    choices = binding.samples or (str(spec.default) if spec.default is not None else "",)
                    columns[name] = np.array([choices[i % len(choices)] for i in range(rows)], dtype=object)
                elif spec.width > 1:
                    columns[name] = rng.random((rows, spec.width))
                else:
                    columns[name] = rng.integers(0, 2, rows).astype(np.float64)
        for size in (1, rows):
            try:
                outputs = self.predict({name: column[:size] for name, column in columns.items()})
            except SignatureMismatch:
                raise
            except Exception as exc:  # onnxruntime raises bare pybind errors
                raise SignatureMismatch(f"model {self.name} {self.version} fails on a warm-up batch: {exc}") from exc
            if outputs.score.shape != (size,):
                raise SignatureMismatch(
                    f"model {self.name} {self.version} returned scores of shape {outputs.score.shape} for {size} rows"
                )

    def unfit_rows(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Rows whose values cannot be fed to this model's inputs as they are typed."""
        n = len(next(iter(columns.values()))) if columns else 0
        bad = np.zeros(n, dtype=bool)
        for binding in self.inputs:
            bad |= binding.unfit_rows(columns)
        return bad

    def predict(self, columns: dict[str, np.ndarray]) -> ModelOutputs:
        """Score a batch given as feature columns (all of the same number of rows)."""
        feeds = {binding.name: binding.feed(columns) for binding in self.inputs}
        n = len(next(iter(feeds.values())))
        results = iter(self.session.run(self.wanted, feeds))
        raw = np.asarray(next(results), dtype=np.float64)
        probabilities = raw if self.probabilities and raw.ndim == 2 else None
        score = raw[:, self.score_column] if raw.ndim == 2 and self.score_column is not None else raw.reshape(n)
        label = label_text = None
        if self.label_output:
            labels = np.asarray(next(results)).reshape(n)
            if self.label_is_text:
                label_text = labels.astype(str).astype(object)
            else:
                label = labels.astype(np.int64)
        extra = {name: np.asarray(next(results), dtype=np.float64).reshape(n) for name in self.extra_outputs}
        return ModelOutputs(score, label, label_text, probabilities, self.classes, extra)


def bind_inputs(
    session: ort.InferenceSession, settings: ModelSettings, features: Sequence[FeatureSpec], graph: _Graph
) -> list[InputBinding]:
    """Map every model input to the features that feed it; SignatureMismatch names what does not fit."""
    inputs = {i.name: i for i in session.get_inputs()}
    fed = _feeders(inputs, settings, features)
    bindings = []
    for name, model_input in inputs.items():
        specs = fed.get(name)
        if not specs:
            raise SignatureMismatch(
                f"model input {name!r} ({model_input.type} {model_input.shape}) is fed by no feature:"
                f" add features with `input: {name}`"
            )
        bindings.append(_bind_input(model_input, specs, graph))
    return bindings


def _feeders(
    inputs: dict[str, ort.NodeArg], settings: ModelSettings, features: Sequence[FeatureSpec]
) -> dict[str, list[FeatureSpec]]:
    """The features that feed each model input (a feature's `input`, else model.input_name or the only input)."""
    default = settings.input_name or (next(iter(inputs)) if len(inputs) == 1 else None)
    if settings.input_name and settings.input_name not in inputs:
        raise SignatureMismatch(f"model has no input {settings.input_name!r}; it has {sorted(inputs)}")
    fed: dict[str, list[FeatureSpec]] = {}
    for spec in features:
        target = spec.input or default
        if target is None:
            raise SignatureMismatch(
                f"feature {spec.name!r} names no model input and the model has inputs {sorted(inputs)}:"
                " set `input` on each feature (or model.input_name)"
            )
        if target not in inputs:
            raise SignatureMismatch(f"feature {spec.name!r} feeds input {target!r}; the model has {sorted(inputs)}")
        fed.setdefault(target, []).append(spec)
    return fed


def _bind_input(model_input: ort.NodeArg, specs: list[FeatureSpec], graph: _Graph) -> InputBinding:
    """The binding of one model input to its features, once their types and widths fit its type and shape."""
    name = model_input.name
    dtype = _ELEMENT_TYPES.get(model_input.type)
    if dtype is None:
        raise SignatureMismatch(f"input {name!r} is {model_input.type}, which streamserve cannot feed")
    names = [spec.name for spec in specs]
    text_input = dtype == np.dtype(object)
    if text_input and not all(spec.text for spec in specs):
        raise SignatureMismatch(f"input {name!r} takes strings; features {names} must all be dtype 'string'")
    if not text_input and any(spec.text for spec in specs):
        text = [spec.name for spec in specs if spec.text]
        raise SignatureMismatch(
            f"input {name!r} is {model_input.type}; string features {text} need a string input or a vocabulary"
        )
    width = sum(spec.width for spec in specs)
    shape = list(model_input.shape)
    if len(shape) not in (1, 2):
        raise SignatureMismatch(f"input {name!r} has shape {shape}, expected [batch] or [batch, columns]")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise SignatureMismatch(f"input {name!r} has a fixed batch size {shape[0]}; batches need a dynamic axis")
    expected = 1 if len(shape) == 1 else shape[1]
    if isinstance(expected, int) and expected > 0 and expected != width:
        raise SignatureMismatch(f"input {name!r} takes {expected} columns; features {names} give {width}")
    return InputBinding(name, dtype, tuple(names), width, len(shape), graph.categories_of(name))


def _check_outputs(settings: ModelSettings, version: str, outputs: dict[str, ort.NodeArg]) -> None:
    wanted = [settings.score_output, settings.label_output, *settings.extra_outputs]
    for name in filter(None, wanted):
        if name not in outputs:
            raise SignatureMismatch(
                f"model {settings.name} {version} has no output {name!r}; it has {sorted(outputs)}"
                " (classifiers must be converted with zipmap disabled)"
            )
    for name in [settings.score_output, *settings.extra_outputs]:
        if outputs[name].type not in _NUMERIC_OUTPUTS:
            raise SignatureMismatch(f"output {name!r} is {outputs[name].type}, expected a numeric tensor")
    if settings.label_output:
        label = outputs[settings.label_output]
        if label.type not in {*_NUMERIC_OUTPUTS, "tensor(string)", "tensor(bool)"}:
            raise SignatureMismatch(f"output {settings.label_output!r} is {label.type}: labels must be ints or strings")


def _score_column(settings: ModelSettings, outputs: dict[str, ort.NodeArg], classes: tuple[str, ...]) -> int | None:
    """The column of a 2-D score output to read (None: the output has one value per row)."""
    if settings.score_column is None:
        return None
    shape = outputs[settings.score_output].shape
    if len(shape) != 2:
        raise SignatureMismatch(f"output {settings.score_output!r} has shape {shape}; score_column needs a 2-D output")
    column = settings.score_column
    if isinstance(column, str):
        if column not in classes:
            raise SignatureMismatch(f"score_column {column!r} is not a class of the model; it has {list(classes)}")
        column = classes.index(column)
    width = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else None
    if width is not None and not 0 <= column < width:
        raise SignatureMismatch(f"score_column {column} is outside output {settings.score_output!r} of shape {shape}")
    if classes and settings.probabilities and width is not None and width != len(classes):
        raise SignatureMismatch(f"output {settings.score_output!r} has {width} columns for {len(classes)} classes")
    return column


@dataclass(frozen=True)
class _Graph:
    """What the ONNX graph itself says: classifier class labels, categories known per string input."""

    classes: tuple[str, ...] = ()
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def categories_of(self, input_name: str) -> tuple[str, ...]:
        """Categories of the first encoder downstream of an input (empty when none is found)."""
        return self.categories.get(input_name, ())

    @classmethod
    def parse(cls, model_bytes: bytes) -> _Graph:
        """Read class labels and encoder categories with the onnx package (nothing when it cannot parse)."""
        try:
            import onnx

            graph = onnx.load_from_string(model_bytes).graph
        except Exception:  # noqa: BLE001 - onnxruntime already loaded it: this is optional metadata
            return cls()
        classes: tuple[str, ...] = ()
        consumers: dict[str, list[object]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            attributes = {a.name: a for a in node.attribute}
            for attr in _CLASS_ATTRIBUTES:
                if not classes and attr in attributes:
                    found = onnx.helper.get_attribute_value(attributes[attr])
                    classes = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in found)
        categories = {}
        for model_input in graph.input:
            seen, frontier = set(), [model_input.name]
            while frontier and model_input.name not in categories:
                tensor = frontier.pop(0)
                for node in consumers.get(tensor, []):
                    if id(node) in seen:
                        continue
                    seen.add(id(node))
                    attributes = {a.name: a for a in node.attribute}  # type: ignore[attr-defined]
                    found = next((attributes[a] for a in _CATEGORY_ATTRIBUTES if a in attributes), None)
                    if found is not None:
                        values = onnx.helper.get_attribute_value(found)
                        categories[model_input.name] = tuple(v.decode() for v in values[:8])
                        break
                    frontier.extend(node.output)  # type: ignore[attr-defined]
        return cls(classes, categories)


def graph_labels(model_bytes: bytes) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """What the graph says beside its signature: the classifier's class labels, and the first categories of the
    encoder downstream of each string input (``streamserve init`` and ``check`` show them)."""
    graph = _Graph.parse(model_bytes)
    return graph.classes, dict(graph.categories)
