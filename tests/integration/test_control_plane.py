"""The control plane against the real broker: convergence, poisoned and forged announcements, supervision."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamserve.control.announcements import ModelAnnouncement, WorkerStatus
from streamserve.control.fetch import sha256_hex
from streamserve.control.publish import fleet_status, publish, read_records, rollback, send
from streamserve.control.reading import acceptance_policy
from streamserve.control.rollout import AcceptancePolicy, ArtifactRef
from streamserve.control.signing import generate, load_private, sign
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.errors import ControlPlaneFailed, StreamServeError
from streamserve.pipeline.infer import OnnxModel
from tests.integration.harness import (
    Pipeline,
    WorkerProcess,
    WorkerThread,
    predictions,
    produce_events,
    unique,
    wait_until,
)


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Path, str]:
    """A private key file and its public line, as `streamserve keys generate` writes them."""
    private = tmp_path / "keys" / "release.pem"
    _, public = generate(private)
    return private, public


@pytest.fixture
def signed_pipeline(pipeline_factory: Callable[..., Pipeline], signing_key: tuple[Path, str]) -> Pipeline:
    """A pipeline whose workers trust one key (so they require signatures)."""
    return pipeline_factory(**{"control.trusted_keys": [signing_key[1]]})


def _policy(pipeline: Pipeline) -> AcceptancePolicy:
    return acceptance_policy(pipeline.settings.control, "fraud")


def _kafka(pipeline: Pipeline) -> dict[str, Any]:
    return {"bootstrap.servers": pipeline.bootstrap}


def _write_raw(pipeline: Pipeline, announcement: ModelAnnouncement, copies: int = 1) -> None:
    """What anyone with write access to the control topic can do, without our publisher."""
    producer = Producer(_kafka(pipeline))
    for _ in range(copies):
        producer.produce(pipeline.settings.control.topic, announcement.encode(), announcement.record_key(), partition=0)
    assert producer.flush(30) == 0


def _attacker_key(directory: Path) -> Ed25519PrivateKey:
    """A valid Ed25519 key that no worker trusts."""
    private = directory / "keys" / "attacker.pem"
    generate(private)
    return load_private(private)


def _statuses(pipeline: Pipeline) -> dict[str, WorkerStatus]:
    return {s.worker_id: s for s in fleet_status(_kafka(pipeline), pipeline.settings.control.status_topic)}


def _regressor_model(directory: Path, entities: Entities) -> Path:
    """A regressor: no `probabilities` or `label` output, so this classifier pipeline's output mapping cannot
    serve it (string labels, the poison of the original report, are servable since multi-output models)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    from streamserve.demo.train import training_set

    x, y = training_set(entities, 500, seed=5)
    model = LinearRegression().fit(x, y.astype(np.float64))
    path = directory / "regressor.onnx"
    path.write_bytes(to_onnx(model, x[:1]).SerializeToString())
    return path


def _converged(pipeline: Pipeline, workers: list[str], version: str, generation: int, after_ms: int) -> bool:
    """Every named worker reported, after `after_ms`, serving `version` with desired generation `generation`."""
    status = _statuses(pipeline)
    return all(
        w in status
        and status[w].serving_version == version
        and status[w].desired_generation == generation
        and status[w].reported_at >= after_ms
        for w in workers
    )


