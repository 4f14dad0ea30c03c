"""The ``resilient`` command: validate, schema, show, demo."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from resilient import _demo
from resilient.cli import main, policy_file_schema
from resilient.events import bus
from resilient.pipeline import _reset_breakers
from resilient.policy import load_file, registry

GOOD = """\
version: 1
policies:
  default:
    retry: {max_attempts: 3, strategy: exponential_backoff, base_delay: 0.1, jitter: true}
    circuit_breaker: {failure_threshold: 5, timeout_seconds: 30}
  broker:
    extends: default
    circuit_breaker: {failure_threshold: 2, timeout_seconds: 10}
    retry: {max_attempts: 2, base_delay: 0.5, retry_on: [ConnectionError, TimeoutError]}
    timeout: {per_attempt: 2.0, total: 5.0}
"""

TYPO = """\
version: 1
policies:
  broker:
    retry:
      max_atempts: 3
"""

TWO_PROBLEMS = """\
version: 1
policies:
  broker:
    retry: {max_attempts: 0}
    circuit_breaker:
      failure_treshold: 2
"""


@pytest.fixture(autouse=True)
def _clean_global_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The demo loads policies and creates breakers process-wide: undo that."""
    for var in [v for v in os.environ if v.startswith("RESILIENCE_")]:
        monkeypatch.delenv(var)
    registry.clear()
    _reset_breakers()
    yield
    registry.clear()
    _reset_breakers()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- usage


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "validate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["validate"],
        ["show"],
        ["demo", "--duration", "0"],
        ["demo", "--duration", "soon"],
        ["schema", "--bogus"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: resilient" in capsys.readouterr().err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("validate", "schema", "show", "demo"):
        assert command in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("resilient ")


def test_python_dash_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "resilient", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: resilient")
    assert "demo" in done.stdout


# --------------------------------------------------------------------------- validate


def test_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["validate", path]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"ok {path} (2 policies: default, broker)\n"
    assert captured.err == ""


def test_validate_does_not_replace_the_active_policies(tmp_path: Path) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["validate", path]) == 0
    assert not registry.loaded


def test_validate_typo_suggests_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", TYPO)
    assert main(["validate", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}:5" in captured.err
    assert "policies.broker.retry.max_atempts" in captured.err
    assert "did you mean 'max_attempts'?" in captured.err


def test_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", TWO_PROBLEMS)
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert f"{path}:4" in err
    assert "max_attempts" in err
    assert "did you mean 'failure_threshold'?" in err


def test_validate_several_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", GOOD)
    bad = write(tmp_path, "bad.yaml", TYPO)
    missing = str(tmp_path / "missing.yaml")
    assert main(["validate", good, bad, missing]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"ok {good} (2 policies: default, broker)\n"
    assert f"{bad}:5" in captured.err
    assert f"{missing}: cannot read policy file" in captured.err
    assert "2 of 3 files invalid" in captured.err
    assert main(["validate", good, good]) == 0


def test_validate_pyproject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        "pyproject.toml",
        "[tool.resilient]\nversion = 1\n[tool.resilient.policies.db]\nretry = {max_attempts = 2}\n",
    )
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out == f"ok {path} (1 policy: db)\n"


def test_validate_applies_env_overrides_unless_no_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    monkeypatch.setenv("RESILIENCE_POLICY__BROKER__RETRY__MAX_ATTEMPTS", "0")
    assert main(["validate", path]) == 1
    assert "RESILIENCE_POLICY__BROKER__RETRY__MAX_ATTEMPTS" in capsys.readouterr().err
    assert main(["validate", "--no-env", path]) == 0


# --------------------------------------------------------------------------- schema


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _resolve(schema: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = schema
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_schema_is_json_with_every_policy_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"]
    assert "yaml-language-server" in schema["description"]
    assert schema["properties"]["version"]["const"] == 1
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    policy = defs["Policy"]
    assert set(policy["properties"]) >= {
        "description",
        "circuit_breaker",
        "retry",
        "timeout",
        "fallback",
        "extends",
    }
    assert policy["additionalProperties"] is False
    breaker = defs["CircuitBreakerConfig"]["properties"]
    assert {"failure_threshold", "timeout_seconds", "success_threshold"} <= set(breaker)
    retry = defs["RetryConfig"]["properties"]
    assert {"max_attempts", "base_delay", "strategy", "jitter", "retry_on"} <= set(retry)
    assert "retry_if_exception" not in retry  # Python-only, not in files
    # exception-class defaults are rendered as names, not dropped with a warning
    # retry_on's default depends on the HTTP clients installed: described, not fixed
    assert "httpx" in retry["retry_on"]["description"]
    assert breaker["record_exceptions"]["default"] == ["Exception"]


def test_schema_is_structurally_valid() -> None:
    schema = policy_file_schema()
    json.dumps(schema)  # serialisable
    types = {"object", "array", "string", "number", "integer", "boolean", "null"}
    for node in _walk(schema):
        if "$ref" in node:
            assert isinstance(_resolve(schema, node["$ref"]), dict)
        kind = node.get("type")
        if isinstance(kind, str):
            assert kind in types
        elif isinstance(kind, list):
            assert set(kind) <= types
        for key in ("anyOf", "oneOf", "allOf", "enum"):
            if key in node:
                assert isinstance(node[key], list)
                assert node[key]


def test_schema_describes_the_loader_shorthands() -> None:
    defs = policy_file_schema()["$defs"]
    jitter = defs["RetryConfig"]["properties"]["jitter"]
    assert {"type": "boolean"} in [{"type": s.get("type")} for s in jitter["anyOf"]]
    retry_on = defs["RetryConfig"]["properties"]["retry_on"]
    assert {s["type"] for s in retry_on["anyOf"]} == {"array", "string"}
    fallback = defs["Policy"]["properties"]["fallback"]
    assert any("not" in s for s in fallback["anyOf"])


def test_schema_validates_policy_files_with_jsonschema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = policy_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(GOOD)))
    assert list(validator.iter_errors(yaml.safe_load(TYPO)))


