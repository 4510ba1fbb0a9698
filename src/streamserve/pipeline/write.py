"""Writing a processed batch: its outputs, with the batch's trace header, and its dead letters, to the sink."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from streamserve.observe.tracing import TRACEPARENT, input_context
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.process import BatchResult
from streamserve.pipeline.sink import InflightBatch, OutputSink
from streamserve.records import Headers, Rejected

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutputTopics:
    """Where a batch's records go besides the lanes' own topics."""

    shadow: str
    """Shadow outputs: one the sink refuses is dropped, its live output stands."""
    dead_letter: str


def write_batch(
    result: BatchResult, sink: OutputSink, inflight: InflightBatch, topics: OutputTopics, traceparent: bytes | None
) -> list[Rejected]:
    """Produce a processed batch's outputs and dead letters into ``inflight``; returns every rejected record.

    A live output the sink refuses (too large for its topic) is rejected and dead-lettered like the others, and
    no longer counts as a prediction (``result`` is updated: its rejected records and predictions).
    """
    rejected = result.rejected
    for topic, encoded in result.outputs:
        headers = encoded.headers if traceparent is None else _with_trace_once(encoded.headers, traceparent)
        for position, exc in sink.produce_all(inflight, topic, encoded.keys, encoded.values, headers):
            if topic != topics.shadow:  # a shadow output is dropped, its live one stands
                rejected.append(Rejected.from_error(encoded.sources[position], exc.stage, exc))
                result.predictions -= 1
    for topic, encoded in result.side:  # a side record the sink refuses is dropped: its prediction stands
        sink.produce_all(inflight, topic, encoded.keys, encoded.values, encoded.headers)
    for item in rejected:
        sink.produce(inflight, topics.dead_letter, *dead_letter(item, sink.max_record_bytes(topics.dead_letter)))
        log_dead_letter(item)
    return rejected


def log_dead_letter(item: Rejected) -> None:
    """One WARNING line per dead letter: stage, reason, where the record came from, and its producer's trace id
    (the batch's trace id is added by the log context, like every line written inside a batch)."""
    source, producer = item.source, input_context(item.source.headers)
    trace = f" input_trace_id={producer.trace_id:032x}" if producer is not None else ""
    log.warning("dead letter: stage=%s reason=%s: %s source=%s/%d@%d%s", item.stage, item.error_class,
                item.message, source.topic, source.partition, source.offset, trace)  # fmt: skip


def _with_trace_once(headers: list[Headers], trace: bytes) -> list[Headers]:
    """Each record's headers with the batch's trace header instead of any other, once per shared list."""
    traced: dict[int, Headers] = {}
    found = []
    for record_headers in headers:
        with_trace = traced.get(id(record_headers))
        if with_trace is None:
            with_trace = traced[id(record_headers)] = _with_trace(record_headers, trace)
        found.append(with_trace)
    return found


def _with_trace(headers: Any, traceparent: bytes) -> Any:
    return [*(h for h in headers or () if h[0] != TRACEPARENT), (TRACEPARENT, traceparent)]
