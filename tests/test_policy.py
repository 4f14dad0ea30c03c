"""Policy files: loading, extends, environment overrides, discovery and every bad-input case."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import resilient
from resilient import PolicyError, RetryStrategy
from resilient._models import policy_file_schema
from resilient.policy import discover, load_file, parse_policies, registry


def write(tmp_path: Path, text: str, name: str = "resilience.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


GOOD = """
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


class TestDefaults:
    def test_seed_defaults(self) -> None:
        """The seed's config classes keep their names, fields and defaults."""
        cb = resilient.CircuitBreakerConfig()
        assert (
            cb.failure_threshold,
            cb.success_threshold,
            cb.timeout_seconds,
            cb.half_open_timeout,
            cb.failure_rate_window,
            cb.min_requests_threshold,
            cb.enable_ml_prediction,
            cb.prediction_threshold,
        ) == (5, 3, 60.0, 30.0, 60, 10, True, 0.7)
        rc = resilient.RetryConfig()
        assert (
            rc.max_attempts,
            rc.base_delay,
            rc.max_delay,
            rc.multiplier,
            rc.jitter,
            rc.strategy,
            rc.timeout,
            rc.per_attempt_timeout,
        ) == (3, 1.0, 60.0, 2.0, True, RetryStrategy.EXPONENTIAL_BACKOFF, 60.0, 30.0)
        assert rc.jitter is True
        assert rc.retry_on[:3] == (ConnectionError, TimeoutError, OSError)

    def test_strategy_members(self) -> None:
        """All five strategies exist, and YAML spellings in any case map onto them."""
        assert [m.name for m in RetryStrategy] == [
            "EXPONENTIAL_BACKOFF",
            "LINEAR",
            "FIBONACCI",
            "CONSTANT",
            "ADAPTIVE",
        ]
        assert RetryStrategy("FIBONACCI") is RetryStrategy.FIBONACCI
        assert RetryStrategy("exponential-backoff") is RetryStrategy.EXPONENTIAL_BACKOFF

    def test_absent_section_is_absent(self) -> None:
        """A policy without a section has None there, not a default strategy."""
        policy = resilient.Policy()
        assert policy.retry is None
        assert policy.circuit_breaker is None
        assert policy.per_attempt_timeout is None
        assert policy.total_timeout is None

    def test_models_are_frozen(self) -> None:
        """Policies cannot be changed after they are built."""
        cfg = resilient.RetryConfig()
        with pytest.raises(Exception, match="frozen"):
            cfg.max_attempts = 9  # type: ignore[misc]