def test_schema_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "resilience.schema.json"
    assert main(["schema", "--output", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(target.read_text(encoding="utf-8")) == policy_file_schema()
    assert main(["schema", "-o", str(tmp_path / "no" / "such" / "dir.json")]) == 1


# --------------------------------------------------------------------------- show


def test_show_resolves_extends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["show", path, "broker"]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert list(document["policies"]) == ["broker"]
    broker = document["policies"]["broker"]
    assert "extends" not in broker
    assert broker["circuit_breaker"]["failure_threshold"] == 2  # own value
    assert broker["circuit_breaker"]["timeout_seconds"] == 10
    assert broker["retry"]["strategy"] == "exponential_backoff"  # inherited
    assert broker["retry"]["jitter"] is True  # as written
    assert broker["retry"]["max_attempts"] == 2
    assert broker["retry"]["retry_on"] == ["ConnectionError", "TimeoutError"]  # names
    assert broker["circuit_breaker"]["record_exceptions"] == ["Exception"]
    assert broker["fallback"] is None


def test_show_all_policies_keeps_file_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["show", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ")
    assert "fallback: null" in out
    assert list(yaml.safe_load(out)["policies"]) == ["default", "broker"]


def test_show_output_is_a_valid_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["show", path]) == 0
    resolved = write(tmp_path, "resolved.yaml", capsys.readouterr().out)
    assert load_file(resolved, env=None) == load_file(path, env=None)


def test_show_applies_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    monkeypatch.setenv("RESILIENCE_POLICY__BROKER__RETRY__MAX_ATTEMPTS", "7")
    monkeypatch.setenv("RESILIENCE_POLICY__BROKER__CIRCUIT_BREAKER__TIMEOUT_SECONDS", "42")
    assert main(["show", path, "broker", "--json"]) == 0
    broker = json.loads(capsys.readouterr().out)["policies"]["broker"]
    assert broker["retry"]["max_attempts"] == 7
    assert broker["circuit_breaker"]["timeout_seconds"] == 42
    assert main(["show", "--no-env", path, "broker", "--json"]) == 0
    broker = json.loads(capsys.readouterr().out)["policies"]["broker"]
    assert broker["retry"]["max_attempts"] == 2


def test_show_unknown_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", GOOD)
    assert main(["show", path, "brokr"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown policy 'brokr'" in captured.err
    assert "did you mean 'broker'?" in captured.err
    assert "known policies: default, broker" in captured.err


def test_show_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "resilience.yaml", TYPO)
    assert main(["show", path]) == 1
    assert "did you mean 'max_attempts'?" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo


def test_service_follows_its_script() -> None:
    service = _demo.FlakyService(10.0, random.Random(1), start=0.0)
    assert service.phase_at(0.0)[0].name == "healthy"
    assert service.phase_at(3.0)[0].name == "degrading"
    assert service.phase_at(5.0)[0].name == "outage"
    assert service.phase_at(9.9)[0].name == "recovery"
    phase, progress = service.phase_at(3.5)
    assert phase.name == "degrading"
    assert 0 < progress < 1
    assert [p.start for p in _demo.PHASES] == sorted(p.start for p in _demo.PHASES)
    assert all(p.failure == (1.0, 1.0) for p in _demo.PHASES if p.name == "outage")


def test_demo_policies_are_valid() -> None:
    from resilient.policy import parse_policies

    for duration in (1.0, 2.0, 15.0, 600.0):
        policies = parse_policies(_demo.demo_policies(duration))
        assert set(policies) == {"broker", "database", "api"}
        assert policies["api"].circuit_breaker is None


def test_demo_shows_transitions_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["demo", "--duration", "2", "--seed", "3"]) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"the demo took {elapsed:.2f} s"
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("resilient demo: 2 s")
    assert "seed 3" in lines[0]
    # the outage always opens the broker's breaker
    assert any("] broker breaker closed -> open" in line for line in lines), out
    assert any("service: outage" in line for line in lines)
    assert any(line.startswith("[ 1.0s] ") and "|" in line for line in lines)  # per second
    header = next(i for i, line in enumerate(lines) if line.startswith("policy"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 5]}
    assert set(rows) == {"broker", "database", "api"}
    broker = rows["broker"]
    calls, ok, failed, fallback, rejected = (int(v) for v in broker[1:6])
    assert calls >= 20
    assert ok + failed + fallback + rejected == calls
    assert int(broker[8]) >= 1  # transitions
    assert broker[9] in {"closed", "open", "half-open"}
    assert rows["api"][9] == "-"  # no breaker
    assert int(rows["database"][4]) >= 1  # the fallback answered
    # the demo unsubscribed from the event bus
    assert not bus.active


def test_demo_quiet_prints_only_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--duration", "1", "--seed", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "breaker closed" not in out
    assert "|" not in out
    assert "summary after" in out
    assert "broker" in out


def test_simulate_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`resilient simulate` runs a file's policy against a scenario in virtual time."""
    path = tmp_path / "resilience.yaml"
    path.write_text(
        "version: 1\npolicies:\n  broker:\n"
        "    retry: {max_attempts: 2, base_delay: 0.1}\n"
        "    circuit_breaker: {failure_threshold: 3, timeout_seconds: 5}\n"
    )
    code = main(
        ["simulate", str(path), "--policy", "broker", "--scenario", "outage", "--duration", "30"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "closed -> open" in out
    assert "rejected by breaker" in out


# --------------------------------------------------------------------------- every command


@pytest.mark.parametrize("command", ["validate", "schema", "show", "demo", "status", "simulate"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`resilient COMMAND --help` works for every command (simulate's help has '%' in it)."""
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: resilient {command}" in out
    if command == "simulate":
        assert "30% errors" in out


def test_schema_accepts_what_the_loader_accepts(tmp_path: Path) -> None:
    """redis_url and backend at the top level validate against the schema, as they load."""
    jsonschema = pytest.importorskip("jsonschema")
    text = GOOD + "redis_url: null\nbackend: {key_prefix: app1, on_backend_failure: open}\n"
    load_file(write(tmp_path, "resilience.yaml", text), env=None)  # the loader accepts it
    validator = jsonschema.Draft202012Validator(policy_file_schema())
    assert not list(validator.iter_errors(yaml.safe_load(text)))
    bad = GOOD + "backend: {on_backend_failure: sometimes}\n"
    assert list(validator.iter_errors(yaml.safe_load(bad)))


def test_one_schema_function() -> None:
    """`resilient schema` prints the models' schema: there is one generator, not two."""
    from resilient import _models

    assert policy_file_schema is _models.policy_file_schema


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("localhost:6379", id="no-scheme"),
        pytest.param("htp://localhost:6379", id="bad-scheme"),
        pytest.param("redis://:s3cret@localhost:99999/0", id="bad-port-with-password"),
        pytest.param("redis://[::1", id="unclosed-bracket"),
    ],
)
def test_status_malformed_url_is_a_clear_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed --redis URL is one line on stderr and exit 1: no traceback, no password."""
    assert main(["status", "--redis", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resilient status: --redis: ")
    assert "Traceback" not in err
    assert "s3cret" not in err
    assert len(err.strip().splitlines()) == 1


def test_status_without_any_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No --redis, no RESILIENCE_REDIS_URL and no redis_url in the file: say where to put one."""
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "--redis" in err
    assert "RESILIENCE_REDIS_URL" in err


def test_status_unreachable_redis_hides_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable server is reported with the URL's credentials redacted."""
    pytest.importorskip("redis")
    assert main(["status", "--redis", "redis://user:s3cret@127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "127.0.0.1:1" in err


def _seed_state(url: str, prefix: str, policy: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.hset(f"{{{prefix}:{policy}}}:state", mapping={"s": "closed", "g": 7, "t": 2})
    finally:
        client.close()


def test_status_reads_resilience_redis_url(
    server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """RESILIENCE_REDIS_URL is used when --redis is not given."""
    _seed_state(server.url, "envprefix", "svc")
    monkeypatch.setenv("RESILIENCE_REDIS_URL", server.url)
    assert main(["status", "--prefix", "envprefix", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["url"] == server.url
    assert status["policies"]["svc"]["generation"] == 7


def test_status_reads_the_policy_files_backend(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The discovered policy file's redis_url and backend.key_prefix are used."""
    _seed_state(server.url, "fileprefix", "orders")
    write(
        tmp_path,
        "resilience.yaml",
        f"version: 1\nredis_url: {server.url}\nbackend: {{key_prefix: fileprefix}}\n",
    )
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(server.url)
    assert "orders" in out
    assert "generation 7, trips 2" in out


def test_status_invalid_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid FILE given to status is reported like `validate` does."""
    path = write(tmp_path, "bad.yaml", "version: 1\nredis_url: localhost:6379\n")
    assert main(["status", path]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:2" in err
    assert "Traceback" not in err
