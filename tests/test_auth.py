"""Ray token auth in Spark's Python workers (``_ray.connect_worker``), against the session's Ray.

The embedded Ray that ``ensure_ray`` starts has Ray's token auth on (Ray 2.60 turns it on for
a cluster ``ray.init`` starts, with the token in ``~/.ray/auth_token``). Each case runs in its
own process, as a Spark Python worker would: Ray's auth config is per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_ray_udf._ray import auth_problem, token_source
from tests import helpers

WORKER = """
import json, os, sys, time
import ray  # imported before connecting, as in a reused Spark Python worker
from spark_ray_udf._ray import connect_worker, ray_auth_mode
before = ray_auth_mode()
start = time.monotonic()
try:
    connect_worker(sys.argv[1], who="auth-test", auth=sys.argv[2])
    out = {"ok": True, "nodes": len(ray.nodes())}
except Exception as exc:
    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
out.update(before=before, after=ray_auth_mode(), seconds=time.monotonic() - start)
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def token_ray(ray_address: str) -> str:
    """The session's Ray, when token auth is on for it (else these tests have nothing to test)."""
    import ray

    from spark_ray_udf._ray import ray_auth_mode

    if ray_auth_mode() != "token":
        pytest.skip(f"the session's Ray runs with auth mode {ray_auth_mode()!r}, not 'token'")
    assert ray.is_initialized()
    return ray_address


def _worker(address: str, auth: str, env: dict[str, str], tmp_path: Path) -> dict[str, object]:
    base = {k: v for k, v in helpers.subprocess_env().items() if not k.startswith("RAY_AUTH")}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run(
        [sys.executable, str(script), address, auth], env={**base, **env},
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"rc {proc.returncode}:\n{proc.stderr[:3000]}"
    return json.loads(lines[0][len("RESULT "):])


def test_worker_that_imported_ray_first_gets_the_drivers_mode(token_ray, tmp_path):
    """Ray imported with RAY_AUTH_MODE unset (mode 'disabled'), then the driver's 'token'
    arrives: the worker switches and connects (setting the variable alone failed after 21 s)."""
    out = _worker(token_ray, "token", {}, tmp_path)
    assert out["before"] == "disabled" and out["after"] == "token"
    assert out["ok"], out


def test_wrong_token_fails_fast_and_says_so(token_ray, tmp_path):
    """A token that is not the cluster's: RayAuthError at once, naming the token's source and
    how to pass the right one (was a bare ConnectionError after ~25 s)."""
    out = _worker(token_ray, "token", {"RAY_AUTH_TOKEN": "0" * 64}, tmp_path)
    assert not out["ok"] and str(out["error"]).startswith("RayAuthError: auth-test: ")
    assert "refused the token from RAY_AUTH_TOKEN (wrong token)" in str(out["error"])
    assert "spark.executorEnv.RAY_AUTH_TOKEN_PATH" in str(out["error"])
    assert float(out["seconds"]) < 10  # type: ignore[arg-type]


def test_missing_token_fails_fast_and_says_so(token_ray, tmp_path):
    """No token anywhere (no variable, an empty HOME): RayAuthError naming the missing token."""
    home = tmp_path / "home"
    home.mkdir()
    out = _worker(token_ray, "token", {"HOME": str(home)}, tmp_path)
    assert not out["ok"] and "(missing token)" in str(out["error"])
    assert "spark.executorEnv.RAY_AUTH_TOKEN" in str(out["error"])
    assert float(out["seconds"]) < 10  # type: ignore[arg-type]


def test_mode_disabled_against_a_token_cluster_says_how(token_ray, tmp_path):
    """A process in mode 'disabled' asking a token cluster: told to set RAY_AUTH_MODE=token."""
    out = _worker(token_ray, "disabled", {}, tmp_path)
    assert not out["ok"] and "RAY_AUTH_MODE is 'disabled'" in str(out["error"])
    assert "set RAY_AUTH_MODE=token" in str(out["error"])


def test_set_auth_mode_reloads_rays_config(tmp_path):
    """The private Ray calls behind set_auth_mode/ray_auth_mode still do what they did (this
    fails when Ray renames or changes them): a process that imported Ray switches mode."""
    code = (
        "import ray\n"
        "from spark_ray_udf._ray import ray_auth_mode, set_auth_mode\n"
        "a = ray_auth_mode(); set_auth_mode('token'); b = ray_auth_mode()\n"
        "set_auth_mode('disabled'); print(a, b, ray_auth_mode())\n"
    )
    env = {k: v for k, v in helpers.subprocess_env().items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["disabled", "token", "disabled"], proc.stderr[-2000:]


def test_token_source_follows_rays_order(tmp_path):
    """RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token; empty files don't count."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    path = tmp_path / "tok"
    path.write_text("")
    assert token_source({}, tmp_path) == str(tmp_path / ".ray" / "auth_token")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path) is None
    path.write_text("t2\n")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path) == str(path)
    assert token_source({"RAY_AUTH_TOKEN": "x", "RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path) == "RAY_AUTH_TOKEN"
    assert token_source({}, tmp_path / "nowhere") is None


def test_auth_problem_names_each_case():
    """Missing token, wrong token and wrong mode each get their own sentence."""
    assert "(missing token)" in auth_problem("h:1", "token", None)
    assert "refused the token from /t (wrong token)" in auth_problem("h:1", "token", "/t")
    assert "RAY_AUTH_MODE is 'unset'" in auth_problem("h:1", "unset", "/t")
