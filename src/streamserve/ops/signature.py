"""A model's signature as ``streamserve init`` and ``check`` read it: inputs and outputs with their element types
and shapes, the classifier's class labels, the categories its encoders know for each string input."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streamserve.errors import ModelError
from streamserve.pipeline.infer import graph_labels

DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
"""The feature dtype that feeds each model input type as it is."""
NUMERIC_TYPES = ("tensor(float)", "tensor(double)", "tensor(int64)", "tensor(int32)")


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, ONNX type (``tensor(float)``, ``seq(map(...))``) and shape."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]

    @property
    def columns(self) -> int | None:
        """Values per row: 1 for [batch] and [batch, 1], the second dimension when fixed, None when dynamic."""
        if len(self.shape) <= 1:
            return 1
        second = self.shape[1]
        return second if isinstance(second, int) and second > 0 else None

    @property
    def dtype(self) -> str | None:
        """The feature dtype that feeds this input (None: streamserve cannot feed it)."""
        return DTYPES.get(self.type)

    def describe(self) -> str:
        """``tensor(float) [None, 4]``, as messages show it."""
        return f"{self.type} {list(self.shape)}"


@dataclass(frozen=True)
class ModelSignature:
    """What the model takes and gives."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    classes: tuple[str, ...] = ()
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def output(self, name: str) -> Tensor | None:
        """The output of this name, if the model has one."""
        return next((o for o in self.outputs if o.name == name), None)


def read_signature(path: Path) -> ModelSignature:
    """The signature of an .onnx file; ModelError in one line when onnxruntime cannot load it."""
    import onnxruntime as ort

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror}") from exc
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())}") from exc
    classes, categories = graph_labels(data)

    def tensors(args: list[ort.NodeArg]) -> tuple[Tensor, ...]:
        return tuple(Tensor(a.name, a.type, tuple(a.shape or ())) for a in args)

    return ModelSignature(tensors(session.get_inputs()), tensors(session.get_outputs()), classes, categories)
