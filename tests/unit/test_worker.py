"""The worker's loop without servers: how Worker._step batches, holds back under backpressure, settles a revoke,
and drains on the way out.

The source, the sink and the processor are recording fakes with the interface the worker and the delivery use
(KafkaSource, OutputSink, BatchProcessor); the delivery strategies, the batcher (with a clock of its own) and
the telemetry are the real ones. The behaviour under a real broker is covered by the integration and fault suites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from streamserve import app
from streamserve.app import Worker
from streamserve.config import BatchSettings, OutputSettings, PipelineSettings
from streamserve.observe.metrics import HealthState, WorkerMetrics
from streamserve.observe.telemetry import Telemetry
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.delivery import delivery_for
from streamserve.pipeline.encode import EncodedBatch
from streamserve.pipeline.process import BatchResult
from streamserve.pipeline.sink import InflightBatch
from streamserve.records import Headers, Rejected, Source
from tests.unit.test_delivery import FakeSink, FakeSource, src

BAD = b"not a record"


@dataclass
class LoopSource(FakeSource):
    """Hands out the queued records, at most as many as asked per poll; a poll may serve a rebalance first."""

    queued: list[Source] = field(default_factory=list)
    polls: list[tuple[int, float]] = field(default_factory=list)
    pauses: int = 0
    resumes: int = 0
    rebalance: Callable[[], None] | None = None
    """Served by the next poll (as librdkafka serves rebalance callbacks inside poll)."""

    def poll(self, max_records: int, timeout: float) -> list[Source]:
        self.polls.append((max_records, timeout))
        rebalance, self.rebalance = self.rebalance, None
        if rebalance is not None:
            rebalance()
        taken, self.queued = self.queued[:max_records], self.queued[max_records:]
        return taken

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1


@dataclass
class LoopSink(FakeSink):
    """Keeps what is produced; a poll acknowledges everything sealed, or only from the ``ack_from_poll``-th on."""

    produced: list[tuple[str, bytes | None]] = field(default_factory=list)
    polls: int = 0
    ack_from_poll: int = 1

    def produce_all(
        self, batch: InflightBatch, topic: str, keys: list[Any], values: list[bytes], headers: list[Headers]
    ) -> list[tuple[int, Exception]]:
        batch.pending += len(values)
        self.produced += [(topic, value) for value in values]
        return []

    def produce(
        self, batch: InflightBatch, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        batch.pending += 1
        self.produced.append((topic, value))

    def max_record_bytes(self, topic: str) -> int:
        return 1 << 20

    def poll(self, timeout: float = 0.0) -> None:
        self.polls += 1
        if self.polls >= self.ack_from_poll:
            self.ack()


class FakeProcessor:
    """One prediction per record, a dead letter for a record whose value is BAD; records what it was asked."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.prefetched: list[list[int]] = []
        self.dropped = 0
        self.used_ahead = 0

    def run(self, sources: list[Source], routing: Any) -> BatchResult:
        self.batches.append([s.offset for s in sources])
        good = [s for s in sources if s.value != BAD]
        outputs = EncodedBatch(good, [None] * len(good), [b"prediction"] * len(good), [[] for _ in good])
        rejected = [Rejected(s, "decode", "DecodeError", "not a record") for s in sources if s.value == BAD]
        return BatchResult([("out", outputs)], rejected, predictions=len(good))

    def prefetch(self, sources: list[Source]) -> None:
        self.prefetched.append([s.offset for s in sources])

    def drop_prefetched(self) -> None:
        self.dropped += 1


@dataclass
class Loop:
    worker: Worker
    source: LoopSource
    sink: LoopSink
    processor: FakeProcessor
    clock: list[float]


def make_loop(guarantee: str = "at_least_once", max_inflight_batches: int = 16, ack_from_poll: int = 1) -> Loop:
    """A worker of fakes: batches of 4 records (one batch held ahead), closed by size or after 100 ms."""
    settings = PipelineSettings.model_construct(
        output=OutputSettings.model_construct(
            topic="out", dead_letter_topic="dlq", shadow_topic=None, schema_path=Path("prediction.avsc")
        ),
        batch=BatchSettings(max_batch_size=4, max_wait_ms=100, max_inflight_batches=max_inflight_batches),
        log_every_s=0,
        shutdown_timeout_s=5.0,
    )
    clock = [0.0]
    batcher: MicroBatcher[Source] = MicroBatcher(4, 100, clock=lambda: clock[0], ahead=1)
    source, sinks = LoopSource(), []

    def make_sink(options: dict[str, Any]) -> LoopSink:
        sinks.append(LoopSink(options, ack_from_poll=ack_from_poll))
        return sinks[-1]

    delivery = delivery_for(guarantee, source, batcher, make_sink, 5.0, "group-worker-1")  # type: ignore[arg-type]
    metrics = WorkerMetrics("w", lambda: ("m", "v1"), lambda: delivery.inflight)
    processor = FakeProcessor()
    worker = Worker(
        settings=settings,
        worker_id="w",
        source=source,  # type: ignore[arg-type]
        batcher=batcher,
        delivery=delivery,
        processor=processor,  # type: ignore[arg-type]
        registry=SimpleNamespace(routing=SimpleNamespace(live=SimpleNamespace(version="v1"))),  # type: ignore[arg-type]
        follower=None,
        health=HealthState(60, lambda: True),
        metrics=metrics,
        telemetry=Telemetry(metrics, None),
        observe_server=None,
        read_lag=lambda: [],
    )
    return Loop(worker, source, sinks[0], processor, clock)