def test_fleet_converges_after_rejects_restart_compaction_and_a_late_joiner(
    signed_pipeline: Pipeline,
    signing_key: tuple[Path, str],
    entities: Entities,
    models: dict[str, TrainedModel],
    tmp_path: Path,
) -> None:
    pipe = signed_pipeline
    key = load_private(signing_key[0])
    policy = _policy(pipe)
    control = pipe.settings.control.topic
    # Roll segments and clean quickly, so the log cleaner really compacts the control topic during the test.
    admin = AdminClient(_kafka(pipe))
    fast = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01", "min.compaction.lag.ms": "0"}
    fast |= {"delete.retention.ms": "100"}
    entries = [ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET) for name, value in fast.items()]
    resource = ConfigResource(ConfigResource.Type.TOPIC, control, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)

    workers = {f"conv-{i}": WorkerProcess(pipe.path, tmp_path, f"conv-{i}") for i in range(2)}
    for w in workers.values():
        w.wait_logged("assigned")
    accepted = publish(_kafka(pipe), control, policy, "v2", str(models["v2"].path), sign_key=key)
    # Rejected everywhere: unsigned, forged, a replay of generation 1, an empty digest (written twice each,
    # so the cleaner has duplicates to remove).
    forged_key = _attacker_key(tmp_path)
    v1_bytes = models["v1"].path.read_bytes()
    unsigned = replace(accepted.unsigned(), version="v1-unsigned", generation=2, sha256=sha256_hex(v1_bytes))
    _write_raw(pipe, unsigned.unsigned(), copies=2)
    _write_raw(pipe, sign(replace(unsigned, version="v1-forged", generation=3), forged_key), copies=2)
    _write_raw(pipe, accepted, copies=2)
    _write_raw(pipe, sign(replace(unsigned, version="v1-nodigest", generation=4, sha256=""), key), copies=2)
    # Accepted but unloadable on every worker: corrupt bytes with their true digest. The fleet stays on v2.
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model at all")
    publish(_kafka(pipe), control, policy, "v3-corrupt", str(corrupt), sign_key=key, validate=None)
    # Generation 2: numbered from the accepted announcements only (the rejected records claimed 2, 3 and 4).
    wait_until(lambda: _converged(pipe, list(workers), "v2", 2, 0), 60, "both workers on v2, desired generation 2")

    workers["conv-0"].kill()  # a crash, then a restart: it replays everything through the same machine
    restarted_ms = int(time.time() * 1000)
    workers["conv-0"] = WorkerProcess(pipe.path, tmp_path, "conv-0")
    written = 1 + 4 * 2 + 1  # every announcement above; the cleaner may already have run, so not read back
    filler = Producer(_kafka(pipe))

    def compacted() -> bool:
        # A keyed tombstone of another model (changes nothing) appends, which rolls the segment (segment.ms=100),
        # so the duplicates leave the active segment and the cleaner can drop them.
        filler.produce(control, None, b"filler-model", partition=0)
        assert filler.flush(10) == 0
        return sum(1 for value in read_records(_kafka(pipe), control) if value) < written

    wait_until(compacted, 120, "the log cleaner to drop the duplicate announcements", interval_s=1.0)
    workers["conv-2"] = WorkerProcess(pipe.path, tmp_path, "conv-2")  # a late joiner, after compaction
    for w in workers.values():
        w.wait_logged("assigned")
    wait_until(
        lambda: _converged(pipe, list(workers), "v2", 2, restarted_ms), 60, "all three workers on v2 after compaction"
    )

    events = list(make_events(entities, 2000, seed=301))
    produce_events(pipe, events)
    outputs = predictions(pipe, len(events))
    for w in workers.values():
        assert w.stop() == 0, w.log_tail()
    assert {r["model_version"] for _, r in outputs} == {"v2"}
    status = _statuses(pipe)
    assert {s.serving_version for s in status.values()} == {"v2"}
    assert {s.state for s in status.values()} == {"degraded"}, "v3-corrupt is desired but loads nowhere"
    assert all("protobuf" in (s.reason or "").lower() for s in status.values()), status


