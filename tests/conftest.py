"""Fixtures shared by the integration tests: a linear model saved once in a Delta table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from spark_ray_udf import save_model
from spark_ray_udf.testing import LinearModel, make_linear_model
from tests.helpers import N_CLASSES, N_FEATURES


class SavedLinear(NamedTuple):
    """A linear model saved as version ``version`` of the Delta table ``table``."""

    table: str
    version: int
    model: LinearModel


@pytest.fixture(scope="session")
def linear_table(spark: Any, ray_address: str, tmp_path_factory: Any) -> Iterator[SavedLinear]:
    """The tiny linear model (8 features, 3 classes) saved once in ``ai_model.tests_linear``."""
    model_dir = tmp_path_factory.mktemp("linear") / "model"
    model = make_linear_model(model_dir, n_features=N_FEATURES, n_classes=N_CLASSES, seed=0)
    version = save_model(spark, model_dir, "ai_model.tests_linear")
    yield SavedLinear("ai_model.tests_linear", version, model)
