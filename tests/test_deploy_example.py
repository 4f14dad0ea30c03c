"""
examples/deploy/ stays valid: the Kubernetes Deployment and the Dockerfile parse and
agree with each other and with the library (probes, port, resource limits, the
seed's RESILIENCE_* variables), and the example service answers its probes over
real HTTP.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from resilient.manager import ENV_VARS, ResilienceConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
#: The variables the library reads besides the manager's.
LIBRARY_VARS = frozenset({"RESILIENCE_POLICY_FILE"})


def deployment() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "deployment.yaml").read_text()))
    [found] = [d for d in documents if d["kind"] == "Deployment"]
    return found


def container() -> dict[str, Any]:
    [only] = deployment()["spec"]["template"]["spec"]["containers"]
    return only


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def docker(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def docker_env() -> dict[str, str]:
    found: dict[str, str] = {}
    for rest in docker("ENV"):
        for pair in shlex.split(rest):
            name, _, value = pair.partition("=")
            found[name] = value
    return found


def container_port() -> int:
    [port] = container()["ports"]
    assert port["name"] == "http"
    value: int = port["containerPort"]
    return value


# --------------------------------------------------------------------------- Kubernetes


def test_deployment_selects_its_pods() -> None:
    spec = deployment()["spec"]
    assert deployment()["apiVersion"] == "apps/v1"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["replicas"] >= 2


@pytest.mark.parametrize(
    ("probe", "path"), [("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")]
)
def test_probes(probe: str, path: str) -> None:
    get = container()[probe]["httpGet"]
    assert get["path"] == path
    assert get["port"] in ("http", container_port())
    assert container()[probe]["timeoutSeconds"] < container()[probe]["periodSeconds"]


def test_resource_requests_and_limits() -> None:
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind
    assert _millicores(resources["requests"]["cpu"]) <= _millicores(resources["limits"]["cpu"])
    assert _mebibytes(resources["requests"]["memory"]) <= _mebibytes(resources["limits"]["memory"])


def _millicores(text: str) -> float:
    return float(text[:-1]) if text.endswith("m") else float(text) * 1000


def _mebibytes(text: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(text[:-2]) * units[text[-2:]]


def test_environment_is_the_seeds_variables() -> None:
    env = {e["name"]: e for e in container()["env"]}
    resilience = {name for name in env if name.startswith("RESILIENCE_")}
    assert resilience <= set(ENV_VARS) | LIBRARY_VARS, resilience - set(ENV_VARS)
    # the settings a deployment must decide are there
    assert {
        "RESILIENCE_SERVICE_NAME",
        "RESILIENCE_ENVIRONMENT",
        "RESILIENCE_REDIS_URL",
        "RESILIENCE_HEALTH_MONITORING_ENABLED",
        "RESILIENCE_HEALTH_CHECK_INTERVAL",
        "RESILIENCE_PROMETHEUS_ENABLED",
    } <= resilience
    assert "secretKeyRef" in env["RESILIENCE_REDIS_URL"]["valueFrom"]  # never a literal


def test_environment_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    literal = {e["name"]: e["value"] for e in container()["env"] if "value" in e}
    for name, value in literal.items():
        assert isinstance(value, str), f"{name}: quote the value, Kubernetes needs strings"
        monkeypatch.setenv(name, value)
    config = ResilienceConfig()
    assert config.service_name == "orders"
    assert config.environment == "production"
    assert config.health_monitoring_enabled is True
    assert config.health_check_interval == float(literal["RESILIENCE_HEALTH_CHECK_INTERVAL"])
    assert literal["RESILIENCE_POLICY_FILE"] == docker_env()["RESILIENCE_POLICY_FILE"]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_user_and_files() -> None:
    [base] = docker("FROM")
    assert base.startswith("python:3.1")
    [user] = docker("USER")
    assert user not in ("root", "0")
    assert int(user) == deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    for copy in docker("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (DEPLOY / source).is_file(), source
    [install] = docker("RUN")[:1]
    assert "resilient-policies[server," in install


def test_dockerfile_runs_the_example_app_on_the_probed_port() -> None:
    [exposed] = docker("EXPOSE")
    assert int(exposed) == container_port()
    [cmd] = docker("CMD")
    argv = json.loads(cmd)  # the exec form: signals reach uvicorn, not a shell
    assert argv[0] == "uvicorn"
    module, _, attribute = argv[1].partition(":")
    tree = ast.parse((DEPLOY / f"{module}.py").read_text())
    bound = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    } | {node.name for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef)}
    assert attribute in bound
    assert int(argv[argv.index("--port") + 1]) == container_port()
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_dockerfile_environment_is_known() -> None:
    env = docker_env()
    resilience = {n for n in env if n.startswith("RESILIENCE_")}
    assert resilience <= set(ENV_VARS) | LIBRARY_VARS
    assert env["RESILIENCE_POLICY_FILE"] == "/app/" + "resilience.yaml"


def test_policy_file_is_valid() -> None:
    from resilient.policy import load_file

    policies = load_file(DEPLOY / "resilience.yaml", env=None)
    assert {"database", "payments"} <= set(policies)


# --------------------------------------------------------------------------- it runs


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_example_service_answers_its_probes(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENCE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        RESILIENCE_POLICY_FILE=str(DEPLOY / "resilience.yaml"),
        RESILIENCE_SERVICE_NAME="orders",
        RESILIENCE_HEALTH_CHECK_INTERVAL="1",
    )
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "service:app", "--port", str(port)),
            *("--log-level", "warning", "--app-dir", str(DEPLOY)),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                live = _get(base + "/health/live")
                break
            except OSError:
                assert time.monotonic() < deadline, "the example did not answer in 30 s"
                time.sleep(0.05)
        ready = _get(base + "/health/ready?refresh=1")
        health = _get(base + "/health")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert live == (200, {"status": "pass", "serviceId": "orders"})
    assert ready[0] == 200, ready
    assert ready[1]["status"] == "pass", ready
    assert {key.partition(":")[0] for key in health[1]["checks"]} == {"database", "payments"}
    assert "Traceback" not in stderr, stderr