class TestLoading:
    def test_extends_merges_deeply(self, tmp_path: Path) -> None:
        """A child overrides single fields of its parent's sections and keeps the rest."""
        policies = resilient.load_policies(write(tmp_path, GOOD))
        broker = policies["broker"]
        assert broker.circuit_breaker is not None
        assert broker.circuit_breaker.failure_threshold == 2
        assert broker.retry is not None
        assert broker.retry.strategy is RetryStrategy.EXPONENTIAL_BACKOFF  # inherited
        assert broker.retry.max_attempts == 2
        assert broker.retry.retry_on == (ConnectionError, TimeoutError)
        assert broker.per_attempt_timeout == 2.0
        assert broker.total_timeout == 5.0

    def test_extends_chain(self) -> None:
        """extends chains through several levels."""
        policies = parse_policies(
            {
                "version": 1,
                "policies": {
                    "a": {"retry": {"max_attempts": 4, "base_delay": 0.2}},
                    "b": {"extends": "a", "retry": {"base_delay": 0.3}},
                    "c": {"extends": "b", "circuit_breaker": {}},
                },
            }
        )
        retry = policies["c"].retry
        assert retry is not None
        assert (retry.max_attempts, retry.base_delay) == (4, 0.3)
        assert policies["c"].circuit_breaker is not None

    def test_dotted_exception_names(self) -> None:
        """retry_on accepts bare builtin names, builtins.X and module paths."""
        policies = parse_policies(
            {
                "version": 1,
                "policies": {
                    "p": {
                        "retry": {
                            "retry_on": [
                                "builtins.ConnectionError",
                                "TimeoutError",
                                "json.JSONDecodeError",
                                "CircuitOpenError",
                            ]
                        }
                    }
                },
            }
        )
        retry = policies["p"].retry
        assert retry is not None
        assert retry.retry_on == (
            ConnectionError,
            TimeoutError,
            json.JSONDecodeError,
            resilient.CircuitOpenError,
        )

    def test_null_switches_timeouts_off(self, tmp_path: Path) -> None:
        """null in YAML turns a timeout off."""
        path = write(
            tmp_path,
            """
            version: 1
            policies:
              p:
                retry: {timeout: null, per_attempt_timeout: null}
            """,
        )
        policy = load_file(path, env=None)["p"]
        assert policy.total_timeout is None
        assert policy.per_attempt_timeout is None

    def test_timeout_section_wins_over_retry_fields(self) -> None:
        """timeout.per_attempt and timeout.total replace the retry section's budgets."""
        policy = resilient.Policy.model_validate(
            {"retry": {"per_attempt_timeout": 9}, "timeout": {"total": 3}}
        )
        assert policy.per_attempt_timeout is None
        assert policy.total_timeout == 3

    def test_static_fallback_value(self) -> None:
        """fallback: accepts a bare value or {value:, on:}."""
        assert resilient.Policy.model_validate({"fallback": []}).fallback is not None
        policy = resilient.Policy.model_validate(
            {"fallback": {"value": {"x": 1}, "on": ["KeyError"]}}
        )
        assert policy.fallback is not None
        assert policy.fallback.value == {"x": 1}
        assert policy.fallback.on == (KeyError,)

    def test_reload_replaces_atomically(self, tmp_path: Path) -> None:
        """A bad file leaves the active policies untouched."""
        resilient.load_policies(write(tmp_path, GOOD))
        broker = resilient.get_policy("broker")
        source = registry.source
        bad = write(tmp_path, "version: 1\npolicies:\n  x: {retry: {max_attempts: 0}}\n", "b.yaml")
        with pytest.raises(PolicyError):
            resilient.load_policies(bad)
        assert registry.source == source
        assert resilient.get_policy("broker") is broker
        assert resilient.policy_names() == ["broker", "default"]

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty file is an empty set of policies."""
        assert load_file(write(tmp_path, ""), env=None) == {}


def problem(tmp_path: Path, text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_file(write(tmp_path, text), env=None)
    return info.value


class TestErrors:
    def test_typo_did_you_mean_with_line(self, tmp_path: Path) -> None:
        """An unknown key names file, line and key path, and suggests the closest key."""
        err = problem(
            tmp_path,
            """
            version: 1
            policies:
              broker:
                circuit_breaker:
                  failure_treshold: 5
            """,
        )
        assert isinstance(err, ValueError)
        assert isinstance(err, resilient.ResilienceError)
        assert err.line == 5
        assert err.key == "policies.broker.circuit_breaker.failure_treshold"
        assert "resilience.yaml:5" in str(err)
        assert "did you mean 'failure_threshold'?" in str(err)

    def test_unknown_section(self, tmp_path: Path) -> None:
        """A misspelt section is caught too."""
        err = problem(tmp_path, "version: 1\npolicies:\n  p:\n    retyr: {}\n")
        assert "did you mean 'retry'?" in str(err)
        assert err.line == 4

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """Top-level keys are checked too."""
        err = problem(tmp_path, "version: 1\npolicy:\n  p: {}\n")
        assert "did you mean 'policies'?" in str(err)

    @pytest.mark.parametrize(
        ("body", "needle"),
        [
            pytest.param("retry: {max_attempts: three}", "valid integer", id="wrong-type"),
            pytest.param("retry: {max_attempts: 0}", "greater than 0", id="zero"),
            pytest.param("retry: {base_delay: -1}", "greater than or equal to 0", id="negative"),
            pytest.param("circuit_breaker: {timeout_seconds: -5}", "greater than 0", id="neg-cb"),
            pytest.param(
                "retry: {base_delay: 5, max_delay: 1}", "smaller than base_delay", id="max<base"
            ),
            pytest.param("retry: {retry_on: [ConectionError]}", "ConnectionError", id="exc-typo"),
            pytest.param("retry: {retry_on: [nowhere.Thing]}", "unknown exception", id="no-mod"),
            pytest.param("retry: {retry_on: [os.path]}", "not an exception", id="not-a-class"),
            pytest.param("retry: {strategy: quadratic}", "quadratic", id="bad-strategy"),
            pytest.param("retry: {jitter: sometimes}", "sometimes", id="bad-jitter"),
            pytest.param(
                "circuit_breaker: {success_threshold: 3, half_open_max_calls: 1}",
                "never close",
                id="trials<successes",
            ),
            pytest.param("circuit_breaker: {failure_rate_threshold: 1.5}", "1.5", id="rate>1"),
        ],
    )
    def test_bad_values(self, tmp_path: Path, body: str, needle: str) -> None:
        """Each bad value is a PolicyError naming the line and the key, no pydantic traceback."""
        err = problem(tmp_path, f"version: 1\npolicies:\n  p:\n    {body}\n")
        assert needle in str(err)
        assert err.line == 4
        assert err.key is not None
        assert err.key.startswith("policies.p.")
        assert "pydantic" not in str(err)
        assert err.__cause__ is None

    def test_all_problems_reported_at_once(self, tmp_path: Path) -> None:
        """Several mistakes give one error listing each with its line."""
        err = problem(
            tmp_path,
            """
            version: 1
            policies:
              a:
                retry: {max_attempts: 0}
              b:
                circuit_breaker: {failure_treshold: 1}
            """,
        )
        assert len(err.problems) == 2
        assert ":4:" in err.problems[0]
        assert ":6:" in err.problems[1]

    def test_inherited_mistake_reported_once(self, tmp_path: Path) -> None:
        """A typo in a parent is not repeated for each child."""
        err = problem(
            tmp_path,
            """
            version: 1
            policies:
              base:
                retry: {max_atempts: 2}
              child: {extends: base}
            """,
        )
        assert len(err.problems) == 1

    def test_extends_cycle(self, tmp_path: Path) -> None:
        """A cycle in extends is an error that shows the cycle."""
        err = problem(
            tmp_path,
            """
            version: 1
            policies:
              a: {extends: b}
              b: {extends: a}
            """,
        )
        assert "cycle" in str(err)
        assert "a -> b -> a" in str(err) or "b -> a -> b" in str(err)

    def test_extends_unknown(self, tmp_path: Path) -> None:
        """extends of a missing policy suggests the closest name."""
        err = problem(tmp_path, "version: 1\npolicies:\n  base: {}\n  a: {extends: bsae}\n")
        assert "did you mean 'base'?" in str(err)

    def test_python_tags_refused(self, tmp_path: Path) -> None:
        """YAML tags that build objects are refused: loading is safe only."""
        err = problem(
            tmp_path,
            'version: 1\npolicies:\n  p: !!python/object/apply:os.system ["echo hi"]\n',
        )
        assert "not allowed" in str(err)
        assert err.line == 3

    def test_invalid_yaml(self, tmp_path: Path) -> None:
        """Broken YAML gives the line, not a yaml traceback."""
        err = problem(tmp_path, "version: 1\npolicies:\n  p: {retry: [\n")
        assert "invalid YAML" in str(err)
        assert err.line is not None

    def test_duplicate_key(self, tmp_path: Path) -> None:
        """A key given twice is an error rather than a silent overwrite."""
        err = problem(tmp_path, "version: 1\npolicies:\n  p: {}\n  p: {}\n")
        assert "duplicate key" in str(err)
        assert err.line == 4

    def test_bad_version(self, tmp_path: Path) -> None:
        """Only version 1 is understood."""
        err = problem(tmp_path, "version: 2\npolicies: {}\n")
        assert "version" in str(err)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a PolicyError naming it."""
        with pytest.raises(PolicyError, match="cannot read"):
            resilient.load_policies(tmp_path / "nope.yaml")

    def test_unknown_policy_name_lists_known(self, tmp_path: Path) -> None:
        """Asking for an unknown policy lists the known ones."""
        resilient.load_policies(write(tmp_path, GOOD))
        with pytest.raises(PolicyError) as info:
            resilient.get_policy("brokr")
        assert "did you mean 'broker'?" in str(info.value)
        assert "broker, default" in str(info.value)


