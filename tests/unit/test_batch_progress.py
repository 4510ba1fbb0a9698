"""observe.progress: plain progress lines (rows, rows/s, ETA) when the output is not a terminal."""

from __future__ import annotations

import io

from streamserve.observe.progress import Progress


def test_plain_lines_every_few_seconds_with_rate_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(1000, stream, every_s=5.0, clock=lambda: now[0])
    now[0] = 2.0
    progress.advance(100)
    assert stream.getvalue() == "", "nothing before every_s"
    now[0] = 5.0
    progress.advance(400)
    assert stream.getvalue() == "scored 500 of 1,000 rows (50%), 100 rows/s, ETA 5s\n"
    now[0] = 6.0
    progress.advance(500)
    progress.close()
    assert stream.getvalue().splitlines()[-1].startswith("scored 1,000 of 1,000 rows (100%)")


def test_unknown_total_gives_rows_and_rate() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(None, stream, every_s=1.0, clock=lambda: now[0])
    now[0] = 2.0
    progress.advance(300)
    assert stream.getvalue() == "scored 300 rows, 150 rows/s\n"
