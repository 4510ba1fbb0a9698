"""The faust-streaming application of ``streamserve monitor``.

Three agents and a timer::

    predictions, shadow predictions --forward_predictions--\\
                                                            >-- <app id>-by-event (keyed by event id) --join--> table
    labels --forward_labels (bad ones: dead-letter topic)--/                                      |
                                                                                    report (timer) v
                                                                   quality topic (Avro), Prometheus gauges

The forwarders decode each record and put a small JSON record on the by-event topic, keyed by event id, so both
sides of an event meet in one partition of the join agent, which owns that partition of the ``pairs`` table (its
changelog is the monitor's state: a restarted monitor, SIGKILLed or not, reads it back before it goes on).
``pairs.py`` holds the join itself and why it never counts a pair twice. The timer reports every window that
changed: it needs every partition of the by-event topic, so one monitor process serves a pipeline (a second
one stands by: it takes over the partitions when the first leaves the group, and reports nothing meanwhile).
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import fastavro
import faust

from streamserve.config import PipelineSettings
from streamserve.errors import ConfigError
from streamserve.monitor import labels, pairs
from streamserve.monitor.exporter import QualityExporter
from streamserve.monitor.labels import BadLabel
from streamserve.monitor.pairs import Effect, Index, Timing
from streamserve.monitor.report import ReportSettings, encode, report_key, window_reports
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import load_schema
from streamserve.records import Rejected, Source

log = logging.getLogger(__name__)

LABEL_REASONS = set(labels.REASONS)
BATCH = 500
"""Records an agent takes from its stream at once (faust's per-record overhead is per stream step)."""
BATCH_WAIT_S = 0.05


def broker_urls(settings: PipelineSettings) -> list[str]:
    """faust's broker list; the monitor speaks plaintext Kafka (aiokafka) only."""
    protocol = str(settings.kafka.client.get("security.protocol", "plaintext")).lower()
    if protocol != "plaintext":
        raise ConfigError(
            f"streamserve monitor connects to plaintext brokers only; kafka.client sets security.protocol={protocol}"
        )
    return [f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",") if server.strip()]


def _batches(stream: faust.StreamT[Any]) -> AsyncIterator[Sequence[Any]]:
    """The stream's events in batches (faust's take_events; every event is acknowledged as usual)."""
    return cast(faust.Stream[Any], stream).take_events(BATCH, within=BATCH_WAIT_S)


def _millis(value: Any) -> int | None:
    return None if value is None else labels.millis(value)


