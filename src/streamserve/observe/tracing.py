"""OpenTelemetry traces through Kafka: one span per micro-batch, linked to its inputs, continued by its outputs.

Input records may carry a W3C ``traceparent`` header; the batch span links to each of them (a batch has many
parents, so links rather than a parent). The stages run inside the batch become child spans (decode, enrich,
redis, infer, encode, produce) with their measured times. Every output record gets a ``traceparent`` naming
the batch span, so a downstream consumer continues the trace from there.

Spans follow OpenTelemetry's messaging conventions: the batch span is ``process`` (CONSUMER) with the input
topic, consumer group and, for a single-partition batch, its partition (and offset for a single record); its
parent ``receive`` (CLIENT, operation ``poll``) spans the polls that gathered the batch, from the first poll for
it to the batch being complete; the produce stage span is ``send`` (PRODUCER) to the output topic.
Sampling honours the producers' decision: a batch with a sampled input is sampled, a batch whose traced inputs
were all dropped is dropped, and only untraced batches are sampled at ``trace_sample_ratio`` (parent-based,
like a span with a remote parent).

Off by default (``observe.trace_sample_ratio: 0``): then no tracer exists and nothing is parsed or created.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamserve.observe.context import BatchContext
from streamserve.records import Source

TRACEPARENT = "traceparent"
MAX_LINKS = 128
"""OpenTelemetry's default span link limit; inputs beyond it are counted in an attribute, not linked."""
STAGE_ORDER = ("decode", "enrich", "redis", "infer", "encode", "produce")

provider_override: TracerProvider | None = None
"""A provider to use instead of building one from the settings (tests: the SDK's in-memory exporter)."""

_propagator = TraceContextTextMapPropagator()


# What the tracer reads of the settings and of a batch's stage clock, as protocols: observe/ sits below config.py
# and is imported by telemetry.py, so naming ObserveSettings or StageClock here would make an import cycle.
class TracingSettings(Protocol):
    """The tracing knobs of config.ObserveSettings."""

    @property
    def trace_sample_ratio(self) -> float: ...

    @property
    def otlp_endpoint(self) -> str | None: ...


class StageTimes(Protocol):
    """Start and end (perf_counter ns) of each measured stage of one batch, as telemetry.StageClock keeps them."""

    @property
    def stages(self) -> Mapping[str, Sequence[int]]: ...


def input_context(headers: Sequence[tuple[str, Any]] | None) -> SpanContext | None:
    """The span context of an input record's ``traceparent`` header, if it has a valid one."""
    if not headers:
        return None
    for name, value in headers:
        if name == TRACEPARENT and value is not None:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            span_context = trace.get_current_span(_propagator.extract({TRACEPARENT: text})).get_span_context()
            return span_context if span_context.is_valid else None
    return None


class LinkedInputsSampler(Sampler):
    """A batch's producers decide: sampled when an input's trace is sampled, dropped when every traced input was
    dropped; the ratio decides only for a batch without traced inputs (a batch has links, not a parent)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = TraceIdRatioBased(ratio)

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Link] | None = None,
                      trace_state: Any = None) -> SamplingResult:  # fmt: skip
        """The producers' decision when the batch links to traced inputs, else the ratio's."""
        if links:
            sampled = any(link.context.trace_flags.sampled for link in links)
            decision = Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP
            return SamplingResult(decision, attributes if sampled else None, trace_state)
        return self.ratio.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        """Named in the SDK's debug output."""
        return f"LinkedInputsSampler{{{self.ratio.get_description()}}}"


def sampler(ratio: float) -> Sampler:
    """Parent-based: a span with a parent follows it; a batch span follows its linked inputs, else the ratio."""
    return ParentBased(root=LinkedInputsSampler(ratio), remote_parent_not_sampled=StaticSampler(Decision.DROP))


class ProduceTracer:
    """The producer side (``streamserve produce``): one PRODUCER ``send`` span per record, whose W3C traceparent
    (sampled or not, as the ratio decided) goes in the record's headers for the workers to honour."""

    def __init__(self, provider: TracerProvider, topic: str, owned: bool = True) -> None:
        self.provider, self.topic, self.owned = provider, topic, owned
        self.tracer = provider.get_tracer("streamserve.produce")

    @classmethod
    def from_settings(cls, settings: TracingSettings, topic: str) -> ProduceTracer | None:
        """A tracer exporting over OTLP/HTTP like the workers', or None when tracing is off."""
        if provider_override is not None:
            return cls(provider_override, topic, owned=False)
        if settings.trace_sample_ratio <= 0:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": "streamserve-produce"}),
            sampler=sampler(settings.trace_sample_ratio),
        )
        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces" if settings.otlp_endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider, topic)

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        """The headers of one record: the traceparent of its (ended) send span."""
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": self.topic,
        }
        span = self.tracer.start_span(f"send {self.topic}", kind=trace.SpanKind.PRODUCER, attributes=attributes)
        span.end()
        return [(TRACEPARENT, BatchTracer.traceparent(span))]

    def shutdown(self) -> None:
        """Export what is buffered and stop (only a provider this tracer built)."""
        if self.owned:
            self.provider.shutdown()


