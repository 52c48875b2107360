"""Arrow <-> numpy conversion and return-type checks (pure: no Spark, no Ray)."""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from spark_ray_udf._arrow import (
    arrow_to_numpy,
    check_return_type,
    describe_argument,
    empty_result,
    null_rows,
    prepare_inputs,
    to_result_array,
)
from spark_ray_udf.errors import InputError, ModelApplyError, SparkRayUdfError

# Spark's own Arrow types name the list element "element" (pyspark's to_arrow_type).
SPARK_ARRAY_DOUBLE = pa.list_(pa.field("element", pa.float64()))


def _data_address(np_array: np.ndarray) -> int:
    return int(np_array.__array_interface__["data"][0])


# --------------------------------------------------------------------------------------------
# Arguments: Arrow -> numpy
# --------------------------------------------------------------------------------------------

NUMERIC_TYPES = [
    (pa.int8(), np.int8),
    (pa.int16(), np.int16),
    (pa.int32(), np.int32),
    (pa.int64(), np.int64),
    (pa.uint8(), np.uint8),
    (pa.uint16(), np.uint16),
    (pa.uint32(), np.uint32),
    (pa.uint64(), np.uint64),
    (pa.float16(), np.float16),
    (pa.float32(), np.float32),
    (pa.float64(), np.float64),
]


@pytest.mark.parametrize(("arrow_type", "np_dtype"), NUMERIC_TYPES, ids=[str(t) for t, _ in NUMERIC_TYPES])
def test_numeric_column_keeps_its_dtype(arrow_type: pa.DataType, np_dtype: type) -> None:
    """Every numeric Arrow type becomes a 1-D array of the matching numpy dtype."""
    values = np.array([1, 2, 3], dtype=np_dtype)
    arr = pa.array(values, type=arrow_type)
    out = arrow_to_numpy(arr, argument="x")
    assert out.dtype == np.dtype(np_dtype)
    assert out.shape == (3,)
    assert out.tolist() == values.tolist()


def test_float32_stays_float32() -> None:
    """A float column is not widened to double."""
    out = arrow_to_numpy(pa.array([0.5, 1.5], pa.float32()), argument="x")
    assert out.dtype == np.float32
    assert out.tolist() == [0.5, 1.5]


def test_numeric_column_is_zero_copy() -> None:
    """A double column without nulls is a view of the Arrow buffer."""
    arr = pa.array([1.0, 2.0, 3.0])
    out = arrow_to_numpy(arr, argument="x")
    assert _data_address(out) == arr.buffers()[1].address


def test_boolean_and_string_columns() -> None:
    """Booleans become a bool array and strings an object array of str."""
    assert arrow_to_numpy(pa.array([True, False]), argument="x").dtype == np.bool_
    out = arrow_to_numpy(pa.array(["a", "bc"]), argument="x")
    assert out.tolist() == ["a", "bc"]


def test_nan_is_a_value_not_a_null() -> None:
    """NaN passes through unchanged and is not reported as null."""
    out = arrow_to_numpy(pa.array([np.nan, 1.0]), argument="x")
    assert np.isnan(out[0]) and out[1] == 1.0


def test_chunked_array_is_combined() -> None:
    """A ChunkedArray argument is converted like one array."""
    arr = pa.chunked_array([pa.array([1.0]), pa.array([2.0, 3.0])])
    assert arrow_to_numpy(arr, argument="x").tolist() == [1.0, 2.0, 3.0]


LIST_TYPES = {
    "list": pa.list_(pa.float32()),
    "large_list": pa.large_list(pa.float32()),
    "fixed_size_list": pa.list_(pa.float32(), 3),
    "spark_list": pa.list_(pa.field("element", pa.float32())),
}


@pytest.mark.parametrize("kind", list(LIST_TYPES))
def test_array_column_becomes_2d_view_of_the_child_buffer(kind: str) -> None:
    """list, large_list and fixed_size_list of float become a float32 (rows, length) array
    over the child buffer."""
    arr = pa.array([[1, 2, 3], [4, 5, 6]], LIST_TYPES[kind])
    out = arrow_to_numpy(arr, argument="x")
    assert out.shape == (2, 3)
    assert out.dtype == np.float32
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]
    child = arr.values
    assert _data_address(out) == child.buffers()[1].address