class Monitor:
    """The faust app, its topics and table, and the join's in-memory index."""

    def __init__(self, settings: PipelineSettings, exporter: QualityExporter | None = None) -> None:
        monitor = settings.monitor
        self.settings = settings
        self.timing = Timing(int(monitor.window_s * 1000), int(monitor.label_ttl_s * 1000), int(monitor.sweep_s * 1000))
        self.report_settings = ReportSettings(
            task=settings.monitor_task,
            positive_class=settings.positive_class,
            min_labels=monitor.min_labels,
            confidence=monitor.confidence,
            bootstrap_samples=monitor.bootstrap_samples,
            compare_metric=monitor.compare_metric,
        )
        self.exporter = exporter or QualityExporter()
        self.exporter.thresholds(settings.model.name, monitor.floors, monitor.ceilings)
        self.prediction_schema = load_schema(settings.output.schema_path)
        self.index = Index(self.timing)
        self.stale = True
        self.ready = False
        self.own_data_dir = monitor.data_dir is None
        self.data_dir = (
            Path(monitor.data_dir).expanduser() if monitor.data_dir else Path(tempfile.mkdtemp(prefix="monitor-"))
        )
        data_dir = self.data_dir
        self.app = faust.App(
            settings.monitor_app_id,
            broker=broker_urls(settings),
            datadir=str(data_dir),
            store="memory://",
            topic_partitions=monitor.partitions,
            topic_replication_factor=1,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            broker_commit_interval=1.0,
            table_cleanup_interval=3600.0,
            producer_acks=-1,
        )
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.predictions = self.app.topic(settings.output.topic, settings.shadow_topic, **raw)
        self.labels = self.app.topic(settings.labels_topic, **raw)
        self.dead_letters = self.app.topic(settings.labels_dead_letter_topic, **raw)
        self.quality = self.app.topic(monitor.quality_topic, **raw)
        self.by_event = self.app.topic(
            f"{settings.monitor_app_id}-by-event",
            internal=True,
            partitions=monitor.partitions,
            key_type=str,
            key_serializer="raw",
            value_serializer="json",
        )
        self.table = self.app.Table("pairs", default=None, partitions=monitor.partitions, key_type=str)
        self.app.agent(self.predictions, name="forward_predictions")(self.forward_predictions)
        self.app.agent(self.labels, name="forward_labels")(self.forward_labels)
        self.app.agent(self.by_event, name="join")(self.join)
        self.app.timer(monitor.report_every_s)(self.report)
        self.app.on_partitions_revoked.connect(self._on_rebalance)
        self.app.on_partitions_assigned.connect(self._on_rebalance)

    async def _on_rebalance(self, *args: Any, **kwargs: Any) -> None:
        self.stale = True

    # -- forwarding: decode, check, key by event id

    def _decode_prediction(self, value: bytes | None) -> dict[str, Any]:
        if not value:
            raise ValueError("empty prediction record")
        data = value[5:] if self.settings.output.wire_format else value
        record = fastavro.schemaless_reader(io.BytesIO(data), self.prediction_schema, None)
        if not isinstance(record, dict):
            raise ValueError("not a prediction record")
        return record

    async def forward_predictions(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            for event in batch:
                await self._safely("prediction", self._forward_prediction(event))

    async def _safely(self, what: str, step: Awaitable[None]) -> None:
        """One record's step; a failure is logged and counted, never the end of the agent (faust would restart
        it and meet the same record again)."""
        try:
            await step
        except Exception:
            log.exception("monitor %s step failed; the record is skipped", what)
            self.exporter.failures.labels(what).inc()

    async def _forward_prediction(self, event: Any) -> None:
        message = event.message
        try:
            record = self._decode_prediction(event.value)
        except Exception as exc:  # noqa: BLE001 - a record we cannot read is counted, never fatal
            log.warning("undecodable prediction at %s/%d/%d: %s", message.topic, message.partition, message.offset, exc)
            self.exporter.predictions.labels("undecodable").inc()
            return
        event_id = record.get("event_id")
        if not event_id:
            self.exporter.predictions.labels("no_event_id").inc()
            return
        role = "shadow" if message.topic == self.settings.shadow_topic else "main"
        time_ms = _millis(record.get("event_time")) or _millis(record["prediction_time"]) or 0
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        await self.by_event.send(key=event_id, value=pairs.prediction_message(origin, role, record, time_ms))
        self.exporter.predictions.labels("forwarded").inc()

    async def forward_labels(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            for event in batch:
                await self._safely("label", self._forward_label(event))

    async def _forward_label(self, event: Any) -> None:
        message = event.message
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        try:
            label = labels.parse(event.value, self.settings.monitor_task)
        except BadLabel as exc:
            await self._dead_letter(exc.reason, str(exc), event.value, origin, key=event.key)
            return
        value = pairs.label_message(origin, label.value, label.time_ms, event.value)
        await self.by_event.send(key=label.event_id, value=value)
        self.exporter.labels.labels("forwarded").inc()

    async def _dead_letter(
        self, reason: str, message: str, value: bytes | None, origin: str | None, key: bytes | None = None
    ) -> None:
        """Count a label the monitor cannot use and send it, with the reason in headers, to the dead-letter topic."""
        self.exporter.labels.labels(reason).inc()
        topic, partition, offset = (origin or "?/-1/-1").rsplit("/", 2)
        source = Source(topic, int(partition), int(offset), key, value, None, int(time.time() * 1000))
        dl_key, dl_value, headers = dead_letter(Rejected(source, f"monitor.{reason}", "BadLabel", message))
        sendable = [(name, value if isinstance(value, bytes) else str(value or "").encode()) for name, value in headers]
        await self.dead_letters.send(key=dl_key, value=dl_value, headers=sendable)

    # -- the join

    def _rebuild(self) -> None:
        self.index.rebuild(self.table.items())
        self.stale = False
        self.ready = True
        log.info(
            "join state: %d entries in %d windows, %d final",
            len(self.index.partitions),
            len(self.index.windows),
            len(self.index.finals),
        )

    def _put(self, partition: int, key: str, value: Any) -> None:
        """Set a key of the table and its changelog partition (also from the timer, outside any stream event)."""
        self.table.data[key] = value
        self.table.send_changelog(partition, key, value)

    def _delete(self, partition: int, key: str) -> None:
        if key in self.table.data:
            del self.table.data[key]
        self.table.send_changelog(partition, key, None, value_serializer="raw")

    async def join(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            for event in batch:
                await self._safely("join", self._join_one(event))

    async def _join_one(self, event: Any) -> None:
        if self.stale:
            self._rebuild()
        message = event.message
        partition, offset = message.partition, message.offset
        key_text = event.key.decode() if isinstance(event.key, bytes) else str(event.key)
        key = pairs.entry_key(key_text)
        record = event.value
        entry = self.table.get(key)
        if entry is None and offset <= self.index.through.get(partition, -1):
            return  # replayed after its entry was swept or purged
        new, effects = pairs.apply(
            entry,
            record,
            partition,
            offset,
            self.index.swept.get(partition, 0),
            self.timing,
            set(self.index.finals),
        )
        if new is not None:
            self._put(partition, key, new)
            self.index.add(key, new)
        self.index.tick(partition, offset, record)
        effects += self._advance(partition)
        await self._carry_out(effects, record)

    def _advance(self, partition: int) -> list[Effect]:
        """Sweep the partition if its clocks moved past a step, purge its final windows; no await inside."""
        effects: list[Effect] = []
        boundary = self.index.boundary(partition, self.settings.monitor.idle_s)
        if boundary > self.index.swept.get(partition, 0):
            effects += self._sweep(partition, boundary)
        for window in self.index.purgeable(partition):
            self._purge(window, partition)
        return effects

    def _sweep(self, partition: int, boundary: int) -> list[Effect]:
        """Expire the partition's entries past the TTL (the marker first, in the same changelog partition)."""
        self.index.swept[partition] = boundary
        self.index.through[partition] = self.index.offsets.get(partition, -1)
        self._put(partition, pairs.sweep_key(partition), self.index.sweep_marker(partition))
        effects: list[Effect] = []
        for key in self.index.due(partition, boundary):
            entry = self.table.get(key)
            if entry is None or entry.get("x"):
                continue
            if pairs.expiry(entry, self.timing.ttl_ms) >= boundary:
                self.index.add(key, entry)
                continue
            new, expired = pairs.expire(entry)
            if new is None:
                self._delete(partition, key)
                self.index.discard(key, entry)
            else:
                self._put(partition, key, new)
                self.index.add(key, new)
            effects += expired
        return effects

    def _purge(self, window: int, partition: int) -> None:
        """Drop a final window's entries of this partition, after a marker holding its reports."""
        keys = self.index.keys_of(window, partition)
        if keys:
            self._put(partition, pairs.final_key(window, partition), self.index.finals[window])
            self.index.through[partition] = self.index.offsets.get(partition, -1)
            self._put(partition, pairs.sweep_key(partition), self.index.sweep_marker(partition))
            for key in keys:
                entry = self.table.get(key)
                self._delete(partition, key)
                if entry is not None:
                    self.index.discard(key, entry)
        self.index.purged.setdefault(window, set()).add(partition)

    async def _carry_out(self, effects: Iterable[Effect], record: dict[str, Any]) -> None:
        for effect in effects:
            if effect.kind in LABEL_REASONS:
                await self._dead_letter(effect.kind, effect.message, effect.raw, effect.origin)
            elif effect.kind == "late_prediction":
                self.exporter.predictions.labels("late").inc()
            elif effect.slot is not None:
                role, model, version = effect.slot.split("|", 2)
                self.exporter.joined.labels(model, version, role, effect.kind).inc()
                if effect.kind == "joined" and effect.lag_ms is not None:
                    self.exporter.lag.labels(model).observe(max(effect.lag_ms, 0) / 1000)

    # -- reports

    def _owns_every_partition(self) -> bool:
        assigned = self.app.consumer.assignment()
        mine = {tp.partition for tp in assigned if tp.topic == self.by_event.get_topic_name()}
        return len(mine) == self.settings.monitor.partitions

    async def report(self) -> None:
        """Report every window that changed since the last report (a final one once); never crash the app."""
        try:
            await self._report()
        except Exception:  # a report that fails is retried at the next tick: the windows stay dirty
            log.exception("quality report failed")

    async def _report(self) -> None:
        if self.stale and self.ready and not self.app.rebalancing:
            self._rebuild()
        if not self.ready or self.stale or not self._owns_every_partition():
            return
        effects: list[Effect] = []
        for partition in sorted(self.index.clocks):
            effects += self._advance(partition)  # partitions whose sources went quiet
        await self._carry_out(effects, {})
        todo = sorted(self.index.dirty)
        now = int(time.time() * 1000)
        for window in todo:
            self.index.dirty.discard(window)
            if window in self.index.finals:
                continue
            entries = [(key, self.table[key]) for key in list(self.index.windows.get(window, ())) if key in self.table]
            if not entries:
                continue
            final = all(entry.get("x") for _, entry in entries)
            reports = window_reports(window, self.timing.window_ms, entries, self.report_settings, final, now)
            for report in reports:
                await self.quality.send(key=report_key(report).encode(), value=encode(report))
                self.exporter.update(report)
            if final:
                self.index.finals[window] = reports
                log.info("window %d final: %d model report(s)", window, len(reports))
            await asyncio.sleep(0)


def run(settings: PipelineSettings, loglevel: str = "INFO") -> int:
    """Run the monitor until SIGTERM/SIGINT (faust's worker drains and commits on either)."""
    monitor = Monitor(settings)
    server = None
    if settings.monitor.port is not None:
        from streamserve.observe.metrics import HealthState, ObserveServer

        health = HealthState(settings.observe.liveness_timeout_s, lambda: monitor.ready and not monitor.stale)
        health.beat()

        async def beat() -> None:
            health.beat()

        monitor.app.timer(5.0)(beat)
        server = ObserveServer(settings.monitor.host, settings.monitor.port, health)
        server.start()
    worker = faust.Worker(
        monitor.app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=False, daemon=True
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        if server is not None:
            server.stop()
        if monitor.own_data_dir:
            shutil.rmtree(monitor.data_dir, ignore_errors=True)
    return 0
