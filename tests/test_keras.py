"""The built-in Keras pair (init_keras, apply_keras) end to end, find_keras_model, and the
promise that ``import spark_ray_udf`` works without TensorFlow.

Real Spark, Ray, Delta and TensorFlow; each registration starts one actor, which imports
TensorFlow (the slow part).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from spark_ray_udf import ModelInitError, apply_keras, init_keras, register_ray_model, save_model
from spark_ray_udf.builtins import find_keras_model
from tests import helpers
from tests.helpers import features_np, features_sql


class SavedKeras(NamedTuple):
    table: str
    model: Any


@pytest.fixture(scope="module")
def keras_table(spark: Any, ray_address: str, tmp_path_factory: Any) -> SavedKeras:
    """A tiny Keras model (8 inputs -> 4 softmax outputs) saved as model.keras in a table."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input(shape=(helpers.N_FEATURES,)), keras.layers.Dense(4, activation="softmax")]
    )
    model_dir = tmp_path_factory.mktemp("keras") / "model"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    save_model(spark, model_dir, "ai_model.tests_keras")
    return SavedKeras("ai_model.tests_keras", model)


def float_events(spark: Any, n: int, partitions: int = 2) -> Any:
    """``id`` and ``features`` as array<float> (float32 in the actor, as Keras expects)."""
    return spark.range(0, n, 1, partitions).selectExpr(
        "id", f"cast({features_sql()} as array<float>) as features"
    )


def test_keras_predictions_equal_in_process(spark, keras_table):
    """init_keras/apply_keras through SQL give model.predict_on_batch's outputs (array<float>)."""
    with register_ray_model(
        spark, keras_table.table, "keras_predict", init_keras, apply_keras,
        return_type="array<float>", num_actors=1,
    ) as model:
        assert Path(model.actors[0].model_dir, "model.keras").is_file()
        float_events(spark, 200, 3).createOrReplaceTempView("keras_events")
        rows = spark.sql(
            "select id, keras_predict(features) as probs from keras_events order by id"
        ).collect()
    x = features_np([r.id for r in rows]).astype(np.float32)
    want = np.asarray(keras_table.model.predict_on_batch(x))
    got = np.array([r.probs for r in rows], dtype=np.float32)
    assert got.shape == (200, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)  # softmax rows


def test_keras_argmax_variant(spark, keras_table):
    """An apply_func wrapping apply_keras with argmax returns each row's class (int)."""
    with register_ray_model(
        spark, keras_table.table, "keras_class", init_keras, helpers.apply_keras_argmax,
        return_type="int", num_actors=1,
    ) as model:
        rows = float_events(spark, 200, 2).select("id", model("features").alias("label")).collect()
    x = features_np([r.id for r in rows]).astype(np.float32)
    want = np.asarray(keras_table.model.predict_on_batch(x)).argmax(axis=1)
    assert [r.label for r in rows] == want.tolist()
    assert len(set(want.tolist())) > 1  # the comparison is not trivially constant


def test_init_keras_on_a_table_without_keras_files(spark, linear_table):
    """init_keras on a non-Keras model: ModelInitError with find_keras_model's fix, fast."""
    with pytest.raises(ModelInitError) as info:
        register_ray_model(
            spark, linear_table.table, "keras_wrong", init_keras, apply_keras, num_actors=1,
        )
    text = str(info.value)
    assert "keras_wrong: init_func spark_ray_udf.builtins.init_keras raised on actor 0" in text
    assert "no .keras/.h5 file and no saved_model.pb" in text
    assert "model.save('model.keras')" in text


# --- find_keras_model: no Spark, no Ray, no TensorFlow -------------------------------------------


def _touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def test_find_keras_model_single_file(tmp_path):
    """The only .keras file, at the top or in a subfolder, and an .h5 file are found."""
    assert find_keras_model(str(_touch(tmp_path / "a", "m.keras"))) == tmp_path / "a" / "m.keras"
    assert find_keras_model(str(_touch(tmp_path / "b", "sub/m.h5"))) == tmp_path / "b" / "sub" / "m.h5"
    assert find_keras_model(str(_touch(tmp_path / "c", "m.keras", "notes.txt"))).name == "m.keras"


def test_find_keras_model_several_files(tmp_path):
    """Two Keras files: refused naming both, unless conf['model_file'] picks one."""
    root = _touch(tmp_path, "a.keras", "old/b.h5")
    with pytest.raises(ModelInitError, match=r"several Keras files \['a.keras', 'old/b.h5'\]") as info:
        find_keras_model(str(root))
    assert "conf={'model_file': ...}" in str(info.value)
    assert find_keras_model(str(root), {"model_file": "old/b.h5"}) == root / "old" / "b.h5"


def test_find_keras_model_missing_conf_file(tmp_path):
    """conf['model_file'] naming a file that is not there is refused, naming it."""
    root = _touch(tmp_path, "a.keras")
    with pytest.raises(ModelInitError, match=r"conf\['model_file'\] 'b.keras' does not exist"):
        find_keras_model(str(root), {"model_file": "b.keras"})


def test_find_keras_model_saved_model_and_empty(tmp_path):
    """A SavedModel folder is the folder itself; an empty folder is refused with the fix."""
    saved = _touch(tmp_path / "saved", "saved_model.pb", "variables/variables.index")
    assert find_keras_model(str(saved)) == saved
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelInitError, match="no .keras/.h5 file and no saved_model.pb") as info:
        find_keras_model(str(tmp_path / "empty"))
    assert "model.save('model.keras')" in str(info.value)


def test_import_without_tensorflow():
    """import spark_ray_udf works when TensorFlow cannot be imported; init_keras names the extra."""
    code = """
        import sys
        sys.modules["tensorflow"] = None  # any "import tensorflow" now raises ImportError
        import spark_ray_udf
        from spark_ray_udf import init_keras
        print("keras" in sys.modules)
        try:
            init_keras(sys.argv[1], {})
        except ImportError as exc:
            print("ImportError:", exc)
    """
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "m.keras").write_bytes(b"")
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), d],
            env=helpers.subprocess_env(), capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "False"
    assert lines[1] == (
        "ImportError: init_keras needs TensorFlow: pip install 'spark-ray-udf[tensorflow]'"
    )


def test_import_does_not_load_tensorflow():
    """A plain import spark_ray_udf leaves TensorFlow unimported (it is only needed by init_keras)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, spark_ray_udf; print('tensorflow' in sys.modules)"],
        env=helpers.subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
