"""Session-wide fixtures: a Delta-enabled local Spark and a local Ray (see spark_ray_udf.testing).

Test modules pass functions defined in ``tests/helpers.py`` as ``init_func``/``apply_func``.
Ray pickles such functions by reference (``tests.helpers.apply_...``), so the Ray worker
processes must be able to import the ``tests`` package: the repository root goes on
``PYTHONPATH`` here, before Spark or Ray start, and their worker processes inherit it (Ray
also adds the driver's working directory, but only when pytest runs from the repository root).
"""

import os
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p
    )

# The fixtures spark, ray_address and ray_model. An installed spark-ray-udf registers this plugin
# through its pytest11 entry point under this same name, and pytest then skips it here; a
# checkout whose installed metadata predates the entry point still gets the fixtures.
pytest_plugins = ["spark_ray_udf.testing"]