def test_integer_array_column() -> None:
    """An array<int> column becomes a 2-D int32 array."""
    out = arrow_to_numpy(pa.array([[1, 2], [3, 4]], pa.list_(pa.int32())), argument="x")
    assert out.dtype == np.int32 and out.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    "arrow_type",
    [
        pa.list_(pa.list_(pa.float64())),
        pa.list_(pa.list_(pa.float64(), 2), 3),
        pa.large_list(pa.list_(pa.float64(), 2)),
    ],
    ids=["list-list", "fixed-fixed", "large-fixed"],
)
def test_nested_arrays_become_3d(arrow_type: pa.DataType) -> None:
    """An array of fixed-length arrays becomes a (rows, outer, inner) array."""
    rows = [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 10], [11, 12]]]
    out = arrow_to_numpy(pa.array(rows, arrow_type), argument="x")
    assert out.shape == (2, 3, 2)
    assert out.tolist() == rows


def test_four_dimensional_arrays() -> None:
    """Three levels of arrays (an image batch with channels) become a 4-D array."""
    rows = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
    arr = pa.array(rows.tolist(), pa.list_(pa.list_(pa.list_(pa.float32()))))
    out = arrow_to_numpy(arr, argument="x")
    assert out.shape == (2, 2, 3, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, rows)


def test_sliced_scalar_column() -> None:
    """A sliced numeric column starts at its offset."""
    arr = pa.array([1.0, 2.0, 3.0, 4.0]).slice(1, 2)
    assert arrow_to_numpy(arr, argument="x").tolist() == [2.0, 3.0]


@pytest.mark.parametrize("kind", list(LIST_TYPES))
def test_sliced_array_column_honours_offsets(kind: str) -> None:
    """A sliced array column (non-zero offset) gives exactly its own rows."""
    full = pa.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], LIST_TYPES[kind])
    out = arrow_to_numpy(full.slice(1, 2), argument="x")
    assert out.tolist() == [[4, 5, 6], [7, 8, 9]]


def test_sliced_nested_array_column() -> None:
    """A slice of a nested array column gives the right 3-D block."""
    rows = [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]]
    arr = pa.array(rows, pa.list_(pa.list_(pa.float64()))).slice(1, 2)
    assert arrow_to_numpy(arr, argument="x").tolist() == rows[1:]


def test_sliced_array_ragged_outside_the_slice_is_fine() -> None:
    """Rows outside the slice do not count for the fixed-length check."""
    arr = pa.array([[1.0], [2.0, 3.0], [4.0, 5.0], [6.0]], pa.list_(pa.float64())).slice(1, 2)
    assert arrow_to_numpy(arr, argument="x").tolist() == [[2.0, 3.0], [4.0, 5.0]]


def test_ragged_array_names_argument_and_row() -> None:
    """Rows of different lengths are refused, naming the argument, the row and the lengths."""
    arr = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0]], pa.list_(pa.float64()))
    with pytest.raises(InputError, match=r"^x: row 2 has an array of 1 elements but row 0 has 2; .*pad or truncate"):
        arrow_to_numpy(arr, argument="x")


def test_ragged_row_counts_from_row_offset() -> None:
    """Row numbers in the ragged error count from the start of the task (row_offset)."""
    arr = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float64()))
    with pytest.raises(InputError, match=r"row 101 has an array of 1 elements but row 100 has 2"):
        arrow_to_numpy(arr, argument="x", row_offset=100)


def test_ragged_through_prepare_inputs_names_function_and_argument() -> None:
    """prepare_inputs names the function, the argument's position and its type."""
    ok = pa.array([1.0, 2.0])
    ragged = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float64()))
    with pytest.raises(InputError, match=r"^f: argument 2 \(list<item: double>\): row 7 has an array of 1"):
        prepare_inputs([ok, ragged], function="f", row_offset=6)


def test_ragged_inner_array_names_the_outer_row() -> None:
    """A ragged inner array is reported at the batch row that holds it, not at its flat index."""
    rows = [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11]]]
    arr = pa.array(rows, pa.list_(pa.list_(pa.float64())))
    with pytest.raises(InputError, match=r"x: row 12 has an inner array of 1 elements but row 10 has 2"):
        arrow_to_numpy(arr, argument="x", row_offset=10)


