"""The faust-streaming application of ``streamserve monitor``.

Three agents and a timer::

    predictions, shadow predictions --forward_predictions--\\
                                                            >-- <app id>-by-event (keyed by event id) --join--> table
    labels --forward_labels (bad ones: dead-letter topic)--/                                      |
                                                                                         changelog v
                                                   report (timer, the owner of by-event partition 0; reporter.py)
                                                                   quality topic (Avro), Prometheus gauges

The forwarders decode each batch they take (one fastavro read) and put its records on the by-event topic in
bundles, one message per by-event partition (``bundles.py``: faust's cost is per message), each record going to
the partition of its event id, so both sides of an event meet in one partition of the join agent, which owns that
partition of the ``pairs`` table (its changelog is the monitor's state: a restarted monitor, SIGKILLed or not,
reads it back before it goes on; an entry changed several times in a bundle is written to it once).
``pairs.py`` holds the join itself and why it never counts a pair twice.

Scale-out: the processes of a group split the input partitions and the ``monitor.partitions`` partitions of the
join. The timer of every process sweeps its quiet partitions; the one owning by-event partition 0 also reports:
``reporter.py`` reads every partition's changelog into a view of the whole table and makes the reports from it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import faust

from streamserve.clients import faust_brokers
from streamserve.config import PipelineSettings
from streamserve.monitor import bundles, labels, pairs, reporter
from streamserve.monitor.bundles import Bundles
from streamserve.monitor.changelog import EXPIRY, Changelog
from streamserve.monitor.exporter import QualityExporter
from streamserve.monitor.labels import BadLabel
from streamserve.monitor.pairs import Effect, Index, Timing
from streamserve.monitor.report import ReportSettings, encode, report_key, window_reports
from streamserve.monitor.reporter import Due, Reporting
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.records import Rejected, Source

log = logging.getLogger(__name__)

LABEL_REASONS = set(labels.REASONS)
BATCH = 500
"""Records an agent takes from its stream at once (faust's per-record overhead is per stream step)."""
BATCH_WAIT_S = 0.05
REPORT_REST = 4.0
"""After reports that took T seconds, none for REPORT_REST * T seconds: a big window's report (its time grows with
its entries) takes at most a fifth of the reporting process, the rest stays with its join and the reader."""


def broker_urls(settings: PipelineSettings) -> list[str]:
    """faust's broker list; the monitor speaks plaintext Kafka (aiokafka) only."""
    return faust_brokers(settings.kafka, "streamserve monitor")


def _batches(stream: faust.StreamT[Any]) -> AsyncIterator[Sequence[Any]]:
    """The stream's events in batches (faust's take_events; every event is acknowledged as usual)."""
    return cast(faust.Stream[Any], stream).take_events(BATCH, within=BATCH_WAIT_S)


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
        self.prediction_decoder = LocalSchemaDecoder(load_schema(settings.output.schema_path))
        self.step = asyncio.Lock()
        """One join step at a time, the join agent's or the timer's: changelog records, then their dead letters
        delivered, then the records sent (``_dead_letters``), with no other step's records in between."""
        self.changes: dict[str, tuple[int, Any]] = {}
        """Entries set in the current bundle whose changelog records are still to be sent (``_flush``)."""
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
            # No standby copy of the join table: it would cost every other monitor process a read of the whole
            # changelog; a process taking over a partition reads it then (the memory store is rebuilt anyway).
            table_standby_replicas=0,
            producer_acks=-1,
            producer_linger=0.005,  # changelog records and bundles go out in fewer, larger requests
            producer_max_batch_size=256 * 1024,
            stream_buffer_maxsize=20 * BATCH,  # records a stream prefetches per partition (faust: 4096)
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
            f"{settings.monitor_app_id}-by-event", internal=True, partitions=monitor.partitions, **raw
        )
        self.table = self.app.Table("pairs", default=None, partitions=monitor.partitions, key_type=str)
        self.changelog = Changelog(self.table)
        self.app.agent(self.predictions, name="forward_predictions")(self.forward_predictions)
        self.app.agent(self.labels, name="forward_labels")(self.forward_labels)
        self.app.agent(self.by_event, name="join")(self.join)
        self.app.timer(monitor.report_every_s)(self.report)
        self.app.on_partitions_revoked.connect(self._on_rebalance)
        self.app.on_partitions_assigned.connect(self._on_rebalance)
        self.reports_resume = 0.0
        self.reporting = Reporting(
            self.timing, monitor.partitions, self.table.changelog_topic.get_topic_name, settings.kafka.common()
        )

    async def _on_rebalance(self, *args: Any, **kwargs: Any) -> None:
        self.stale = True

    # -- forwarding: decode a batch, check, bundle by event id's partition

    def _unframed(self, value: bytes | None) -> bytes | None:
        return value[5:] if value and self.settings.output.wire_format else value

    async def forward_predictions(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            await self._safely("prediction", self._forward_predictions(batch))

    async def _safely(self, what: str, step: Awaitable[None]) -> None:
        """A batch's step; a failure is logged and counted, never the end of the agent (faust would restart
        it and meet the same records again)."""
        try:
            await step
        except Exception:
            log.exception("monitor %s step failed; the records are skipped", what)
            self.exporter.failures.labels(what).inc()

    async def _forward_predictions(self, batch: Sequence[Any]) -> None:
        decoded = self.prediction_decoder.decode_many([self._unframed(event.value) for event in batch])
        bundled = Bundles(self.settings.monitor.partitions)
        outcomes: Counter[str] = Counter()
        shadow_topic = self.settings.shadow_topic
        for event, record in zip(batch, decoded, strict=True):
            message = event.message
            if isinstance(record, Exception):
                log.warning(
                    "undecodable prediction at %s/%d/%d: %s", message.topic, message.partition, message.offset, record
                )
                outcomes["undecodable"] += 1
                continue
            event_id = record.get("event_id")
            if not event_id:
                outcomes["no_event_id"] += 1
                continue
            try:
                role = "shadow" if message.topic == shadow_topic else "main"
                time_ms = record.get("event_time") or record["prediction_time"] or 0
                origin = f"{message.topic}/{message.partition}/{message.offset}"
                forwarded = pairs.prediction_message(origin, role, record, int(time_ms))
                if not pairs.finite(forwarded):
                    log.warning("prediction at %s with a score or probability that is not a number: skipped", origin)
                    outcomes["not_a_number"] += 1
                    continue
                bundled.add(event_id, forwarded)
            except Exception:  # one record's fields, never the batch's end
                log.exception("prediction at %s/%d/%d skipped", message.topic, message.partition, message.offset)
                self.exporter.failures.labels("prediction").inc()
                continue
            outcomes["forwarded"] += 1
        await self._send(bundled)
        for outcome, count in outcomes.items():
            self.exporter.predictions.labels(outcome).inc(count)

    async def _send(self, bundled: Bundles) -> None:
        for partition, value in bundled.encoded():
            await self.by_event.send(value=value, partition=partition)

    async def forward_labels(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            await self._safely("label", self._forward_labels(batch))

    async def _forward_labels(self, batch: Sequence[Any]) -> None:
        values = [event.value for event in batch]
        bundled = Bundles(self.settings.monitor.partitions)
        for event, label in zip(batch, labels.parse_many(values, self.settings.monitor_task), strict=True):
            message = event.message
            origin = f"{message.topic}/{message.partition}/{message.offset}"
            if isinstance(label, BadLabel):
                await self._dead_letter(label.reason, str(label), event.value, origin, key=event.key)
                continue
            bundled.add(label.event_id, pairs.label_message(origin, label.value, label.time_ms, event.value))
        await self._send(bundled)
        self.exporter.labels.labels("forwarded").inc(bundled.count)

    async def _dead_letter(
        self, reason: str, message: str, value: bytes | None, origin: str | None, key: bytes | None = None
    ) -> Awaitable[Any]:
        """Count a label the monitor cannot use and send it, with the reason in headers, to the dead-letter topic;
        the send's delivery to await. Sent now (``force``), not when faust acknowledges the stream event."""
        self.exporter.labels.labels(reason).inc()
        topic, partition, offset = (origin or "?/-1/-1").rsplit("/", 2)
        source = Source(topic, int(partition), int(offset), key, value, None, int(time.time() * 1000))
        dl_key, dl_value, headers = dead_letter(Rejected(source, f"monitor.{reason}", "BadLabel", message))
        sendable = [(name, value if isinstance(value, bytes) else str(value or "").encode()) for name, value in headers]
        return await self.dead_letters.send(key=dl_key, value=dl_value, headers=sendable, force=True)

    # -- the join

    def _owned(self) -> set[int]:
        """The by-event partitions (and so the join table's) this process owns now."""
        name = self.by_event.get_topic_name()
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == name}

    def _sources(self) -> list[str]:
        """Every partition of the topics the monitor reads ("topic/partition"), as the consumer's metadata knows
        them: a rebuilt join's clocks wait for each (``Index.rebuild``), even one no record came from yet."""
        found = []
        settings = self.settings
        for topic in dict.fromkeys((settings.output.topic, settings.shadow_topic, settings.labels_topic)):
            count = self.app.consumer.topic_partitions(topic)
            found += [f"{topic}/{p}" for p in range(count)] if isinstance(count, int) else []
        return found

    def _rebuild(self) -> None:
        """The index of the partitions this process owns; entries of partitions it lost leave its memory (their
        new owner read them back from the changelog)."""
        owned = self._owned()
        mine = []
        for key, value in list(self.table.data.items()):
            if pairs.partition_of_key(key, value) in owned:
                mine.append((key, value))
            else:
                del self.table.data[key]
        self.index.rebuild(mine, owned, self._sources())
        self.stale = False
        self.ready = True
        log.info(
            "join state: %d entries in %d windows, %d final",
            len(self.index.partitions),
            len(self.index.windows),
            len(self.index.finals),
        )

    def _stage(self, partition: int, key: str, value: Any) -> None:
        """Set an entry now; its changelog record goes out at the end of the bundle (one per key, the last)."""
        self.table.data[key] = value
        self.changes[key] = (partition, value)

    def _flush(self) -> None:
        """The staged entries' changelog records, after those written before (``changelog.send`` sends them)."""
        for key, (partition, value) in self.changes.items():
            self.changelog.put(partition, key, value)
        self.changes.clear()

    def _put(self, partition: int, key: str, value: Any, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Set a key of the table and its changelog partition now (also from the timer, outside any stream event);
        the staged entries go first, so markers keep their place in the changelog's order."""
        self._flush()
        self.table.data[key] = value
        self.changelog.put(partition, key, value, headers)

    def _delete(self, partition: int, key: str) -> None:
        self._flush()
        if key in self.table.data:
            del self.table.data[key]
        self.changelog.put(partition, key, None)

    async def join(self, stream: faust.StreamT[Any]) -> None:
        async for batch in _batches(stream):
            for event in batch:
                await self._safely("join", self._join_bundle(event))

    async def _join_bundle(self, event: Any) -> None:
        if self.stale:
            self._rebuild()
        message = event.message
        partition, offset = message.partition, message.offset
        try:
            records = bundles.decode(event.value)
        except ValueError as exc:
            log.warning("by-event message %d/%d skipped: %s", partition, offset, exc)
            self.exporter.failures.labels("join").inc()
            return
        async with self.step:
            swept, finals = self.index.swept.get(partition, 0), self.index.final_in(partition)
            effects: list[Effect] = []
            try:
                for index, record in enumerate(records):
                    try:
                        effects += self._join_one(partition, bundles.position(offset, index), record, swept, finals)
                    except Exception:  # one record's fault, never its bundle's end
                        log.exception("by-event record %d/%d#%d skipped", partition, offset, index)
                        self.exporter.failures.labels("join").inc()
                effects += self._advance(partition)
            finally:
                try:
                    await self._dead_letters(effects)
                finally:
                    self._flush()
                    await self.changelog.send()
        self._count(effects)

    def _join_one(
        self, partition: int, position: int, record: dict[str, Any], swept: int, finals: set[int]
    ) -> list[Effect]:
        key = pairs.entry_key(record["id"])
        entry = self.table.data.get(key)
        if entry is None and position <= self.index.through.get(partition, -1):
            return []  # replayed after its entry was swept or purged
        new, effects = pairs.apply(entry, record, partition, position, swept, self.timing, finals)
        if new is not None:
            self._stage(partition, key, new)
            self.index.add(key, new)
        self.index.tick(partition, position, record)
        return effects

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
                self._put(partition, key, new, EXPIRY)
                self.index.add(key, new)
            effects += expired
        return effects

    def _purge(self, window: int, partition: int) -> None:
        """Drop a final window's entries of this partition, after a marker with their count (the reporter keeps
        them until it reported the window: reporter.py)."""
        keys = self.index.keys_of(window, partition)
        if keys:
            self._put(partition, pairs.final_key(window, partition), {"entries": len(keys)})
            self.index.through[partition] = self.index.offsets.get(partition, -1)
            self._put(partition, pairs.sweep_key(partition), self.index.sweep_marker(partition))
            for key in keys:
                entry = self.table.get(key)
                self._delete(partition, key)
                if entry is not None:
                    self.index.discard(key, entry)
        self.index.purged.setdefault(window, set()).add(partition)

    async def _dead_letters(self, effects: Iterable[Effect]) -> None:
        """Send the effects' dead letters and wait until Kafka has them: before the changelog records the entries'
        new state (after it, a replayed record is not applied again, so a dead letter lost in a crash between the
        two would be lost for good; this way a crash at worst sends one twice)."""
        sent = [
            await self._dead_letter(effect.kind, effect.message, effect.raw, effect.origin)
            for effect in effects
            if effect.kind in LABEL_REASONS
        ]
        for delivery in sent:
            await delivery

    def _count(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if effect.kind == "late_prediction":
                self.exporter.predictions.labels("late").inc()
            elif effect.slot is not None:
                role, model, version = effect.slot.split("|", 2)
                self.exporter.joined.labels(model, version, role, effect.kind).inc()
                if effect.kind == "joined" and effect.lag_ms is not None:
                    self.exporter.lag.labels(model).observe(max(effect.lag_ms, 0) / 1000)

    # -- reports

    async def report(self) -> None:
        """Advance quiet partitions, then (the process owning by-event partition 0) report every window that
        changed since the last report; never crash the app."""
        try:
            await self._report()
        except Exception:  # a report that fails is retried at the next tick: the windows stay dirty
            log.exception("quality report failed")

    async def _report(self) -> None:
        if self.app.rebalancing:
            return
        owned = self._owned()
        if not owned:
            self.ready, self.stale = True, False  # a process of a scaled-out monitor that only forwards
            self._stop_reporting()
            return
        if self.stale and self.ready and not self.app.in_recovery:
            self._rebuild()
        if self.ready and not self.stale:
            async with self.step:
                effects: list[Effect] = []
                try:
                    for partition in sorted(self.index.clocks):
                        effects += self._advance(partition)  # partitions whose sources went quiet
                finally:
                    try:
                        await self._dead_letters(effects)
                    finally:
                        await self.changelog.send()
            self._count(effects)
        if 0 not in owned:
            self._stop_reporting()
            return
        view = self.reporting.reader()
        if time.monotonic() < self.reports_resume:
            return  # resting after a long report; the changed windows stay dirty
        due = await asyncio.get_running_loop().run_in_executor(None, view.locked_due)  # decoding: off the loop
        if due:
            began = time.monotonic()
            await self._send_reports(due)
            self.reports_resume = time.monotonic() + REPORT_REST * (time.monotonic() - began)

    def _stop_reporting(self) -> None:
        if self.reporting.view is not None:
            self.reporting.stop()
            self.exporter.forget()

    async def _send_reports(self, due: list[Due]) -> None:
        """The reports of the due windows, made in a thread (a big window's must not hold up the joins)."""
        loop = asyncio.get_running_loop()
        now = int(time.time() * 1000)
        window_ms, settings = self.timing.window_ms, self.report_settings
        for item in due:
            reports = await loop.run_in_executor(
                None, window_reports, item.window, window_ms, item.entries, settings, item.final, now
            )
            for report in reports:
                await self.quality.send(key=report_key(report).encode(), value=encode(report))
                self.exporter.update(report)
            if item.final:
                log.info("window %d final: %d model report(s)", item.window, len(reports))


def run(settings: PipelineSettings, loglevel: str = "INFO") -> int:
    """Run the monitor until SIGTERM/SIGINT (faust's worker drains and commits on either)."""
    reporter.collect_less()
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
