"""Batch scoring on Apache Spark: a DataFrame of input events scored through ``mapInArrow`` by the worker's own
BatchProcessor (scoring.Scorer, as every batch tool), one model and one Redis client per Python worker, loaded once.

    spark-submit --master local[4] -m streamserve score -c pipeline.yaml --input events.parquet \\
        --output scores.parquet --spark local[4]

or, from a Spark application, ``SparkScorer(spark, settings).score(df)``. The result has one row per prediction
and one per rejected input: the prediction schema's columns (timestamps as epoch milliseconds) plus ``rejected``,
a struct (stage, error_class, reason) that is null on predictions. The pipeline's files (schemas, model, a
vocabulary) must be readable at the same paths on every executor.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from streamserve.batch.arrowtypes import arrow_schema
from streamserve.batch.job import Summary
from streamserve.batch.rows import Origin, RowReader
from streamserve.batch.scoring import score_batches
from streamserve.config import PipelineSettings
from streamserve.errors import BatchInputError
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.process import BatchResult
from streamserve.scoring import Scorer, carried_features, feature_sources, load_model, output_schema

REJECTED = pa.struct([("stage", pa.string()), ("error_class", pa.string()), ("reason", pa.string())])
_SCORERS: dict[tuple[str, tuple[str, ...]], tuple[Scorer, RowReader, LocalSchemaDecoder]] = {}
"""Per Python worker process: the scorer of each pipeline (model, Redis client), built by its first batch."""


def _output_arrow(settings: PipelineSettings) -> pa.Schema:
    """The columns of a scored DataFrame: the prediction schema's (all nullable) and ``rejected``."""
    schema = arrow_schema(output_schema(settings))
    return pa.schema([*(field.with_nullable(True) for field in schema), pa.field("rejected", REJECTED)])


class _Counts:
    """A Spark accumulator of counts per Python worker (pid -> count), merged on the driver."""

    def zero(self, value: dict[int, int]) -> dict[int, int]:
        """No counts."""
        return {}

    def addInPlace(self, first: dict[int, int], second: dict[int, int]) -> dict[int, int]:
        """Counts of both."""
        for pid, count in second.items():
            first[pid] = first.get(pid, 0) + count
        return first


class SparkScorer:
    """Scores Spark DataFrames with one pipeline; ``model_loads`` and ``batches`` count, per Python worker pid,
    the models loaded and the Arrow batches scored (read them after an action)."""

    def __init__(self, spark: Any, settings: PipelineSettings) -> None:
        from pyspark.accumulators import AccumulatorParam

        param = type("CountsParam", (_Counts, AccumulatorParam), {})()
        self.settings = settings
        self.model_loads = spark.sparkContext.accumulator({}, param)
        self.batches = spark.sparkContext.accumulator({}, param)

    def score(self, frame: Any) -> Any:
        """The DataFrame's rows scored (lazily, by mapInArrow): predictions and rejected rows, see the module."""
        from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

        settings, loads, batches = self.settings, self.model_loads, self.batches
        carried = carried_features(settings, frame.columns)
        # The columns are checked on the driver, before any task: one line naming the column, no model loaded.
        RowReader(_event_schema(settings), carried).check(to_arrow_schema(frame.schema), "the DataFrame")
        spark_schema = from_arrow_schema(_output_arrow(settings))
        out = to_arrow_schema(spark_schema)  # Arrow as Spark lays it out (a map's entries named as Spark reads them)

        def score_partition(batches_in: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            from pyspark import TaskContext

            scorer, rows, decoder = _scorer(settings, carried, loads)
            context = TaskContext.get()
            partition = context.partitionId() if context is not None else 0
            for scored in score_batches(scorer, rows, _with_origins(batches_in, partition)):
                batches.add({os.getpid(): 1})
                yield _as_rows(scored.result, decoder, out)

        return frame.mapInArrow(score_partition, spark_schema)


def _event_schema(settings: PipelineSettings) -> Any:
    return json.loads(settings.input.schema_path.read_text())


def _with_origins(batches: Iterator[pa.RecordBatch], partition: int) -> Iterator[tuple[pa.RecordBatch, Origin]]:
    """A partition's Arrow batches, each with where its rows come from (the partition's row numbers)."""
    first = 0
    for batch in batches:
        yield batch, Origin("spark", partition, first, 0)
        first += batch.num_rows


def _scorer(
    settings: PipelineSettings, carried: tuple[str, ...], loads: Any
) -> tuple[Scorer, RowReader, LocalSchemaDecoder]:
    """This Python worker's scorer of the pipeline: the model loaded and the Redis client opened on first use."""
    key = (settings.model_dump_json(), carried)
    found = _SCORERS.get(key)
    if found is None:
        import fastavro

        decoder = LocalSchemaDecoder(load_schema(settings.input.schema_path))  # unused: rows arrive decoded
        scorer = Scorer.for_settings(settings, load_model(settings), carried=carried, decoder=decoder)
        loads.add({os.getpid(): 1})
        found = _SCORERS[key] = (
            scorer,
            RowReader(_event_schema(settings), carried),
            LocalSchemaDecoder(fastavro.parse_schema(output_schema(settings))),
        )
    return found


def _as_rows(result: BatchResult, decoder: LocalSchemaDecoder, schema: pa.Schema) -> pa.RecordBatch:
    """A batch's predictions (the encoder's records read back) and its rejected rows, as one record batch."""
    rows: list[dict[str, Any]] = [
        record  # type: ignore[misc]  # the encoder's own records always read back
        for record in decoder.decode_many([value for _, encoded in result.outputs for value in encoded.values])
    ]
    rows += [
        {
            "source_topic": r.source.topic,
            "source_partition": r.source.partition,
            "source_offset": r.source.offset,
            "rejected": {"stage": r.stage, "error_class": r.error_class, "reason": r.message},
        }
        for r in result.rejected
    ]
    return pa.RecordBatch.from_pylist(rows, schema=schema)


def score_files_on_spark(
    settings: PipelineSettings, config: Path, input_path: str, output: Path, master: str
) -> Summary:
    """`streamserve score --spark MASTER`: Parquet input scored on Spark; predictions and rejects written as
    Parquet datasets (directories) at --output and beside it."""
    import time

    from pyspark.sql import SparkSession

    if not str(input_path).endswith((".parquet", "/")) and not Path(input_path).is_dir():
        raise BatchInputError(input_path, "on Spark, give a Parquet file or a directory of Parquet files")
    started = time.perf_counter()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Python workers run this interpreter (and its packages)
    spark = SparkSession.builder.master(master).appName(f"streamserve score {config.name}").getOrCreate()
    try:
        frame = spark.read.parquet(str(input_path))
        rows = frame.count()
        scored = SparkScorer(spark, settings).score(frame).cache()
        rejects = output.with_name(f"{output.stem}.rejects{output.suffix}")
        scored.filter("rejected IS NULL").drop("rejected").write.mode("overwrite").parquet(str(output))
        rejected = scored.filter("rejected IS NOT NULL").select("source_offset", "source_partition", "rejected.*")
        rejected.write.mode("overwrite").parquet(str(rejects))
        summary = Summary(files=1, rows=rows, output=str(output), rejects=str(rejects))
        for stage, reason, count in rejected.groupBy("stage", "reason").count().collect():
            summary.rejected[(stage, reason)] += count
        summary.predictions = rows - sum(summary.rejected.values())
        summary.features = feature_sources(settings, carried_features(settings, frame.columns))
    finally:
        spark.stop()
    summary.seconds = time.perf_counter() - started
    return summary
