"""Batch spans over real OTLP/HTTP (an in-process receiver): messaging conventions and the producers' sampling."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, TraceFlags

from streamserve.observe.context import BatchContext
from streamserve.observe.tracing import BatchTracer, ProduceTracer, sampler
from streamserve.records import Source
from tests.otlp import otlp_receiver

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP trace receiver on a free port: every export request, decoded."""
    with otlp_receiver() as found:
        yield found


def _attributes(span: SpanProto) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind)
    return values


def test_an_exported_batch_span_follows_the_messaging_conventions(
    receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = receiver
    settings = SimpleNamespace(trace_sample_ratio=1.0, otlp_endpoint=url)
    tracer = BatchTracer.from_settings(settings, "w1", group="scorers", output_topic="predictions")
    assert tracer is not None
    headers = [("traceparent", f"00-{TRACE}-b7ad6b7169203331-01".encode())]
    sources = [Source("transactions", 2, 41, None, b"x", headers, 0)]
    polled = (1_700_000_000_000_000_000, 1_700_000_000_004_000_000)  # the batch gathered in 4 ms of polls
    with tracer.batch_span(sources, BatchContext.of(1, sources, "v1"), polled) as span:
        tracer.stage_spans(span, SimpleNamespace(stages={"decode": [10, 20], "produce": [30, 40]}), 0)
    tracer.shutdown()  # flushes the batch processor: the export happened over HTTP

    spans = {s.name: s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans}
    batch, produce, receive = spans["streamserve.batch"], spans["produce"], spans["receive"]
    assert receive.kind == SpanProto.SPAN_KIND_CLIENT
    assert _attributes(receive) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "receive",
        "messaging.operation.name": "poll",
        "messaging.destination.name": "transactions",
        "messaging.consumer.group.name": "scorers",
        "messaging.destination.partition.id": "2",
        "messaging.batch.message_count": 1,
    }
    # The polls come first: the receive span is the batch's root, linked to the inputs like the process span.
    assert (batch.parent_span_id, receive.parent_span_id) == (receive.span_id, b"")
    assert batch.trace_id == receive.trace_id
    assert [link.trace_id.hex() for link in receive.links] == [TRACE]
    assert (receive.start_time_unix_nano, receive.end_time_unix_nano) == polled
    assert batch.kind == SpanProto.SPAN_KIND_CONSUMER
    assert _attributes(batch) | {"streamserve.batch.id": None} == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "transactions",
        "messaging.consumer.group.name": "scorers",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 41,
        "messaging.batch.message_count": 1,
        "streamserve.batch.id": None,
        "streamserve.model.version": "v1",
        "streamserve.batch.traced_inputs": 1,
    }
    assert [link.trace_id.hex() for link in batch.links] == [TRACE]
    assert produce.kind == SpanProto.SPAN_KIND_PRODUCER
    assert _attributes(produce) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "predictions",
    }
    assert produce.parent_span_id == batch.span_id
    assert spans["decode"].kind == SpanProto.SPAN_KIND_INTERNAL


def _link(sampled: bool) -> Link:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return Link(SpanContext(int(TRACE, 16), 0xB7AD6B7169203331, is_remote=True, trace_flags=flags))


def test_the_producers_sampling_decision_is_honoured() -> None:
    never, always = sampler(0.0), sampler(1.0)
    trace_id = int(TRACE, 16)
    assert (
        never.should_sample(None, trace_id, "b", links=[_link(False), _link(True)]).decision
        == Decision.RECORD_AND_SAMPLE
    )
    assert always.should_sample(None, trace_id, "b", links=[_link(False)]).decision == Decision.DROP
    assert always.should_sample(None, trace_id, "b").decision == Decision.RECORD_AND_SAMPLE, "untraced: the ratio"
    assert never.should_sample(None, trace_id, "b").decision == Decision.DROP


def test_produce_gives_each_record_the_traceparent_of_its_exported_send_span(
    receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    url, received = receiver
    tracer = ProduceTracer.from_settings(SimpleNamespace(trace_sample_ratio=1.0, otlp_endpoint=url), "transactions")
    assert tracer is not None
    ((name, traceparent),) = tracer.headers()
    tracer.shutdown()
    assert name == "traceparent"
    version, trace_id, span_id, flags = traceparent.decode().split("-")  # type: ignore[union-attr]
    assert (version, flags) == ("00", "01")
    (span,) = [s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert (span.trace_id.hex(), span.span_id.hex()) == (trace_id, span_id)
    assert span.kind == SpanProto.SPAN_KIND_PRODUCER
    assert _attributes(span)["messaging.operation.type"] == "send"
    assert _attributes(span)["messaging.destination.name"] == "transactions"


def test_an_unsampled_record_says_so_in_its_traceparent() -> None:
    tracer = ProduceTracer.from_settings(SimpleNamespace(trace_sample_ratio=1e-12, otlp_endpoint=None), "t")
    assert tracer is not None
    ((_, traceparent),) = tracer.headers()
    tracer.shutdown()
    assert traceparent.endswith(b"-00"), "the workers drop what the producer dropped"  # type: ignore[union-attr]
