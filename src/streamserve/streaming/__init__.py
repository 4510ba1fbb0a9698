"""Streaming features: a faust-streaming app keeping windowed aggregates per entity in Redis.

- ``windows``: event-time windows and the aggregates folded over them (pure, exact in any arrival order).
- ``extract``: decoded events to each entity's contribution, or the reasons an event cannot feed an aggregate.
- ``store``: the Redis write, in the worker's layout, that never replaces a newer entry with an older one.
- ``app``: the faust app (table with a changelog, one agent, dead letters) behind ``streamserve features stream``.
"""