def test_null_row_error_policy() -> None:
    """Under on_null='error' a null row is refused with its row number and the two fixes."""
    arr = pa.array([1.0, 2.0, None])
    with pytest.raises(InputError) as info:
        prepare_inputs([arr], function="f", row_offset=40)
    msg = str(info.value)
    assert msg.startswith("f: argument 1 (double): row 42 is null")
    assert "coalesce" in msg and "on_null='skip'" in msg


def test_null_array_row_error_policy() -> None:
    """A null array row (not an element) is refused as a null row."""
    arr = pa.array([[1.0], None], pa.list_(pa.float64()))
    with pytest.raises(InputError, match=r"row 1 is null"):
        arrow_to_numpy(arr, argument="x")


def test_null_row_skip_policy_masks_and_filters() -> None:
    """Under on_null='skip' rows with a null in any argument are left out and marked in the mask."""
    a = pa.array([1.0, None, 3.0, 4.0])
    b = pa.array([[1, 1], [2, 2], None, [4, 4]], pa.list_(pa.int64()))
    arrays, kept = prepare_inputs([a, b], function="f", on_null="skip")
    assert kept is not None and kept.tolist() == [True, False, False, True]
    assert arrays[0].tolist() == [1.0, 4.0]
    assert arrays[1].tolist() == [[1, 1], [4, 4]]


def test_skip_policy_without_nulls_keeps_everything() -> None:
    """With no null rows the mask is None and nothing is filtered."""
    arrays, kept = prepare_inputs([pa.array([1.0, 2.0])], function="f", on_null="skip")
    assert kept is None and arrays[0].tolist() == [1.0, 2.0]


def test_skip_policy_with_null_literal_argument() -> None:
    """A NULL-typed argument under 'skip' leaves every row out instead of failing on its type."""
    arrays, kept = prepare_inputs([pa.nulls(2), pa.array([1.0, 2.0])], function="f", on_null="skip")
    assert kept is not None and not kept.any()
    assert [len(a) for a in arrays] == [0, 0]


def test_unknown_null_policy_is_refused() -> None:
    """on_null accepts only 'error' and 'skip'."""
    with pytest.raises(ValueError, match=r"on_null must be 'error' or 'skip' \(got 'ignore'\)"):
        prepare_inputs([pa.array([1.0])], function="f", on_null="ignore")  # type: ignore[arg-type]


def test_null_rows_mask() -> None:
    """null_rows ORs the null masks of every column."""
    mask = null_rows([pa.array([None, 1.0, 2.0]), pa.array([1, 2, None])])
    assert mask is not None and mask.tolist() == [True, False, True]


@pytest.mark.parametrize("on_null", ["error", "skip"])
def test_null_element_inside_array_is_refused(on_null: str) -> None:
    """A null element inside a non-null array is refused under both policies, naming the row."""
    arr = pa.array([[1.0, 2.0], [3.0, None]], pa.list_(pa.float64()))
    with pytest.raises(InputError, match=r"argument 1 \(list<item: double>\): row 6 holds a null element.*transform"):
        prepare_inputs([arr], function="f", on_null=on_null, row_offset=5)  # type: ignore[arg-type]


def test_null_element_in_nested_array_names_the_outer_row() -> None:
    """A null deep inside a nested array is reported at its batch row."""
    rows = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, None]]]
    arr = pa.array(rows, pa.list_(pa.list_(pa.float64())))
    with pytest.raises(InputError, match=r"x: row 1 holds a null element"):
        arrow_to_numpy(arr, argument="x")


def test_null_inner_array_names_the_outer_row() -> None:
    """A null inner array inside a nested array is reported at its batch row."""
    rows = [[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], None]]
    arr = pa.array(rows, pa.list_(pa.list_(pa.float64())))
    with pytest.raises(InputError, match=r"x: row 2 holds a null element"):
        arrow_to_numpy(arr, argument="x")