def test_poisoned_announcements_are_rejected_and_a_valid_one_follows(
    signed_pipeline: Pipeline,
    signing_key: tuple[Path, str],
    entities: Entities,
    models: dict[str, TrainedModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = signed_pipeline
    key = load_private(signing_key[0])
    policy = _policy(pipe)
    control = pipe.settings.control.topic
    original_warm_up = OnnxModel.warm_up

    def warm_up(self: OnnxModel, *args: Any, **kwargs: Any) -> None:
        if self.version == "v-boom":
            raise RuntimeError("injected warm-up failure")
        original_warm_up(self, *args, **kwargs)

    monkeypatch.setattr(OnnxModel, "warm_up", warm_up)
    workers = [WorkerThread(pipe.settings) for _ in range(2)]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(models["v2"].path.read_bytes()[:200])
    boom = tmp_path / "boom.onnx"
    boom.write_bytes(models["v2"].path.read_bytes())
    poisons = [
        ("v-regressor", _regressor_model(tmp_path, entities), "has no output 'probabilities'"),
        ("v-corrupt", corrupt, "protobuf"),
        ("v-boom", boom, "RuntimeError: injected warm-up failure"),
        ("v-missing", tmp_path / "absent.onnx", "cannot read artifact"),
    ]
    try:
        for version, path, reason in poisons:
            sha = sha256_hex(path.read_bytes()) if path.exists() else "a" * 64
            publish(_kafka(pipe), control, policy, version, str(path), sha256=sha, sign_key=key)

            def rejected(version: str = version, reason: str = reason) -> bool:
                return all(
                    (r := w.worker.follower.last_rejection) is not None
                    and r.version == version
                    and reason.lower() in r.reason.lower()
                    for w in workers
                    if w.worker.follower is not None
                )

            wait_until(rejected, 60, f"{version} rejected with {reason!r} on both workers")
            assert all(w.worker.follower is not None and w.worker.follower.healthy() for w in workers)
            assert all(w.worker.registry.routing.live.version == "v1" for w in workers)
        status = _statuses(pipe)
        assert all("cannot read artifact" in (s.reason or "") for s in status.values()), status
        publish(_kafka(pipe), control, policy, "v2", str(models["v2"].path), sign_key=key)
        wait_until(lambda: all(w.worker.registry.routing.live.version == "v2" for w in workers), 60, "v2 deployed")
        events = list(make_events(entities, 1000, seed=302))
        produce_events(pipe, events)
        outputs = predictions(pipe, len(events))
        assert all(w.worker.health.ready() for w in workers)
    finally:
        for w in workers:
            w.stop()
    assert {r["model_version"] for _, r in outputs} == {"v2"}
    wait_until(lambda: {s.serving_version for s in _statuses(pipe).values()} == {"v2"}, 30, "status topic says v2")


def test_publish_validates_locally_and_refuses_bad_digests(
    signed_pipeline: Pipeline, signing_key: tuple[Path, str], entities: Entities, tmp_path: Path
) -> None:
    pipe = signed_pipeline
    cli = [sys.executable, "-m", "streamserve", "models", "publish", "-c", str(pipe.path), "--model", "fraud"]
    regressor = _regressor_model(tmp_path, entities)
    refused = subprocess.run(
        [*cli, "--version", "v-regressor", "--uri", str(regressor), "--sign-key", str(signing_key[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert "failed local validation, not announced" in refused.stderr
    unsigned = subprocess.run(
        [*cli, "--version", "v1b", "--uri", str(pipe.settings.model.uri)], capture_output=True, text=True, timeout=120
    )
    assert unsigned.returncode == 2
    assert "require signed announcements" in unsigned.stderr
    for digest in ("", "abc"):
        with pytest.raises(StreamServeError, match="sha256"):
            publish(
                _kafka(pipe),
                pipe.settings.control.topic,
                _policy(pipe),
                "v1b",
                str(pipe.settings.model.uri),
                sha256=digest,
                sign_key=load_private(signing_key[0]),
            )
    assert read_records(_kafka(pipe), pipe.settings.control.topic) == [], "nothing refused was written"


def test_an_announcement_prepared_without_the_write_is_sent_later(
    signed_pipeline: Pipeline, signing_key: tuple[Path, str]
) -> None:
    """publish(write=False) does all but the write (the bench's hot swap sends it at a chosen moment)."""
    pipe, topic = signed_pipeline, signed_pipeline.settings.control.topic
    uri, key = str(pipe.settings.model.uri), load_private(signing_key[0])
    held = publish(_kafka(pipe), topic, _policy(pipe), "v1b", uri, sign_key=key, write=False)
    assert (held.generation, held.version) == (1, "v1b")
    assert read_records(_kafka(pipe), topic) == [], "write=False writes nothing"
    send(_kafka(pipe), topic, held)
    written = [ModelAnnouncement.decode(value) for value in read_records(_kafka(pipe), topic) if value]
    assert [(a.generation, a.version, a.sha256, a.signature) for a in written] == [
        (held.generation, held.version, held.sha256, held.signature)
    ]


def test_forged_unsigned_tampered_and_replayed_announcements_change_no_prediction(
    signed_pipeline: Pipeline,
    signing_key: tuple[Path, str],
    entities: Entities,
    models: dict[str, TrainedModel],
    tmp_path: Path,
) -> None:
    pipe = signed_pipeline
    key = load_private(signing_key[0])
    policy = _policy(pipe)
    control = pipe.settings.control.topic
    worker = WorkerThread(pipe.settings)
    follower = worker.worker.follower
    assert follower is not None
    v2_digest = sha256_hex(models["v2"].path.read_bytes())
    try:
        config_v1 = ArtifactRef("v1", str(models["v1"].path), sha256_hex(models["v1"].path.read_bytes()))
        deployed = publish(
            _kafka(pipe), control, policy, "v2", str(models["v2"].path), sign_key=key, config_model=config_v1
        )
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2", 30, "v2 served")
        # Back to v1 legitimately (signed): from here on every prediction must say v1.
        v1 = rollback(_kafka(pipe), control, policy, to_version="v1", sign_key=key)
        wait_until(lambda: worker.worker.registry.routing.live.version == "v1", 30, "v1 served")
        attacker = _attacker_key(tmp_path)
        attacks = [
            (
                replace(v1.unsigned(), version="v2", uri=str(models["v2"].path), sha256=v2_digest, generation=10),
                "unsigned announcement",
            ),
            (
                sign(
                    replace(v1.unsigned(), version="v2", uri=str(models["v2"].path), sha256=v2_digest, generation=11),
                    attacker,
                ),
                "untrusted key",
            ),
            (replace(v1, version="v2", generation=v1.generation), "bad signature"),
            (replace(v1, uri=str(models["v2"].path), sha256=v2_digest), "bad signature"),
            (replace(v1, generation=v1.generation + 5), "bad signature"),
            (deployed, "replayed or stale"),
            (sign(replace(v1.unsigned(), version="v2", sha256="", generation=12), key), "empty sha256"),
        ]
        events = list(make_events(entities, 3000, seed=303))
        produce_events(pipe, events[:1000])
        for record, reason in attacks:
            _write_raw(pipe, record)
            wait_until(
                lambda reason=reason: follower.last_rejection is not None and reason in follower.last_rejection.reason,
                30,
                f"rejection {reason!r}",
            )
            assert follower.rollout.generation == v1.generation
        produce_events(pipe, events[1000:])
        outputs = predictions(pipe, len(events))
    finally:
        worker.stop()
    assert {r["model_version"] for _, r in outputs} == {"v1"}
    assert len({r["event_id"] for _, r in outputs}) == len(events)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker thread's raise
def test_a_dead_follower_makes_the_worker_unready_and_exit_with_an_error(
    pipeline: Pipeline, models: dict[str, TrainedModel]
) -> None:
    worker = WorkerThread(pipeline.settings)
    follower = worker.worker.follower
    assert follower is not None
    wait_until(lambda: worker.worker.source.joined, 60, "the worker to join its group")
    assert worker.worker.health.ready()

    def broken_report(state: str | None = None) -> None:
        raise MemoryError("simulated: the follower itself breaks")

    follower.report = broken_report  # type: ignore[method-assign]
    publish(
        _kafka(pipeline),
        pipeline.settings.control.topic,
        AcceptancePolicy("fraud"),
        "v2",
        str(models["v2"].path),
    )
    wait_until(lambda: not follower.healthy(), 30, "the follower to fail")
    assert not worker.worker.health.ready()
    worker.thread.join(60)
    assert not worker.thread.is_alive(), "the worker stopped on its own"
    assert isinstance(worker.error, ControlPlaneFailed), worker.error
    assert "MemoryError" in str(worker.error)
    assert worker.worker.drained


def test_keys_generate_cli(tmp_path: Path) -> None:
    out = tmp_path / unique("k") / "release.pem"
    done = subprocess.run(
        [sys.executable, "-m", "streamserve", "keys", "generate", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    public = (out.parent / "release.pem.pub").read_text().strip()
    assert public in done.stdout
    assert public.startswith("ed25519:")
    again = subprocess.run(
        [sys.executable, "-m", "streamserve", "keys", "generate", "--out", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
