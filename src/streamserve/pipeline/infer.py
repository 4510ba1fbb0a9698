"""ONNX Runtime inference on micro-batches, with the model's signature checked against the pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from streamserve.config import ModelSettings
from streamserve.errors import ModelError, SignatureMismatch
from streamserve.records import ModelOutputs

log = logging.getLogger(__name__)

_FLOAT_INPUTS = {"tensor(float)"}


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


@dataclass
class OnnxModel:
    """A loaded, validated model version ready to score float32 feature matrices."""

    name: str
    version: str
    session: ort.InferenceSession
    input_name: str
    score_output: str
    score_column: int | None
    label_output: str | None
    sha256: str = ""
    uri: str = ""

    @classmethod
    def load(
        cls,
        model_bytes: bytes,
        settings: ModelSettings,
        version: str,
        n_features: int,
        sha256: str = "",
        uri: str = "",
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
        model = cls(
            name=settings.name,
            version=version,
            session=session,
            input_name=_check_input(session, settings, n_features),
            score_output=settings.score_output,
            score_column=settings.score_column,
            label_output=settings.label_output,
            sha256=sha256,
            uri=uri,
        )
        model._check_outputs()
        model.warm_up(n_features)
        return model

    def _check_outputs(self) -> None:
        outputs = {o.name: o for o in self.session.get_outputs()}
        wanted = [self.score_output, *([self.label_output] if self.label_output else [])]
        for name in wanted:
            if name not in outputs:
                raise SignatureMismatch(
                    f"model {self.name} {self.version} has no output {name!r}; it has {sorted(outputs)}"
                    " (classifiers must be converted with zipmap disabled)"
                )
        score = outputs[self.score_output]
        if score.type not in ("tensor(float)", "tensor(double)"):
            raise SignatureMismatch(f"output {self.score_output!r} is {score.type}, expected a float tensor")
        if self.score_column is not None and len(score.shape) != 2:
            raise SignatureMismatch(
                f"output {self.score_output!r} has shape {score.shape}; score_column needs a 2-D output"
            )

    def warm_up(self, n_features: int, rows: int = 64) -> None:
        """Run a few batches so the first real batch does not pay for lazy initialisation."""
        sample = np.random.default_rng(0).random((rows, n_features), dtype=np.float32)
        for size in (1, rows):
            outputs = self.predict(sample[:size])
            if outputs.score.shape != (size,):
                raise SignatureMismatch(
                    f"model {self.name} {self.version} returned scores of shape {outputs.score.shape} for {size} rows"
                )

    def predict(self, matrix: np.ndarray) -> ModelOutputs:
        """Score a float32 matrix of shape (rows, features)."""
        wanted = [self.score_output, *([self.label_output] if self.label_output else [])]
        results = self.session.run(wanted, {self.input_name: matrix})
        score = np.asarray(results[0], dtype=np.float64)
        if self.score_column is not None:
            score = score[:, self.score_column]
        score = score.reshape(len(matrix))
        label = np.asarray(results[1]).reshape(len(matrix)).astype(np.int64) if self.label_output else None
        return ModelOutputs(score=score, label=label)


def _check_input(session: ort.InferenceSession, settings: ModelSettings, n_features: int) -> str:
    inputs = session.get_inputs()
    if settings.input_name is None:
        if len(inputs) != 1:
            raise SignatureMismatch(f"model has inputs {[i.name for i in inputs]}; set model.input_name to choose one")
        model_input = inputs[0]
    else:
        found = [i for i in inputs if i.name == settings.input_name]
        if not found:
            raise SignatureMismatch(f"model has no input {settings.input_name!r}; it has {[i.name for i in inputs]}")
        model_input = found[0]
    if model_input.type not in _FLOAT_INPUTS:
        raise SignatureMismatch(f"input {model_input.name!r} is {model_input.type}, expected tensor(float)")
    shape = model_input.shape
    if len(shape) != 2:
        raise SignatureMismatch(f"input {model_input.name!r} has shape {shape}, expected [batch, features]")
    if isinstance(shape[0], int):
        raise SignatureMismatch(
            f"input {model_input.name!r} has a fixed batch size {shape[0]}; micro-batches need a dynamic axis"
        )
    if isinstance(shape[1], int) and shape[1] != n_features:
        raise SignatureMismatch(
            f"input {model_input.name!r} takes {shape[1]} features; the feature spec has {n_features}"
        )
    return str(model_input.name)
