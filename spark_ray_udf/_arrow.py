"""Arrow <-> numpy conversion and return-type checks.

Pure functions: no Spark session, no Ray. They run inside the Ray actors on every batch, so they
avoid a Python object per row wherever Arrow allows it:

* a numeric column becomes a 1-D array (zero copy when it has no nulls);
* a fixed-length ``array<float|double|int>`` column (Arrow ``list`` or ``fixed_size_list``) becomes
  a 2-D array ``(rows, length)`` reshaped from the child buffer, float32 kept as float32;
* nested fixed-length arrays become 3-D and deeper arrays the same way.

Nulls follow a per-function policy (:data:`NullPolicy`): ``"error"`` (the default) refuses the
batch naming the argument and the row; ``"skip"`` leaves such rows out of ``apply_func`` and
returns null for them. NaN is a value, not a null: it is passed to ``apply_func`` unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from spark_ray_udf.errors import ConfigError, ConfigTypeError, InputError, ModelApplyError

NullPolicy = Literal["error", "skip"]

# Spark reads each batch's result as one Arrow array of its default types, whose strings and
# lists are addressed with 32-bit offsets: at most 2**31 - 1 bytes of strings (or elements of a
# list) per array. Past that pyarrow splits the result into chunks, which Spark refuses
# ("iterator of ChunkedArray"), naming neither the function nor the rows.
MAX_ARRAY_BYTES = 2**31 - 1

_NUMERIC_HINT = "cast it in SQL, e.g. cast(col as double) or cast(col as array<float>)"


def describe_argument(index: int, arr_type: pa.DataType) -> str:
    """Name an argument for error messages: ``argument 2 (list<item: float>)``.

    >>> describe_argument(0, pa.float64())
    'argument 1 (double)'
    """
    return f"argument {index + 1} ({arr_type})"


def null_rows(columns: Sequence[pa.Array]) -> np.ndarray | None:
    """Return a boolean mask of the rows where any column is null, or None when there are none.

    >>> null_rows([pa.array([1.0, None, 3.0]), pa.array([1, 2, None])]).tolist()
    [False, True, True]
    >>> null_rows([pa.array([1.0, 2.0])]) is None
    True
    """
    mask: np.ndarray | None = None
    for col in columns:
        if col.null_count == 0:
            continue
        col_mask = col.is_null().to_numpy(zero_copy_only=False)
        mask = col_mask if mask is None else (mask | col_mask)
    return mask


def arrow_to_numpy(arr: pa.Array, *, argument: str, row_offset: int = 0) -> np.ndarray:
    """Convert one argument column (without top-level nulls) into a numpy array.

    ``argument`` names the column in errors; ``row_offset`` is added to row numbers in errors so
    they count from the start of the Spark task, not of the batch.

    >>> arrow_to_numpy(pa.array([1.5, 2.5]), argument="x").tolist()
    [1.5, 2.5]
    >>> m = arrow_to_numpy(pa.array([[1, 2], [3, 4]], pa.list_(pa.float32())), argument="x")
    >>> m.shape, m.dtype.name
    ((2, 2), 'float32')
    """
    return _to_numpy(arr, argument=argument, row_offset=row_offset, stride=1)


def _to_numpy(arr: pa.Array, *, argument: str, row_offset: int, stride: int) -> np.ndarray:
    # ``stride`` is how many items of ``arr`` make one row of the batch: 1 for the argument
    # column itself, the outer lengths multiplied for the values of nested arrays, so that
    # errors name the batch row and not an index into the flattened values.
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        return _to_numpy(
            arr.dictionary_decode(), argument=argument, row_offset=row_offset, stride=stride
        )
    if pa.types.is_null(t) and len(arr) == 0:
        # A NULL literal argument whose rows were all left out under on_null="skip".
        return np.empty(0)
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(
            f"{argument}: row {row_offset + first // stride} is null; filter or coalesce nulls "
            "in SQL, or register the function with on_null='skip' to return null for such rows"
        )
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_boolean(t):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _list_to_numpy(arr, argument=argument, row_offset=row_offset, stride=stride)
    if pa.types.is_struct(t):
        raise InputError(
            f"{argument} is a struct, but a number, string or array was expected; pass its "
            "fields as separate arguments (col.a, col.b) or build an array in SQL (array(col.a, col.b))"
        )
    raise InputError(f"{argument} has the unsupported type {t}; {_NUMERIC_HINT}")


def _list_to_numpy(arr: pa.Array, *, argument: str, row_offset: int, stride: int) -> np.ndarray:
    n = len(arr)
    t = arr.type
    what = "an array" if stride == 1 else "an inner array"
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
    else:
        offsets = arr.offsets.to_numpy()
        lengths = np.diff(offsets)
        width = int(lengths[0]) if n else 0
        if n:
            ragged = np.flatnonzero(lengths != width)
            if ragged.size:
                bad = int(ragged[0])
                raise InputError(
                    f"{argument}: row {row_offset + bad // stride} has {what} of "
                    f"{int(lengths[bad])} elements but row {row_offset} has {width}; an array "
                    "argument must have one fixed shape in a batch: pad or truncate the arrays, "
                    "or filter the odd rows in SQL"
                )
    values = arr.flatten()
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = row_offset + (first // width) // stride
        raise InputError(
            f"{argument}: row {row} holds a null element inside its array; replace null "
            "elements in SQL, e.g. transform(col, x -> coalesce(x, 0.0))"
        )
    vt = values.type
    if not (
        pa.types.is_integer(vt)
        or pa.types.is_floating(vt)
        or pa.types.is_boolean(vt)
        or pa.types.is_list(vt)
        or pa.types.is_large_list(vt)
        or pa.types.is_fixed_size_list(vt)
    ):
        raise InputError(
            f"{argument} is an array of {vt}; only arrays of numbers (or of such arrays) are "
            f"supported: {_NUMERIC_HINT}"
        )
    inner = _to_numpy(values, argument=argument, row_offset=row_offset, stride=max(1, stride * width))
    return inner.reshape((n, width) + inner.shape[1:])


def prepare_inputs(
    columns: Sequence[pa.Array],
    *,
    function: str,
    on_null: NullPolicy = "error",
    row_offset: int = 0,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Turn the argument columns of one batch into numpy arrays for ``apply_func``.

    Returns the arrays and, under ``on_null="skip"``, the mask of rows kept (None when every row
    is kept).

    >>> arrays, kept = prepare_inputs([pa.array([1.0, None, 3.0])], function="f", on_null="skip")
    >>> arrays[0].tolist(), kept.tolist()
    ([1.0, 3.0], [True, False, True])
    """
    kept: np.ndarray | None = None
    if on_null == "skip":
        nulls = null_rows(columns)
        if nulls is not None:
            kept = ~nulls
            mask = pa.array(kept)
            columns = [c.filter(mask) for c in columns]
    elif on_null != "error":
        raise ConfigError(f"on_null must be 'error' or 'skip' (got {on_null!r})")
    arrays = [
        arrow_to_numpy(
            col,
            argument=f"{function}: {describe_argument(i, col.type)}",
            row_offset=row_offset,
        )
        for i, col in enumerate(columns)
    ]
    return arrays, kept


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_stringy(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def check_return_type(t: pa.DataType, *, where: str = "return_type") -> None:
    """Refuse return types the library cannot build from numpy results.

    Supported: integers, floats, boolean, string, arrays of those (nested too), and structs of
    any of these.

    >>> check_return_type(pa.list_(pa.float64()))
    >>> check_return_type(pa.timestamp("us"))
    Traceback (most recent call last):
    ...
    spark_ray_udf.errors.ConfigTypeError: return_type timestamp[us] is not supported; use double, float, bigint, int, boolean, string, array<...> or struct<...>
    """
    if _is_numeric(t) or _is_stringy(t):
        return
    if _is_list(t):
        check_return_type(t.value_type, where=where)
        return
    if pa.types.is_struct(t):
        for field in t:
            check_return_type(field.type, where=f"{where} field {field.name!r}")
        return
    raise ConfigTypeError(
        f"{where} {t} is not supported; use double, float, bigint, int, boolean, string, "
        "array<...> or struct<...>"
    )


def to_result_array(
    result: Any,
    return_type: pa.DataType,
    n_rows: int,
    *,
    function: str,
    kept: np.ndarray | None = None,
    row_offset: int = 0,
) -> pa.Array:
    """Check ``apply_func``'s result for one batch and turn it into an Arrow array.

    ``n_rows`` is the batch's row count; with ``kept`` (rows sent to ``apply_func`` under the
    ``"skip"`` null policy) the result holds one value per kept row and the skipped rows become
    null.

    >>> to_result_array(np.array([1, 2]), pa.float64(), 2, function="f").to_pylist()
    [1.0, 2.0]
    >>> to_result_array(np.ones((2, 3), np.float32), pa.list_(pa.float64()), 2, function="f").type
    ListType(list<item: double>)
    """
    expected = n_rows if kept is None else int(kept.sum())
    where = f"{function}: apply_func's result for rows {row_offset}..{row_offset + n_rows - 1}"
    arr = _convert(result, return_type, expected, where=where)
    if kept is not None:
        indices = np.cumsum(kept) - 1
        arr = arr.take(pa.array(indices, mask=~kept))
    check_fits(arr, where=where, n_rows=n_rows)
    if arr.type != return_type:
        raise ModelApplyError(
            f"{where}: built {arr.type} for return type {return_type}; return values of the "
            "declared type"
        )
    return arr


def _offset_span(arr: pa.Array) -> int:
    """How many bytes (strings) or elements (lists) the offsets of ``arr`` span."""
    if len(arr) == 0:
        return 0
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type) or (
        pa.types.is_large_list(arr.type)
    )
    offsets = np.frombuffer(
        arr.buffers()[1], dtype=np.int64 if large else np.int32, count=len(arr) + 1,
        offset=arr.offset * (8 if large else 4),
    )
    return int(offsets[-1]) - int(offsets[0])


