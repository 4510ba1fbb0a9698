"""The systems under test: how each one is started on a given input and output topic."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.dataset import SCHEMAS, Dataset

JOBS = Path(__file__).resolve().parent / "jobs"
VENVS = Path(__file__).resolve().parent / ".venvs"
PEERS = Path(__file__).resolve().parent / "peers"


@dataclass(frozen=True)
class Scenario:
    """A system under test: a name for the tables, a kind, and how many processes it runs."""

    name: str
    kind: str  # passthrough | handloop | quix | faust | streamserve
    processes: int = 1
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted streamserve config overrides (streamserve only)."""
    args: tuple[str, ...] = ()
    """Extra command-line arguments of a job script."""
    latency: bool = True
    """Also measured at offered rates (not only over the backlog)."""
    layout: str = "hash"
    """Redis layout of the entity features streamserve reads: hash (HMGET) or packed (MGET)."""

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

    def entity(name: str, key: str, field: str, default: float, index: int) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": name, "source": "redis", "key": key, "field": field, "default": default}
        if layout == "packed":
            spec.update(layout="packed", index=index)
        return spec

    config: dict[str, Any] = {
        "input": {
            "topic": input_topic,
            "schema": str(SCHEMAS / "card_transaction.avsc"),
            "key_field": "card_id",
            "event_id_field": "event_id",
            "event_time_field": "event_time",
        },
        "features": [
            {"name": "amount", "source": "event", "field": "amount"},
            {"name": "hour_of_day", "source": "event", "field": "hour_of_day", "dtype": "int32"},
            {"name": "is_online", "source": "event", "field": "is_online", "dtype": "bool"},
            entity("avg_amount_30d", card, "avg_amount_30d", 50.0, 0),
            entity("txn_count_24h", card, "txn_count_24h", 0.0, 1),
            entity("chargeback_rate", card, "chargeback_rate", 0.0, 2),
            entity("merchant_risk", merchant, "risk_score", 0.5, 0),
        ],
        "model": {"name": "fraud", "uri": str(dataset.models[model_version]), "version": model_version},
        "output": {
            "topic": output_topic,
            "schema": str(SCHEMAS / "prediction.avsc"),
            "dead_letter_topic": f"{output_topic}.dlq",
        },
        "kafka": {"bootstrap_servers": dataset.stack.bootstrap, "group_id": f"{output_topic}-group"},
        "redis": {"url": dataset.stack.redis_url},
        "control": {
            "topic": f"{output_topic}.control",
            "status_topic": f"{output_topic}.status",
            "artifact_cache_dir": str(directory / "artifacts"),
        },
    }
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def streamserve_topics(output_topic: str) -> tuple[list[str], list[str]]:
    """(topics with the run's partition count, single-partition topics) a streamserve run needs besides input."""
    return [output_topic, f"{output_topic}.shadow"], [
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
        "quix": VENVS / "quix" / "bin" / "python",
        "faust": VENVS / "faust" / "bin" / "python",
    }[scenario.kind]
    script = (
        JOBS
        / {"passthrough": "passthrough.py", "handloop": "handloop.py", "quix": "quix_job.py", "faust": "faust_job.py"}[
            scenario.kind
        ]
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
        dataset.key_prefix,
        "--model",
        str(dataset.models["v1"]),
        "--schemas",
        str(SCHEMAS),
        *scenario.args,
    ]
    return [argv] * scenario.processes


def job_env(scenario: Scenario) -> dict[str, str]:
    """Environment of a scenario's processes: quiet logs, no thread oversubscription from BLAS."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STREAMSERVE_LOG_LEVEL": "INFO"}
    if scenario.kind != "streamserve":
        env["PYTHONPATH"] = str(JOBS)
    return env
