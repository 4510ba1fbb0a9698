"""The systems under test: how each one is started on a given input and output topic."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.dataset import SCHEMAS, Dataset
from streamserve.config import apply_overrides, config_from

JOBS = Path(__file__).resolve().parent / "jobs"
VENVS = Path(__file__).resolve().parent / ".venvs"
PEERS = Path(__file__).resolve().parent / "peers"
EXAMPLE_PIPELINE = Path(__file__).resolve().parents[1] / "examples" / "fraud" / "pipeline.yaml"


@dataclass(frozen=True)
class Scenario:
    """A system under test: a name for the tables, a kind, and how many processes it runs."""

    name: str
    kind: str  # passthrough | handloop | batchloop | quix | faust | streamserve
    processes: int = 1
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted streamserve config overrides (streamserve only)."""
    args: tuple[str, ...] = ()
    """Extra command-line arguments of a job script."""
    latency: bool = True
    """Also measured at offered rates (not only over the backlog)."""
    near_max: bool = True
    """With latency: also at --near-max-share of its own maximum (not only at the fixed rate)."""
    layout: str = "hash"
    """Redis layout of the entity features streamserve and the batch loop read: hash (HMGET) or packed (MGET)."""

    @property
    def title(self) -> str:
        return self.label or self.name


def ensure_peer_venv(name: str) -> Path:
    """bench/.venvs/<name> with bench/peers/requirements-<name>.txt installed; reinstalled when they change."""
    venv = VENVS / name
    requirements = PEERS / f"requirements-{name}.txt"
    stamp = venv / ".requirements"
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == requirements.read_text():
        return python
    print(f"[bench] creating {venv} from {requirements.name} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)], check=True)
    stamp.write_text(requirements.read_text())
    return python


def streamserve_config(
    dataset: Dataset,
    name: str,
    input_topic: str,
    output_topic: str,
    directory: Path,
    model_version: str = "v1",
    overrides: dict[str, Any] | None = None,
    layout: str = "hash",
) -> Path:
    """A pipeline YAML with streamserve's defaults for everything the benchmark does not have to set."""
    prefix = dataset.packed_prefix if layout == "packed" else dataset.key_prefix
    card, merchant = f"{prefix}card:{{card_id}}", f"{prefix}merchant:{{merchant_id}}"

    entities = {"avg_amount_30d": (card, 0), "txn_count_24h": (card, 1), "chargeback_rate": (card, 2)}
    entities["merchant_risk"] = (merchant, 0)
    features: dict[str, Any] = {}
    for feature, (key, index) in entities.items():
        features[f"features.{feature}.key"] = key
        if layout == "packed":  # a vector has no time: no freshness check
            features |= {f"features.{feature}.layout": "packed", f"features.{feature}.index": index}
            features |= {f"features.{feature}.max_age_s": None, f"features.{feature}.updated_at_field": None}
    # The demo's pipeline as users run it (examples/fraud/pipeline.yaml), pointed at the bench's topics.
    config = config_from(
        EXAMPLE_PIPELINE,
        {
            "input.topic": input_topic,
            **features,
            "model": {"uri": str(dataset.models[model_version]), "version": model_version},
            "output.topic": output_topic,
            "output.dead_letter_topic": f"{output_topic}.dlq",
            "kafka": {"bootstrap_servers": dataset.stack.bootstrap, "group_id": f"{output_topic}-group"},
            "redis.url": dataset.stack.redis_url,
            "monitor.feature_log_topic": f"{output_topic}.features",  # written only with monitor.feature_log
            "control": {
                "topic": f"{output_topic}.control",
                "status_topic": f"{output_topic}.status",
                "artifact_cache_dir": str(directory / "artifacts"),
            },
        },
    )
    apply_overrides(config, overrides or {})
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def streamserve_topics(output_topic: str) -> tuple[list[str], list[str]]:
    """(topics with the run's partition count, single-partition topics) a streamserve run needs besides input."""
    return [output_topic, f"{output_topic}.shadow", f"{output_topic}.features"], [
        f"{output_topic}.dlq",
        f"{output_topic}.control",
        f"{output_topic}.status",
    ]


def commands(
    scenario: Scenario, dataset: Dataset, input_topic: str, output_topic: str, directory: Path
) -> list[list[str]]:
    """The argv of each process of a scenario."""
    if scenario.kind == "streamserve":
        config = streamserve_config(
            dataset,
            output_topic,
            input_topic,
            output_topic,
            directory,
            overrides=scenario.overrides,
            layout=scenario.layout,
        )
        return [[sys.executable, "-m", "streamserve", "run", "-c", str(config)]] * scenario.processes
    python = {
        "passthrough": Path(sys.executable),
        "handloop": Path(sys.executable),
        "batchloop": Path(sys.executable),
        "quix": VENVS / "quix" / "bin" / "python",
        "faust": VENVS / "faust" / "bin" / "python",
    }[scenario.kind]
    script = (
        JOBS
        / {
            "passthrough": "passthrough.py",
            "handloop": "handloop.py",
            "batchloop": "batchloop.py",
            "quix": "quix_job.py",
            "faust": "faust_job.py",
        }[scenario.kind]
    )
    argv = [
        str(python),
        str(script),
        "--bootstrap",
        dataset.stack.bootstrap,
        "--input",
        input_topic,
        "--output",
        output_topic,
        "--group",
        f"{output_topic}-group",
        "--redis-url",
        dataset.stack.redis_url,
        "--key-prefix",
        dataset.packed_prefix if scenario.layout == "packed" else dataset.key_prefix,
        "--model",
        str(dataset.models["v1"]),
        "--schemas",
        str(SCHEMAS),
        *(("--layout", scenario.layout) if scenario.kind == "batchloop" else ()),
        *scenario.args,
    ]
    return [argv] * scenario.processes


def job_env(scenario: Scenario) -> dict[str, str]:
    """Environment of a scenario's processes: quiet logs, no thread oversubscription from BLAS."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STREAMSERVE_LOG_LEVEL": "INFO"}
    if scenario.kind != "streamserve":
        env["PYTHONPATH"] = str(JOBS)
    return env