class BatchTracer:
    """Creates the batch spans of one worker."""

    def __init__(self, provider: TracerProvider, owned: bool = True, group: str = "", output_topic: str = "") -> None:
        self.provider = provider
        self.owned = owned
        self.group, self.output_topic = group, output_topic
        self.tracer = provider.get_tracer("streamserve")

    @classmethod
    def from_settings(
        cls, settings: TracingSettings, worker_id: str, group: str = "", output_topic: str = ""
    ) -> BatchTracer | None:
        """A tracer exporting over OTLP/HTTP, or None when tracing is off."""
        if provider_override is not None:
            return cls(provider_override, owned=False, group=group, output_topic=output_topic)
        if settings.trace_sample_ratio <= 0:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": "streamserve", "service.instance.id": worker_id}),
            sampler=sampler(settings.trace_sample_ratio),
        )
        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces" if settings.otlp_endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider, group=group, output_topic=output_topic)

    @contextmanager
    def batch_span(
        self, sources: Sequence[Source], batch: BatchContext, received: tuple[int, int] | None = None
    ) -> Iterator[Span]:
        """The span of one micro-batch, current for the block, linked to its inputs' trace contexts; with
        `received` (start and end, ns since the epoch), the child of a receive span."""
        links: list[Link] = []
        traced = 0
        for source in sources:
            span_context = input_context(source.headers)
            if span_context is not None:
                traced += 1
                if len(links) < MAX_LINKS:
                    links.append(Link(span_context))
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": batch.topic,
            "messaging.consumer.group.name": self.group,
            "messaging.batch.message_count": len(sources),
            "streamserve.batch.id": batch.batch_id,
            "streamserve.model.version": batch.model_version,
            "streamserve.batch.traced_inputs": traced,
        }
        if len(batch.partitions) == 1:  # the conventions name one partition (and one offset): a batch may span more
            attributes["messaging.destination.partition.id"] = str(batch.partitions[0])
        if len(sources) == 1:
            attributes["messaging.kafka.offset"] = sources[0].offset
        # The receive span, when the polls are known, is the root: it carries the links (so the producers' sampling
        # decides there) and the process span is its child, as the messaging conventions nest a batch's spans.
        parent = (
            None if received is None else trace.set_span_in_context(self._receive_span(attributes, links, received))
        )
        with self.tracer.start_as_current_span(
            "streamserve.batch", context=parent, kind=trace.SpanKind.CONSUMER, links=links, attributes=attributes
        ) as span:
            yield span

    def _receive_span(self, batch: Mapping[str, str | int], links: list[Link], received: tuple[int, int]) -> Span:
        """The polls that gathered the batch: an ended ``receive`` span with the batch's destination attributes."""
        kept = ("messaging.destination.name", "messaging.consumer.group.name", "messaging.batch.message_count",
                "messaging.destination.partition.id")  # fmt: skip
        attributes = {key: batch[key] for key in kept if key in batch}
        attributes |= {"messaging.system": "kafka", "messaging.operation.type": "receive",
                       "messaging.operation.name": "poll"}  # fmt: skip
        span = self.tracer.start_span(
            "receive", kind=trace.SpanKind.CLIENT, links=links, attributes=attributes, start_time=received[0]
        )
        span.end(end_time=received[1])
        return span

    def stage_spans(self, parent: Span, clock: StageTimes, offset_ns: int) -> None:
        """Children of the batch span for the measured stages (perf_counter times shifted to wall clock)."""
        if not parent.is_recording():
            return
        parent_context = trace.set_span_in_context(parent)
        for stage in sorted(clock.stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
            start, end = clock.stages[stage]
            kind, attributes = trace.SpanKind.INTERNAL, None
            if stage == "produce":
                kind, attributes = trace.SpanKind.PRODUCER, self._send_attributes()
            child = self.tracer.start_span(
                stage, context=parent_context, kind=kind, attributes=attributes, start_time=start + offset_ns
            )
            child.end(end_time=end + offset_ns)

    def _send_attributes(self) -> dict[str, str]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": self.output_topic,
        }

    @staticmethod
    def traceparent(span: Span) -> bytes:
        """The W3C traceparent naming ``span``, for output record headers."""
        span_context = span.get_span_context()
        flags = TraceFlags.SAMPLED if span_context.trace_flags.sampled else TraceFlags.DEFAULT
        return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags:02x}".encode()

    def shutdown(self) -> None:
        """Export what is buffered and stop (only a provider this tracer built)."""
        if self.owned:
            self.provider.shutdown()