def _span(arr: pa.Array) -> int:
    t = arr.type
    if _is_stringy(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr.nbytes if pa.types.is_string_view(t) else _offset_span(arr)
    if pa.types.is_fixed_size_list(t):
        return len(arr) * t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _offset_span(arr)
    return 0


def check_fits(arr: pa.Array | pa.ChunkedArray, *, where: str, n_rows: int) -> None:
    """Refuse a result that one Arrow array for Spark cannot hold: more than
    :data:`MAX_ARRAY_BYTES` bytes of strings, or list elements, in a column or a nested level.

    >>> check_fits(pa.array(["a", "bc"]), where="f: rows 0..1", n_rows=2)
    >>> check_fits(pa.chunked_array([["a"], ["b"]]), where="f: rows 0..1", n_rows=2)
    """
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    total = sum(_span(c) for c in chunks)
    if total > MAX_ARRAY_BYTES:
        what = "elements in its arrays" if _is_list(arr.type) else "bytes of strings"
        raise ModelApplyError(
            f"{where}: the result holds {total:,} {what} ({arr.type}), more than one Arrow array "
            f"of a batch can hold ({MAX_ARRAY_BYTES:,}); make the batches smaller: lower "
            f"spark.sql.execution.arrow.maxRecordsPerBatch (this batch has {n_rows} rows), or "
            "return smaller values"
        )
    for c in chunks:
        if _is_list(c.type) and len(c):
            check_fits(c.flatten(), where=where, n_rows=n_rows)
        elif pa.types.is_struct(c.type):
            for child in c.flatten():
                check_fits(child, where=where, n_rows=n_rows)


def _one_array(arr: pa.Array | pa.ChunkedArray, *, where: str, n_rows: int) -> pa.Array:
    """``arr`` as one array, after :func:`check_fits` (pyarrow chunks what overflows)."""
    check_fits(arr, where=where, n_rows=n_rows)
    if isinstance(arr, pa.ChunkedArray):
        try:
            return arr.combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ModelApplyError(f"{where}: cannot combine the result's chunks: {exc}") from exc
    return arr


def _length(result: Any) -> int:
    try:
        return len(result)
    except TypeError:
        return -1


def _convert(result: Any, t: pa.DataType, n: int, *, where: str) -> pa.Array:
    if pa.types.is_struct(t):
        return _convert_struct(result, t, n, where=where)
    if hasattr(result, "to_numpy") and not isinstance(result, (pa.Array, pa.ChunkedArray)):
        dtype = getattr(result, "dtype", None)
        if type(result).__module__.startswith("pandas") and not isinstance(dtype, np.dtype):
            # nullable pandas dtypes (Int64, boolean, string, ...): <NA> becomes null
            result = _to_arrow(result, f"a pandas result of dtype {dtype}", where=where)
        else:
            result = result.to_numpy()  # pandas Series with a numpy dtype, tf.Tensor
    if isinstance(result, pa.ChunkedArray):
        result = _one_array(result, where=where, n_rows=n)
    got = _length(result)
    if got != n:
        shape = getattr(result, "shape", None)
        raise ModelApplyError(
            f"{where}: expected {n} values (one per row), got "
            f"{got if got >= 0 else type(result).__name__}"
            f"{f' with shape {shape}' if shape is not None else ''}; apply_func must return "
            "one prediction per input row"
        )
    if _is_list(t):
        return _convert_list(result, t, n, where=where)
    if isinstance(result, pa.Array):
        arr = _one_array(result, where=where, n_rows=n)
    else:
        values = np.asarray(result)
        if values.ndim != 1:
            raise ModelApplyError(
                f"{where}: got an array of shape {values.shape} for return type {t}; reduce it "
                "to one value per row (e.g. .argmax(axis=1)) or declare return_type='array<double>'"
            )
        arr = _to_arrow(values, f"values of dtype {values.dtype}", where=where)
    return _cast(arr, t, where=where)


def _to_arrow(values: Any, what: str, *, where: str) -> pa.Array:
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ModelApplyError(f"{where}: cannot convert {what} to Arrow: {exc}") from exc
    except OverflowError as exc:
        raise ModelApplyError(
            f"{where}: cannot convert {what} to Arrow ({exc}); round or clip them to the range "
            "of the return type"
        ) from exc
    except pa.ArrowCapacityError as exc:
        raise ModelApplyError(
            f"{where}: {what} do not fit one Arrow array ({exc}); make the batches smaller: lower "
            "spark.sql.execution.arrow.maxRecordsPerBatch, or return smaller values"
        ) from exc
    return _one_array(arr, where=where, n_rows=len(arr))


def _cast(arr: pa.Array, t: pa.DataType, *, where: str) -> pa.Array:
    src = arr.type
    if pa.types.is_null(src):
        return pa.nulls(len(arr), t)
    compatible = (_is_numeric(src) and _is_numeric(t)) or (_is_stringy(src) and _is_stringy(t))
    if not compatible:
        raise ModelApplyError(
            f"{where}: got values of type {src} for return type {t}; return "
            f"{'numbers' if _is_numeric(t) else 'strings'} or change return_type"
        )
    if src == t:
        return arr
    try:
        return arr.cast(t, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ModelApplyError(
            f"{where}: values of type {src} do not fit return type {t} ({exc}); round or clip "
            "them, or change return_type"
        ) from exc


def _cast_list(arr: pa.Array, t: pa.DataType, *, where: str) -> pa.Array:
    if arr.type == t:
        return arr
    try:
        return arr.cast(t, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ModelApplyError(f"{where}: cannot build {t} from the result: {exc}") from exc


def _convert_list(result: Any, t: pa.DataType, n: int, *, where: str) -> pa.Array:
    value_type = t.value_type
    if isinstance(result, pa.Array):
        if not _is_list(result.type):
            raise ModelApplyError(f"{where}: got {result.type} for return type {t}")
        return _cast_list(_one_array(result, where=where, n_rows=n), t, where=where)
    if isinstance(result, np.ndarray) and result.ndim >= 2 and result.dtype != object:
        width = result.shape[1]
        if n * width > MAX_ARRAY_BYTES:
            raise ModelApplyError(
                f"{where}: the result holds {n * width:,} array elements (shape {result.shape}), "
                f"more than one Arrow array of a batch can hold ({MAX_ARRAY_BYTES:,}); make the "
                "batches smaller: lower spark.sql.execution.arrow.maxRecordsPerBatch"
            )
        flat = result.reshape((n * width,) + result.shape[2:])
        values = _convert(flat, value_type, n * width, where=where)
        offsets = pa.array(np.arange(n + 1, dtype=np.int64) * width, type=pa.int32())
        # Built with the return type's own element field (Spark names it "element" and may
        # mark it non-nullable), so the array's type is exactly the declared one.
        built = pa.ListArray.from_arrays(offsets, values, type=pa.list_(t.value_field))
        return _cast_list(built, t, where=where)
    if isinstance(result, np.ndarray) and result.ndim == 1 and result.dtype != object:
        raise ModelApplyError(
            f"{where}: got a 1-D array for return type {t}; return a 2-D array (rows x length) "
            "or a list of arrays, or change return_type to a scalar type"
        )
    try:
        arr = pa.array([None if r is None else np.asarray(r).tolist() for r in result])
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        # ValueError: numpy refuses a ragged row ("inhomogeneous shape")
        raise ModelApplyError(f"{where}: cannot build {t} from the result: {exc}") from exc
    arr = _one_array(arr, where=where, n_rows=n)
    if not _is_list(arr.type) and not pa.types.is_null(arr.type):
        raise ModelApplyError(f"{where}: got {arr.type} for return type {t}")
    return _cast_list(arr, t, where=where)


def _convert_struct(result: Any, t: pa.StructType, n: int, *, where: str) -> pa.Array:
    if not (isinstance(result, Mapping) or hasattr(result, "columns")):
        raise ModelApplyError(
            f"{where}: return type {t} needs a dict of arrays or a pandas DataFrame keyed by "
            f"field name, got {type(result).__name__}"
        )
    names = [f.name for f in t]
    available = list(result.keys()) if isinstance(result, Mapping) else list(result.columns)
    missing = [name for name in names if name not in available]
    if missing:
        raise ModelApplyError(
            f"{where}: fields {missing} of return type {t} are missing from the result "
            f"(it has {available})"
        )
    children = [
        _convert(result[f.name], f.type, n, where=f"{where}, field {f.name!r}") for f in t
    ]
    return pa.StructArray.from_arrays(children, fields=list(t))


def empty_result(return_type: pa.DataType) -> pa.Array:
    """An empty array of the return type, for empty batches (``apply_func`` is not called).

    >>> len(empty_result(pa.float64()))
    0
    """
    return pa.array([], type=return_type)
