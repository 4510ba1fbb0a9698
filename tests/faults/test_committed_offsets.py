"""At-least-once: committed offsets catch up with the input's end, whatever rebalances happened (issue 10.5).

Records processed around a rebalance used to stay uncommitted forever when their asynchronous commit
failed (REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION): a drained group left them to be predicted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from streamserve.demo.data import Entities, make_events
from tests.faults.test_faults import _output_ids
from tests.integration.harness import Pipeline, WorkerProcess, produce_in_background, wait_until
from tests.integration.test_offsets import end_offsets, records_behind, wait_caught_up

EVENTS = 20_000
RATE = 2_500  # events/s: the stream spans the kill and the rebalances it causes
PARTITIONS = 8


def test_idle_group_commits_up_to_the_end_after_kill_9_and_leaves_nothing_to_redo(
    pipeline_factory: Callable[..., Pipeline], entities: Entities, tmp_path: Path
) -> None:
    pipeline = pipeline_factory(
        partitions=PARTITIONS,
        delivery="at_least_once",
        redis={"on_error": "wait", "backoff_ms": 100, "max_backoff_ms": 500},
    )
    s = pipeline.settings
    workers = [WorkerProcess(pipeline.path, tmp_path, f"w{i}") for i in range(3)]
    for worker in workers:
        worker.wait_logged("assigned", timeout_s=90)

    events = list(make_events(entities, EVENTS, seed=105))
    ids = {e["event_id"] for e in events}
    producer = produce_in_background(pipeline, events, RATE)
    time.sleep(EVENTS / RATE / 4)  # a quarter of the stream is in flight
    workers[0].kill()
    time.sleep(1.0)
    workers[0] = WorkerProcess(pipeline.path, tmp_path, "w0-restarted")
    producer.join(240)
    assert not producer.is_alive(), "the load generator did not finish"
    assert producer.error is None, f"the load generator failed (not the workers): {producer.error}"

    counts = _output_ids(pipeline, ids, "read_uncommitted", timeout_s=180)
    assert ids <= counts.keys(), f"{len(ids - counts.keys())} events without a prediction"

    end = end_offsets(pipeline.bootstrap, s.input.topic, PARTITIONS)
    assert sum(end.values()) == EVENTS
    wait_caught_up(pipeline, end, 30)  # idle, after rebalances: within a few commit intervals

    for worker in workers:
        assert worker.stop() == 0, worker.log_tail()
    assert records_behind(pipeline, end) == {}, "a SIGTERM drain left input uncommitted"

    output_end = end_offsets(pipeline.bootstrap, s.output.topic, PARTITIONS)
    newcomer = WorkerProcess(pipeline.path, tmp_path, "newcomer")
    assigned = f"assigned {list(range(PARTITIONS))}"
    newcomer.wait_logged(assigned, timeout_s=90)
    # Two progress lines after the assignment: the worker fetched from the committed offsets for seconds.
    wait_until(
        lambda: newcomer.log_path.read_text(errors="replace").split(assigned, 1)[1].count("events=") >= 2,
        60,
        "the new worker to log its progress twice while idle",
    )
    assert newcomer.stop() == 0, newcomer.log_tail()
    progress = [line for line in newcomer.log_path.read_text(errors="replace").splitlines() if "events=" in line]
    assert "events=0 predictions=0 " in progress[-1], newcomer.log_tail()
    assert end_offsets(pipeline.bootstrap, s.output.topic, PARTITIONS) == output_end, "events predicted again"
    again = _output_ids(pipeline, ids, "read_uncommitted", timeout_s=60)
    assert again == counts, f"{sum((again - counts).values())} events predicted again by the new worker"
