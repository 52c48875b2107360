"""docs/types.md's input table, row by row, through a real registered function."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_ray_udf import RayModel, register_ray_model
from spark_ray_udf.testing import init_linear
from tests.typeprobe import describe

DOC = Path(__file__).resolve().parent.parent / "docs" / "types.md"


def documented_inputs() -> list[tuple[str, str, str]]:
    """``(spark type, SQL argument, what apply_func receives)`` for each row of the table."""
    text = DOC.read_text()
    table = text.split("<!-- inputs -->", 1)[1].split("<!-- /inputs -->", 1)[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"docs/types.md: a row of the inputs table has {len(cells)} cells: {line}"
        code = [re.fullmatch(r"`(.*)`", c) for c in cells[1:]]
        assert all(code), f"docs/types.md: the argument and what arrives must be `code`: {line}"
        rows.append((cells[0], code[0].group(1), code[1].group(1)))  # type: ignore[union-attr]
    assert len(rows) >= 20, "docs/types.md lost rows of its inputs table"
    return rows


@pytest.fixture(scope="module")
def probe(spark, ray_address, linear_table) -> Iterator[RayModel]:
    with register_ray_model(
        spark, linear_table.table, "types_probe", init_linear, describe, return_type="string",
        num_actors=1,
    ) as model:
        yield model


@pytest.mark.parametrize(("spark_type", "argument", "received"), documented_inputs())
def test_documented_input(spark, probe, spark_type, argument, received):
    """What the doc says ``apply_func`` receives for this argument is what it receives."""
    query = f"select types_probe({argument}) as d from range(3)"
    if received.endswith("Error"):
        with pytest.raises(Exception) as info:
            spark.sql(query).collect()
        assert received in str(info.value), f"{spark_type}: {str(info.value)[-1500:]}"
        assert "types_probe" in str(info.value)
        return
    got = {r.d for r in spark.sql(query).collect()}
    assert got == {received}, f"{spark_type}: {argument}"