def test_struct_argument_is_refused_with_fix() -> None:
    """A struct argument is refused and the message says to pass its fields or build an array."""
    arr = pa.array([{"a": 1.0, "b": 2.0}])
    with pytest.raises(InputError, match=r"^f: argument 1 \(struct<a: double, b: double>\) is a struct.*array\(col.a, col.b\)"):
        prepare_inputs([arr], function="f")


@pytest.mark.parametrize(
    "arr",
    [
        pa.array([dt.datetime(2024, 1, 1)], pa.timestamp("us", tz="UTC")),
        pa.array([decimal.Decimal("1.25")], pa.decimal128(10, 2)),
        pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int32())),
        pa.array([dt.date(2024, 1, 1)], pa.date32()),
    ],
    ids=["timestamp", "decimal", "map", "date"],
)
def test_unsupported_types_are_refused_with_a_fix(arr: pa.Array) -> None:
    """Unsupported argument types are refused naming the type and the SQL cast to use."""
    with pytest.raises(InputError) as info:
        arrow_to_numpy(arr, argument="f: argument 1")
    msg = str(info.value)
    assert f"has the unsupported type {arr.type}" in msg
    assert "cast(col as double)" in msg


def test_array_of_strings_is_refused() -> None:
    """An array<string> argument is refused with the cast hint."""
    with pytest.raises(InputError, match=r"is an array of string; only arrays of numbers.*cast\(col as"):
        arrow_to_numpy(pa.array([["a"], ["b"]]), argument="x")


def test_input_error_is_in_the_hierarchy() -> None:
    """InputError is both a SparkRayUdfError and a TypeError."""
    with pytest.raises(SparkRayUdfError):
        arrow_to_numpy(pa.array([{"a": 1}]), argument="x")
    with pytest.raises(TypeError):
        arrow_to_numpy(pa.array([{"a": 1}]), argument="x")


def test_dictionary_array_of_numbers_is_decoded() -> None:
    """A dictionary-encoded numeric column is decoded to its values."""
    arr = pa.array([2.5, 1.5, 2.5]).dictionary_encode()
    out = arrow_to_numpy(arr, argument="x")
    assert out.dtype == np.float64 and out.tolist() == [2.5, 1.5, 2.5]


def test_dictionary_array_of_strings_is_decoded() -> None:
    """A dictionary-encoded string column is decoded to its strings."""
    arr = pa.array(["b", "a", "b"]).dictionary_encode()
    assert arrow_to_numpy(arr, argument="x").tolist() == ["b", "a", "b"]


def test_dictionary_array_with_null_is_refused() -> None:
    """A null in a dictionary-encoded column is reported like any null row."""
    arr = pa.array(["b", None]).dictionary_encode()
    with pytest.raises(InputError, match=r"x: row 1 is null"):
        arrow_to_numpy(arr, argument="x")


@pytest.mark.parametrize(
    ("arr", "shape"),
    [
        (pa.array([], pa.float64()), (0,)),
        (pa.array([], pa.list_(pa.float32())), (0, 0)),
        (pa.array([], pa.list_(pa.float32(), 4)), (0, 4)),
        (pa.array([], pa.string()), (0,)),
    ],
    ids=["double", "list", "fixed_size_list", "string"],
)
def test_empty_arrays(arr: pa.Array, shape: tuple[int, ...]) -> None:
    """Empty columns convert to empty arrays of the right rank."""
    assert arrow_to_numpy(arr, argument="x").shape == shape


def test_empty_batch_through_prepare_inputs() -> None:
    """An empty batch gives empty arrays and no mask."""
    arrays, kept = prepare_inputs([pa.array([], pa.float64())], function="f", on_null="skip")
    assert kept is None and arrays[0].shape == (0,)


def test_describe_argument_counts_from_one() -> None:
    """Arguments are numbered from 1 in messages, with their Arrow type."""
    assert describe_argument(2, pa.list_(pa.float32())) == "argument 3 (list<item: float>)"


# --------------------------------------------------------------------------------------------
# Results: numpy -> Arrow
# --------------------------------------------------------------------------------------------


