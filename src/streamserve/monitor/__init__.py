"""The monitor: a faust-streaming application that watches the models the workers serve.

It joins the predictions (main and shadow topics) with delayed labels by event id, in event time, and reports
per model, version and window the measured quality, the quality estimated from the predicted probabilities
before labels come (CBPE), and the comparison of a shadow or canary version with the live one.

``measures`` (metrics in numpy), ``compare`` (confidence intervals, verdicts), ``estimate`` (CBPE),
``labels`` (the labels topic: decoding and checks), ``pairs`` (the per-event join state, pure functions),
``report`` (a window's report, its Avro record and the terminal table) are plain Python and tested without
Kafka; ``app`` is the faust application around them, ``reporter`` the view of every partition's join state (read
from the changelog) that the reports come from, and ``exporter`` its Prometheus metrics.

The retraining set is apart from the faust app: ``trainingset`` (the feature log joined with labels by event id,
pure), ``join`` (``streamserve monitor join``, a plain consumer around it) and ``export`` (``streamserve monitor
export --to FILE.parquet``).
"""
