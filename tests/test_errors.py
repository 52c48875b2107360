"""Every error the library raises is one of its own (errors.py's promise), found by reading the
source: a ``raise`` of a built-in exception class anywhere in ``spark_ray_udf/`` fails here."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
from pathlib import Path

import pytest

import spark_ray_udf
from spark_ray_udf import errors
from spark_ray_udf.errors import SparkRayUdfError

PACKAGE = Path(spark_ray_udf.__file__).parent
# a raise converted into one of ours by the except right after it, or re-raising an error
# that came back from an actor (where it was raised as one of ours)
MARKS = ("# caught below", "# re-raised")


def _raised_classes(path: Path) -> list[tuple[int, str, object]]:
    """``(line, name, object)`` for each ``raise Name(...)`` / ``raise Name`` / ``raise mod.Name``
    in ``path``, the name resolved in the module (or builtins)."""
    module = importlib.import_module(f"spark_ray_udf.{path.stem}" if path.stem != "__init__" else "spark_ray_udf")
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        if any(mark in lines[node.lineno - 1] for mark in MARKS):
            continue
        target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(target, ast.Name):
            name = target.id
            obj = getattr(module, name, getattr(builtins, name, None))
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            name = f"{target.value.id}.{target.attr}"
            owner = getattr(module, target.value.id, None)
            obj = getattr(owner, target.attr, None)
        else:
            continue
        found.append((node.lineno, name, obj))
    return found


def test_every_raise_is_a_spark_ray_udf_error():
    """No module raises a bare built-in (ValueError, TypeError, ImportError, ...) or a class
    outside the hierarchy; functions that build an error must return one of ours."""
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        for line, name, obj in _raised_classes(path):
            if inspect.isclass(obj):
                if not issubclass(obj, SparkRayUdfError):
                    bad.append(f"{path.name}:{line} raises {name}")
            elif callable(obj):  # an error factory: its annotation names what it returns
                ret = inspect.signature(obj).return_annotation
                ret_name = ret if isinstance(ret, str) else getattr(ret, "__name__", "")
                cls = getattr(errors, str(ret_name), None)
                if not (inspect.isclass(cls) and issubclass(cls, SparkRayUdfError)):
                    bad.append(f"{path.name}:{line} raises {name}(), which returns {ret_name!r}")
            # a variable (``raise exc``, ``raise self._error``) re-raises what was caught
    assert bad == []


@pytest.mark.parametrize(
    "name", [n for n in errors.__all__ if inspect.isclass(getattr(errors, n))]
)
def test_each_error_has_a_builtin_base(name):
    """Each subclass of SparkRayUdfError also derives from a built-in a caller would catch."""
    cls = getattr(errors, name)
    if cls is SparkRayUdfError:
        return
    assert any(
        base is not Exception and base.__module__ == "builtins" for base in cls.__mro__[1:]
    ), f"{name} has no built-in base besides Exception"


def test_argument_errors_stay_catchable_as_builtins():
    """register_ray_model's argument checks raise ConfigError(ValueError)/ConfigTypeError(TypeError)."""
    from spark_ray_udf import ConfigError, ConfigTypeError, register_ray_model

    with pytest.raises(ConfigError) as info:
        register_ray_model(None, "t", "not a name", print, print)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigTypeError) as tinfo:
        register_ray_model(None, "t", "ok_name", 1, print)  # type: ignore[arg-type]
    assert isinstance(tinfo.value, TypeError) and isinstance(tinfo.value, ConfigError)
