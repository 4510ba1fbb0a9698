"""The predictive-maintenance example as a test pipeline: its own topics, group, machine ids, trained models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import redis
import yaml

from streamserve.config import PipelineSettings, load_settings
from streamserve.demo.maintenance import Machines, TrainedModel, model_inputs
from tests.integration.harness import REPO, create_pipeline_topics, unique

EXAMPLE = REPO / "examples" / "maintenance"


@dataclass
class MaintenancePipeline:
    """examples/maintenance/pipeline.yaml with this test's topics, group and model, written to `directory`."""

    bootstrap: str
    redis_url: str
    directory: Path
    model_path: Path
    partitions: int = 4
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = field(default_factory=lambda: unique("mt"))

    def __post_init__(self) -> None:
        config = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())
        config["input"].update(topic=f"{self.name}-in", schema=str(REPO / "schemas" / "machine_reading.avsc"))
        config["output"].update(
            topic=f"{self.name}-out",
            dead_letter_topic=f"{self.name}-dlq",
            schema=str(REPO / "schemas" / "maintenance_prediction.avsc"),
        )
        for feature in config["features"]:
            if "vocabulary_file" in feature:
                feature["vocabulary_file"] = str(EXAMPLE / feature["vocabulary_file"])
        config["model"]["uri"] = str(self.model_path)
        config["kafka"] = {
            "bootstrap_servers": self.bootstrap,
            "group_id": f"{self.name}-group",
            "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
        }
        config["redis"] = {"url": self.redis_url}
        config["control"] = {"topic": f"{self.name}-control", "status_topic": f"{self.name}-status"}
        config["log_every_s"] = 2.0
        for dotted, value in self.overrides.items():
            node = config
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        self.path = self.directory / f"{self.name}.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.settings: PipelineSettings = load_settings(self.path)

    def create_topics(self) -> None:
        create_pipeline_topics(self.bootstrap, self.settings, self.partitions)

    def load_machines(self, client: redis.Redis, machines: Machines) -> None:
        writes = client.pipeline(transaction=False)
        for machine_id, values in machines.redis.items():
            writes.hset(f"machine:{machine_id}", mapping=values)
        writes.execute()


def offline_predictions(
    model: TrainedModel, readings: list[dict[str, Any]], machines: Machines
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of onnxruntime on inputs rebuilt from the raw readings (no streamserve code)."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], model_inputs(readings, machines))
    return labels, probabilities
