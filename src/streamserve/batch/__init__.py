"""Batch scoring: files (Parquet, Avro containers) or Spark batches through the worker's own BatchProcessor.

A batch job is another source and sink around the data plane the stream uses: ``rows`` reads a file's record
batch as the worker's events (its decode step), ``scoring`` builds the processor as the worker does and runs it,
``files`` finds and opens the inputs, ``output`` writes predictions and rejects, ``job`` runs a whole job with its
progress (``progress``). Features, inference, encoding and the rejection rules are the processor's, never copied.
"""
