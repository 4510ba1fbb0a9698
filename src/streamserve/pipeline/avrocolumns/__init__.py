"""Column-wise Avro encoding: one schemaless record per row, byte-identical to fastavro's schemaless_writer.

A batch arrives as named columns (numpy arrays or lists, one value per row, a scalar for a value shared by
every row, or a MapRows for a map whose rows all have the same keys). Each field is encoded for the whole column
at once (zig-zag varints and doubles with numpy, strings joined and encoded once), and the pieces are scattered
into one buffer that is cut into per-row records. The writer covers the record schemas streamserve owns;
`ColumnWriter.for_schema` returns None for any other construct, and the caller keeps fastavro.

What a column may hold is what fastavro's validator admits for the field, row value by row value (a numpy
column's row value is `column.tolist()[i]`). For those values the bytes are fastavro's; anything else raises
ValueError or TypeError naming the field, where fastavro alone might silently coerce (True into a long, 2**40
into an int, 1.5 into a long) or refuse. Dates and timestamps given as date/datetime objects are converted by
fastavro's own logical writers, so naive datetimes mean local time exactly as they do in fastavro.

Small batches take a row path first: numpy's per-call cost makes the column path ~0.8 ms per batch whatever its
size, while a few rows of plain Python values (exact str, int, float, bool, None, bytes, dict, list) are cheaper
written one value at a time with precomputed varints. The row path writes only such values and hands anything
else (numpy scalars, subclasses, datetimes, out-of-range numbers, lone surrogates...) to the column path, which
decides as above; so both paths write the same bytes, and the same values raise.

The package follows the bytes: chunks.py (varints, chunks and their assembly into rows), scalars.py and
containers.py (the encoders, by type family), writer.py (the schema compiled into encoders, and ColumnWriter).
"""

from streamserve.pipeline.avrocolumns.containers import MapRows
from streamserve.pipeline.avrocolumns.writer import ROWS_BELOW, ColumnWriter, Constant

__all__ = ["ROWS_BELOW", "ColumnWriter", "Constant", "MapRows"]