def test_wrong_length_result_is_refused() -> None:
    """A result with the wrong number of values names the rows, the count and the shape."""
    with pytest.raises(ModelApplyError) as info:
        to_result_array(np.zeros(2), pa.float64(), 3, function="f", row_offset=10)
    msg = str(info.value)
    assert msg.startswith("f: apply_func's result for rows 10..12: expected 3 values (one per row), got 2")
    assert "shape (2,)" in msg


def test_scalar_result_is_refused() -> None:
    """A single number instead of one value per row is refused, naming its type."""
    with pytest.raises(ModelApplyError, match=r"expected 2 values \(one per row\), got float64"):
        to_result_array(np.float64(1.0), pa.float64(), 2, function="f")


def test_2d_result_for_scalar_type_is_refused() -> None:
    """A (rows, k) result for a scalar return type is refused with the argmax / array hint."""
    with pytest.raises(ModelApplyError, match=r"shape \(2, 3\) for return type double.*argmax.*array<double>"):
        to_result_array(np.ones((2, 3)), pa.float64(), 2, function="f")


def test_strings_for_double_are_refused() -> None:
    """Strings returned for a double are refused, saying numbers were expected."""
    with pytest.raises(ModelApplyError, match=r"got values of type string for return type double; return numbers"):
        to_result_array(np.array(["a", "b"]), pa.float64(), 2, function="f")


def test_numbers_for_string_are_refused() -> None:
    """Numbers returned for a string are refused, saying strings were expected."""
    with pytest.raises(ModelApplyError, match=r"return strings or change return_type"):
        to_result_array(np.array([1.0]), pa.string(), 1, function="f")


def test_fractional_floats_for_bigint_are_refused() -> None:
    """Floats with a fraction do not silently truncate into bigint."""
    with pytest.raises(ModelApplyError, match=r"values of type double do not fit return type int64.*round or clip"):
        to_result_array(np.array([1.0, 2.5]), pa.int64(), 2, function="f")


def test_integral_floats_for_bigint_are_accepted() -> None:
    """Floats holding whole numbers convert to bigint."""
    out = to_result_array(np.array([1.0, 2.0, -3.0]), pa.int64(), 3, function="f")
    assert out.type == pa.int64() and out.to_pylist() == [1, 2, -3]


def test_float32_result_for_double() -> None:
    """A float32 result widens to double."""
    out = to_result_array(np.array([0.5, 1.5], np.float32), pa.float64(), 2, function="f")
    assert out.type == pa.float64() and out.to_pylist() == [0.5, 1.5]


def test_bool_and_string_results() -> None:
    """Boolean and string results keep their declared types."""
    assert to_result_array(np.array([True, False]), pa.bool_(), 2, function="f").to_pylist() == [True, False]
    out = to_result_array(["x", "yz"], pa.string(), 2, function="f")
    assert out.type == pa.string() and out.to_pylist() == ["x", "yz"]


def test_python_list_with_none_gives_nulls() -> None:
    """None in a list result becomes a null value."""
    out = to_result_array([1.0, None], pa.float64(), 2, function="f")
    assert out.to_pylist() == [1.0, None]


def test_arrow_array_result_is_cast() -> None:
    """An Arrow array result is cast to the return type."""
    out = to_result_array(pa.array([1, 2], pa.int32()), pa.int64(), 2, function="f")
    assert out.type == pa.int64() and out.to_pylist() == [1, 2]


def test_array_double_from_2d_ndarray() -> None:
    """A (rows, k) ndarray becomes array<double>, one k-list per row, with the declared type."""
    result = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = to_result_array(result, SPARK_ARRAY_DOUBLE, 2, function="f")
    assert out.type == SPARK_ARRAY_DOUBLE
    assert out.to_pylist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_array_of_non_nullable_float_keeps_the_declared_field() -> None:
    """The result type equals a Spark type with a non-nullable element, exactly."""
    t = pa.list_(pa.field("element", pa.float32(), nullable=False))
    out = to_result_array(np.ones((3, 2)), t, 3, function="f")
    assert out.type == t


def test_nested_array_from_3d_ndarray() -> None:
    """A (rows, a, b) ndarray becomes array<array<double>>."""
    t = pa.list_(pa.field("element", SPARK_ARRAY_DOUBLE))
    result = np.arange(8, dtype=np.float64).reshape(2, 2, 2)
    out = to_result_array(result, t, 2, function="f")
    assert out.type == t and out.to_pylist() == result.tolist()


