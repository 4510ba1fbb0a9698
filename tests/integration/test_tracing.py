"""Traces through Kafka: input traceparents -> a batch span linked to them -> predictions continuing the trace."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

import fastavro
import pytest
from confluent_kafka import Producer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamserve.demo.data import Entities, make_events
from streamserve.observe import tracing
from streamserve.pipeline.decode import load_schema
from tests.integration.harness import Pipeline, WorkerThread, predictions

EVENTS = 60


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.provider_override = provider
    try:
        yield memory
    finally:
        tracing.provider_override = None
        provider.shutdown()


def _header(msg: object, name: str) -> bytes | None:
    return next((value for key, value in msg.headers() or () if key == name), None)  # type: ignore[attr-defined]


def test_batch_span_links_inputs_and_predictions_continue_the_trace(
    pipeline: Pipeline, entities: Entities, exporter: InMemorySpanExporter
) -> None:
    s = pipeline.settings
    events = list(make_events(entities, EVENTS, seed=77))
    input_trace = {}  # event id -> trace id of the producer's span
    schema = load_schema(s.input.schema_path)
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    for event in events:
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        input_trace[event["event_id"]] = int(trace_id, 16)
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, event)
        producer.produce(
            s.input.topic,
            buffer.getvalue(),
            str(event["card_id"]).encode(),
            headers=[("traceparent", f"00-{trace_id}-{span_id}-01".encode())],
        )
    assert producer.flush(30) == 0

    worker = WorkerThread(s)
    try:
        outputs = predictions(pipeline, EVENTS)
    finally:
        worker.stop()

    spans = exporter.get_finished_spans()
    batches = {span.context.span_id: span for span in spans if span.name == "streamserve.batch"}
    assert batches, f"no batch span among {[span.name for span in spans]}"
    linked = {link.context.trace_id for span in batches.values() for link in span.links}
    assert linked >= set(input_trace.values()), "every input's trace context is linked from a batch span"

    for msg, prediction in outputs:
        header = _header(msg, "traceparent")
        assert header is not None, "a prediction without traceparent"
        version, trace_id, span_id, flags = header.decode().split("-")
        assert version == "00"
        assert flags == "01"
        batch = batches.get(int(span_id, 16))
        assert batch is not None, f"traceparent {header!r} names no batch span"
        assert batch.context.trace_id == int(trace_id, 16)
        assert input_trace[prediction["event_id"]] in {link.context.trace_id for link in batch.links}

    children = [span for span in spans if span.parent is not None and span.parent.span_id in batches]
    assert {"decode", "enrich", "infer", "encode", "produce"} <= {c.name for c in children}
    for child in children:
        parent = batches[child.parent.span_id]  # type: ignore[union-attr]
        assert parent.start_time <= child.start_time <= child.end_time <= parent.end_time
