"""Log lines a person can use: one per dead letter, progress with partitions and the model version."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from streamserve.app import Worker
from streamserve.pipeline.write import log_dead_letter
from streamserve.records import Rejected, Source

TRACE = "0af7651916cd43dd8448eb211c80319c"


def test_a_dead_letter_logs_one_line_with_stage_reason_source_and_trace(caplog: pytest.LogCaptureFixture) -> None:
    headers = [("traceparent", f"00-{TRACE}-b7ad6b7169203331-01".encode())]
    item = Rejected(Source("transactions", 3, 1234, None, b"x", headers, 0), "decode", "DecodeError", "bad varint")
    with caplog.at_level(logging.WARNING, logger="streamserve.pipeline.write"):
        log_dead_letter(item)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"dead letter: stage=decode reason=DecodeError: bad varint source=transactions/3@1234 input_trace_id={TRACE}"
    )


def test_a_dead_letter_without_a_traceparent_names_no_input_trace(caplog: pytest.LogCaptureFixture) -> None:
    item = Rejected(Source("in", 0, 7, None, b"x", None, 0), "enrich", "EnrichError", "missing merchant")
    with caplog.at_level(logging.WARNING, logger="streamserve.pipeline.write"):
        log_dead_letter(item)
    assert (
        caplog.records[0].getMessage() == "dead letter: stage=enrich reason=EnrichError: missing merchant source=in/0@7"
    )


def test_progress_names_the_owned_partitions() -> None:
    owner = SimpleNamespace(source=SimpleNamespace(assignment={("in", 3), ("in", 0), ("other", 1)}))
    assert Worker._partitions(owner) == "in[0,3] other[1]"  # type: ignore[arg-type]
    assert Worker._partitions(SimpleNamespace(source=SimpleNamespace(assignment=set()))) == "-"  # type: ignore[arg-type]