def test_array_from_2d_ndarray_with_zero_width() -> None:
    """A (rows, 0) ndarray gives one empty array per row."""
    out = to_result_array(np.ones((2, 0)), SPARK_ARRAY_DOUBLE, 2, function="f")
    assert out.to_pylist() == [[], []]


def test_array_double_from_list_of_arrays() -> None:
    """A list of 1-D arrays (lengths may differ) becomes array<double>; None gives a null row."""
    result = [np.array([1.0, 2.0]), np.array([3.0], np.float32), None]
    out = to_result_array(result, SPARK_ARRAY_DOUBLE, 3, function="f")
    assert out.type == SPARK_ARRAY_DOUBLE
    assert out.to_pylist() == [[1.0, 2.0], [3.0], None]


def test_1d_result_for_array_type_is_refused() -> None:
    """A 1-D numeric result for an array type is refused with the fix."""
    with pytest.raises(ModelApplyError, match=r"got a 1-D array for return type.*2-D array"):
        to_result_array(np.ones(2), SPARK_ARRAY_DOUBLE, 2, function="f")


def test_list_of_scalars_for_array_type_is_refused() -> None:
    """Plain numbers in a list for an array type are refused, naming what arrived."""
    with pytest.raises(ModelApplyError, match=r"got double for return type"):
        to_result_array([1.0, 2.0], SPARK_ARRAY_DOUBLE, 2, function="f")


def test_arrow_list_result_of_wrong_values_is_refused() -> None:
    """An Arrow list of unparseable strings for array<double> is a ModelApplyError, not a raw Arrow error."""
    with pytest.raises(ModelApplyError, match=r"cannot build"):
        to_result_array(pa.array([["x"]]), SPARK_ARRAY_DOUBLE, 1, function="f")


STRUCT = pa.struct([("label", pa.int64()), ("scores", SPARK_ARRAY_DOUBLE)])


def test_struct_from_dict() -> None:
    """A dict of per-field results becomes a struct array of the declared type."""
    result = {"scores": np.array([[0.1, 0.9], [0.8, 0.2]]), "label": np.array([1.0, 0.0]), "extra": 1}
    out = to_result_array(result, STRUCT, 2, function="f")
    assert out.type == STRUCT
    assert out.to_pylist() == [
        {"label": 1, "scores": [0.1, 0.9]},
        {"label": 0, "scores": [0.8, 0.2]},
    ]


def test_struct_from_dataframe() -> None:
    """A pandas DataFrame with one column per field becomes a struct array."""
    t = pa.struct([("a", pa.float64()), ("b", pa.string())])
    df = pd.DataFrame({"b": ["x", "y"], "a": [1, 2]})
    out = to_result_array(df, t, 2, function="f")
    assert out.type == t and out.to_pylist() == [{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}]


def test_struct_missing_field_is_refused() -> None:
    """A struct result without a declared field names the missing field and what it has."""
    with pytest.raises(ModelApplyError, match=r"fields \['scores'\] of return type .* are missing from the result \(it has \['label'\]\)"):
        to_result_array({"label": np.array([1])}, STRUCT, 1, function="f")


def test_struct_field_of_wrong_length_names_the_field() -> None:
    """A struct field with the wrong number of values is refused naming the field."""
    with pytest.raises(ModelApplyError, match=r"field 'label': expected 2 values"):
        to_result_array({"label": np.array([1]), "scores": np.ones((2, 2))}, STRUCT, 2, function="f")


def test_struct_from_ndarray_is_refused() -> None:
    """A plain array for a struct return type is refused with the fix."""
    with pytest.raises(ModelApplyError, match=r"needs a dict of arrays or a pandas DataFrame.*got ndarray"):
        to_result_array(np.ones(2), STRUCT, 2, function="f")


def test_pandas_series_result() -> None:
    """A pandas Series result converts like its values."""
    out = to_result_array(pd.Series([3, 4]), pa.float64(), 2, function="f")
    assert out.type == pa.float64() and out.to_pylist() == [3.0, 4.0]


