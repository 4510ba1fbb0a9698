"""The join table's changelog, written in record batches: one per changelog partition per step of the join.

faust's ``Table.send_changelog`` costs a send future, a trip through the producer's buffer and a callback per
record: about as much as the join's own work on a record. The join writes every changelog record (entries,
markers, deletions) through this writer instead. A record is serialized as faust serializes it (the table's key
and value serializers), so faust's recovery reads it back like its own; records keep their order per partition
(the order the join's invariants rest on: a marker before the deletions it covers); at the end of each step they
go to the faust app's producer as record batches. faust flushes that producer before it commits any input
offset, so, as with ``send_changelog``, a committed offset's effects are in the changelog.

The delivery callback ``send_changelog`` adds only records the offset for a RocksDB store; the monitor's store is
``memory://``, recovered from the changelog's beginning.
"""

from __future__ import annotations

import asyncio
from typing import Any

EXPIRY = [("streamserve.expiry", b"1")]
"""Headers of a record that only marks an entry expired: the reporter skips it (reporter.py: it knows the expiry
from the partition's sweep marker, written before), faust's recovery reads it as any other."""


class Changelog:
    """Changelog records of one table, held per partition until ``send``."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.pending: dict[int, list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]] = {}
        self.sending = asyncio.Lock()
        """One send at a time (the join's and the timer's): records put during a send go out after it, in order."""

    def put(self, partition: int, key: str, value: Any, headers: list[tuple[str, bytes]] | None = None) -> None:
        """A record setting ``key`` to ``value`` (None: a tombstone deleting it)."""
        topic = self.table.changelog_topic
        key_bytes, _ = topic.prepare_key(key, self.table.key_serializer)
        value_bytes = None if value is None else topic.prepare_value(value, self.table.value_serializer)[0]
        self.pending.setdefault(partition, []).append((key_bytes, value_bytes, headers or []))

    async def send(self) -> None:
        """Hand the held records to the producer, a record batch per partition (more when one fills)."""
        async with self.sending:
            await self._send()

    async def _send(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        producer = self.table.app.producer._ensure_producer()  # aiokafka's AIOKafkaProducer of the faust app
        name = self.table.changelog_topic.get_topic_name()
        for partition, records in pending.items():
            batch = producer.create_batch()
            for key, value, headers in records:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:  # full: send it
                    await producer.send_batch(batch, name, partition=partition)
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            await producer.send_batch(batch, name, partition=partition)