def test_a_step_takes_a_full_batch_and_sends_the_lookup_of_the_one_held_behind_it() -> None:
    loop = make_loop()
    loop.source.queued = [src(0, offset) for offset in range(10)]
    loop.source.queued[2] = Source("in", 0, 2, None, BAD, None, 0)

    loop.worker._step()
    assert loop.source.polls == [(4, 0.1), (4, 0)], "waits for the open batch, then takes what is fetched already"
    assert loop.processor.batches == [[0, 1, 2, 3]]
    assert loop.processor.prefetched == [[4, 5, 6, 7]], "the full batch behind gets its head start"
    assert loop.sink.produced == [("out", b"prediction")] * 3 + [("dlq", BAD)]
    assert loop.source.released == [("in", 0, 4)], "acknowledged (the sink's poll) and committed in the same step"
    assert (loop.worker.stats.events_in, loop.worker.stats.predictions_out) == (4, 3)
    assert (loop.worker.stats.dead_letters, loop.worker.stats.by_stage) == (1, {"decode": 1})

    loop.worker._step()
    assert loop.source.polls[2:] == [(4, 0.0), (2, 0)], "a full batch held is ready at once: no waiting"
    assert loop.processor.batches[1] == [4, 5, 6, 7]
    assert loop.processor.prefetched == [[4, 5, 6, 7]], "two records behind: nothing decided to prefetch"

    loop.worker._step()
    assert len(loop.processor.batches) == 2, "two records wait for the time bound"
    loop.clock[0] += 0.1
    loop.worker._step()
    assert loop.processor.batches[2] == [8, 9], "the time bound closes the batch"
    assert loop.worker.stats.batches == 3
    assert loop.source.released[-1] == ("in", 0, 10)


def test_a_full_in_flight_window_holds_the_loop_and_pauses_intake_until_acknowledgements_come(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app, "PAUSE_AFTER_S", -1.0)  # pause at the first wait instead of after a second
    loop = make_loop(max_inflight_batches=2, ack_from_poll=5)
    loop.source.queued = [src(0, offset) for offset in range(12)]
    loop.worker._step()
    loop.worker._step()
    assert loop.worker.delivery.inflight == 2, "nothing acknowledged yet"
    assert loop.source.pauses == 0

    loop.worker._step()
    assert loop.sink.polls == 5 + 1, "polled the producer until the acknowledgements came, then at the step's end"
    assert loop.source.pauses == 1
    assert loop.worker.stats.paused == 1
    assert loop.worker.stats.backpressure_s > 0
    assert loop.processor.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], "then went on"
    assert loop.source.resumes == 0, "still paused: the window was full when the wait began"

    loop.worker._step()
    assert loop.source.resumes == 1, "resumed once the window is at most half full"


def test_a_revoke_served_by_a_poll_finishes_and_commits_what_is_held_at_least_once() -> None:
    loop = make_loop()
    loop.source.queued = [src(0, 0), src(0, 1), src(1, 0)]
    loop.worker._step()
    assert loop.processor.batches == [], "three records wait for the time bound"

    loop.source.rebalance = lambda: loop.worker._revoked([TopicPartition("in", 0)])
    loop.worker._step()
    assert loop.processor.batches == [[0, 1, 0]], "what was held is processed before the partitions move"
    assert sorted(loop.source.released) == [("in", 0, 2), ("in", 1, 1)]
    assert loop.source.commits[-2:] == [(True, False), (True, True)], "the revoke's synchronous commit, then the step's"
    assert not len(loop.worker.batcher)


def test_a_revoke_leaves_the_revoked_records_unprocessed_exactly_once() -> None:
    loop = make_loop("exactly_once")
    loop.source.queued = [src(0, 0), src(1, 0), src(0, 1)]
    loop.worker._step()
    loop.source.rebalance = lambda: loop.worker._revoked([TopicPartition("in", 0)])
    loop.worker._step()
    assert loop.processor.batches == [], "no transaction is open between batches: nothing to finish"
    assert [(s.partition, s.offset) for s in loop.worker.batcher.take()] == [(1, 0)]


def test_draining_processes_what_is_held_commits_and_forgets_what_was_prefetched() -> None:
    loop = make_loop()
    loop.source.queued = [src(0, offset) for offset in range(6)]
    loop.worker._step()
    assert len(loop.worker.batcher) == 2
    dropped = loop.processor.dropped

    loop.worker.stop()
    loop.worker._loop()
    assert loop.processor.batches == [[0, 1, 2, 3], [4, 5]]
    assert loop.source.released[-1] == ("in", 0, 6)
    assert loop.source.commits[-1] == (True, False), "the last commit waits for the broker"
    assert loop.processor.dropped == dropped + 1
    assert loop.worker.drained