def test_skip_policy_scatters_nulls() -> None:
    """Under 'skip' the result holds values for kept rows and nulls for the skipped ones."""
    kept = np.array([False, True, True, False, True])
    out = to_result_array(np.array([10.0, 20.0, 30.0]), pa.float64(), 5, function="f", kept=kept)
    assert out.to_pylist() == [None, 10.0, 20.0, None, 30.0]


def test_skip_policy_scatters_nulls_into_arrays_and_structs() -> None:
    """Null scattering works for array and struct return types too."""
    kept = np.array([True, False, True])
    arrays = to_result_array(np.array([[1.0], [2.0]]), SPARK_ARRAY_DOUBLE, 3, function="f", kept=kept)
    assert arrays.to_pylist() == [[1.0], None, [2.0]]
    structs = to_result_array(
        {"label": [1, 2], "scores": np.ones((2, 1))}, STRUCT, 3, function="f", kept=kept
    )
    assert structs.to_pylist() == [{"label": 1, "scores": [1.0]}, None, {"label": 2, "scores": [1.0]}]


def test_skip_policy_expects_one_value_per_kept_row() -> None:
    """Under 'skip' a result with one value per batch row (not per kept row) is refused."""
    kept = np.array([True, False, True])
    with pytest.raises(ModelApplyError, match=r"expected 2 values"):
        to_result_array(np.ones(3), pa.float64(), 3, function="f", kept=kept)


@pytest.mark.parametrize(
    "t",
    [
        pa.float64(),
        pa.float32(),
        pa.int64(),
        pa.int32(),
        pa.bool_(),
        pa.string(),
        SPARK_ARRAY_DOUBLE,
        pa.list_(pa.list_(pa.float32())),
        pa.struct([("a", pa.float64()), ("b", pa.list_(pa.int32())), ("c", pa.string())]),
    ],
    ids=str,
)
def test_check_return_type_accepts(t: pa.DataType) -> None:
    """Numbers, booleans, strings, arrays and structs of those are accepted."""
    assert check_return_type(t) is None


@pytest.mark.parametrize(
    ("t", "named"),
    [
        (pa.timestamp("us", tz="UTC"), "return_type timestamp[us, tz=UTC] is not supported"),
        (pa.decimal128(10, 2), "return_type decimal128(10, 2) is not supported"),
        (pa.binary(), "return_type binary is not supported"),
        (pa.map_(pa.string(), pa.float64()), "is not supported"),
        (pa.list_(pa.date32()), "return_type date32[day] is not supported"),
        (pa.struct([("ok", pa.float64()), ("when", pa.timestamp("us"))]), "return_type field 'when' timestamp[us]"),
    ],
    ids=["timestamp", "decimal", "binary", "map", "array-of-date", "struct-field"],
)
def test_check_return_type_refuses(t: pa.DataType, named: str) -> None:
    """Unsupported return types are refused naming the offending type (and field) and the options."""
    with pytest.raises(TypeError) as info:
        check_return_type(t)
    assert named in str(info.value)
    assert "use double, float, bigint" in str(info.value)


def test_empty_result_has_the_return_type() -> None:
    """empty_result gives a zero-length array of the declared type."""
    out = empty_result(STRUCT)
    assert len(out) == 0 and out.type == STRUCT


@pytest.mark.parametrize(
    ("series", "return_type", "expected"),
    [
        (pd.Series([1, None, 3], dtype="Int64"), pa.int64(), [1, None, 3]),
        (pd.Series([1, None, 3], dtype="Int64"), pa.float64(), [1.0, None, 3.0]),
        (pd.Series([True, None, False], dtype="boolean"), pa.bool_(), [True, None, False]),
        (pd.Series(["a", None, "c"], dtype="string"), pa.string(), ["a", None, "c"]),
        (pd.Series([0.5, float("nan"), 2.0]), pa.float64(), [0.5, float("nan"), 2.0]),
    ],
)
def test_pandas_nullable_results_become_nulls(series, return_type, expected):
    """pandas' nullable dtypes: <NA> is null; a plain float NaN stays NaN (it is a value)."""
    got = to_result_array(series, return_type, 3, function="f").to_pylist()
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, float) and np.isnan(e):
            assert isinstance(g, float) and np.isnan(g)
        else:
            assert g == e