class TestEnvironment:
    def test_seed_variable_applies_to_every_policy(self, tmp_path: Path) -> None:
        """RESILIENCE_MAX_RETRY_ATTEMPTS changes every retry section."""
        path = write(tmp_path, GOOD)
        policies = load_file(path, env={"RESILIENCE_MAX_RETRY_ATTEMPTS": "7"})
        assert {p.retry.max_attempts for p in policies.values() if p.retry} == {7}

    def test_switch_off_sections(self, tmp_path: Path) -> None:
        """RESILIENCE_*_ENABLED=false removes that strategy from every policy."""
        env = {"RESILIENCE_CIRCUIT_BREAKER_ENABLED": "false", "RESILIENCE_RETRY_ENABLED": "0"}
        policies = load_file(write(tmp_path, GOOD), env=env)
        assert all(p.circuit_breaker is None and p.retry is None for p in policies.values())

    def test_per_policy_override(self, tmp_path: Path) -> None:
        """RESILIENCE_POLICY__<NAME>__<SECTION>__<FIELD> changes one field of one policy."""
        env = {"RESILIENCE_POLICY__BROKER__CIRCUIT_BREAKER__FAILURE_THRESHOLD": "9"}
        policies = load_file(write(tmp_path, GOOD), env=env)
        assert policies["broker"].circuit_breaker is not None
        assert policies["broker"].circuit_breaker.failure_threshold == 9
        assert policies["default"].circuit_breaker is not None
        assert policies["default"].circuit_breaker.failure_threshold == 5

    def test_per_policy_override_bad_value_names_variable(self, tmp_path: Path) -> None:
        """A bad override names the environment variable, not the file."""
        env = {"RESILIENCE_POLICY__BROKER__RETRY__MAX_ATTEMPTS": "-2"}
        with pytest.raises(PolicyError) as info:
            load_file(write(tmp_path, GOOD), env=env)
        assert "RESILIENCE_POLICY__BROKER__RETRY__MAX_ATTEMPTS" in str(info.value)

    def test_per_policy_override_unknown_policy(self, tmp_path: Path) -> None:
        """An override for a policy that does not exist is an error."""
        with pytest.raises(PolicyError, match="did you mean 'broker'"):
            load_file(write(tmp_path, GOOD), env={"RESILIENCE_POLICY__BROKR__RETRY": "{}"})

    def test_bad_boolean(self, tmp_path: Path) -> None:
        """A switch that is not a boolean is an error."""
        with pytest.raises(PolicyError, match="true or false"):
            load_file(write(tmp_path, GOOD), env={"RESILIENCE_RETRY_ENABLED": "maybe"})

    def test_load_policies_reads_os_environ(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """load_policies applies the process environment by default."""
        monkeypatch.setenv("RESILIENCE_MAX_RETRY_ATTEMPTS", "5")
        policies = resilient.load_policies(write(tmp_path, GOOD))
        assert policies["broker"].retry is not None
        assert policies["broker"].retry.max_attempts == 5


class TestDiscovery:
    def test_env_file_first(self, tmp_path: Path) -> None:
        """RESILIENCE_POLICY_FILE is used before ./resilience.yaml."""
        write(tmp_path, "version: 1\npolicies: {local: {}}\n")
        other = write(tmp_path, "version: 1\npolicies: {env: {}}\n", "other.yaml")
        policies, source = discover({"RESILIENCE_POLICY_FILE": str(other)})
        assert list(policies) == ["env"]
        assert source == str(other)

    def test_resilience_yaml_in_cwd(self, tmp_path: Path) -> None:
        """./resilience.yaml is found when nothing else is set."""
        write(tmp_path, "version: 1\npolicies: {local: {}}\n")
        assert list(discover({})[0]) == ["local"]

    def test_pyproject_table(self, tmp_path: Path) -> None:
        """[tool.resilient] in pyproject.toml is the next source."""
        (tmp_path / "pyproject.toml").write_text(
            "[tool.resilient]\nversion = 1\n[tool.resilient.policies.db.retry]\nmax_attempts = 4\n"
        )
        policies, source = discover({})
        assert source == "pyproject.toml"
        assert policies["db"].retry is not None
        assert policies["db"].retry.max_attempts == 4

    def test_builtin_default(self) -> None:
        """With no file at all there is a built-in 'default' policy."""
        policies, source = discover({})
        assert source == "<built-in defaults>"
        assert policies["default"].retry is not None

    def test_first_use_discovers(self, tmp_path: Path) -> None:
        """Using a policy before any load discovers ./resilience.yaml."""
        write(tmp_path, GOOD)
        assert resilient.get_policy("broker").retry is not None

    def test_json_schema(self) -> None:
        """The model produces a JSON schema that lists the sections."""
        schema = policy_file_schema()["$defs"]["Policy"]
        assert {"circuit_breaker", "retry", "timeout", "fallback"} <= set(schema["properties"])


class TestYamlQuirks:
    def test_bare_on_key_in_fallback(self, tmp_path: Path) -> None:
        """YAML 1.1 reads `on:` as true; the fallback section still understands it."""
        path = write(
            tmp_path,
            """
            version: 1
            policies:
              p:
                fallback: {value: [], on: [KeyError]}
            """,
        )
        fallback = load_file(path, env=None)["p"].fallback
        assert fallback is not None
        assert fallback.on == (KeyError,)

    def test_apply_env_false_still_finds_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """apply_env=False ignores overrides but still honours RESILIENCE_POLICY_FILE."""
        path = write(tmp_path, GOOD, "elsewhere.yaml")
        monkeypatch.setenv("RESILIENCE_POLICY_FILE", str(path))
        monkeypatch.setenv("RESILIENCE_MAX_RETRY_ATTEMPTS", "9")
        policies = resilient.load_policies(apply_env=False)
        assert policies["broker"].retry is not None
        assert policies["broker"].retry.max_attempts == 2
