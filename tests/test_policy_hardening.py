"""
Policy loading under hostile or careless input (issue 10): whatever a policy file,
a Python mapping or an environment variable holds, the loader answers with a
PolicyError that says where and why, in time and memory bounded by the input.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resilient
from resilient import CircuitBreakerConfig, PolicyError, RetryConfig
from resilient._models import MAX_SECONDS, BulkheadConfig
from resilient.policy import load_file, parse_env_value, parse_policies
from resilient.retry import RetryPlan


def write(tmp_path: Path, text: str | bytes, name: str = "resilience.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def problem(tmp_path: Path, text: str | bytes, name: str = "resilience.yaml") -> PolicyError:
    path = write(tmp_path, text, name)
    with pytest.raises(PolicyError) as info:
        load_file(path, env=None)
    assert str(path) in str(info.value), "the message names the file"
    return info.value


def policy_file(body: str) -> str:
    """A file with one policy ``p`` whose body is *body* (one line)."""
    return f"version: 1\npolicies:\n  p:\n    {body}\n"


def billion_laughs() -> str:
    """The classic: nine levels of nine aliases, about 10**9 values once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    previous = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
        previous = name
    return "\n".join(lines) + "\n"


class TestOnlyPolicyError:
    @pytest.mark.parametrize(
        ("text", "needle", "line"),
        [
            pytest.param("x: &a [*a]\n", "recursive", 1, id="self-alias-sequence"),
            pytest.param("x: &a {y: *a}\n", "recursive", 1, id="self-alias-mapping"),
            pytest.param(
                policy_file("description: " + "[" * 1000 + "]" * 1000),
                "nesting deeper than 100",
                4,
                id="deep-flow",
            ),
            pytest.param(
                "version: 1\n" + "".join(f"{'  ' * i}k{i}:\n" for i in range(600)),
                "nesting deeper than 100",
                None,
                id="deep-block",
            ),
            pytest.param(
                "version: 1\n"
                + "a0: &a0 [1]\n"
                + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200)),
                "aliases followed",
                None,
                id="deep-through-aliases",
            ),
            pytest.param(
                policy_file("retry: {retry_on: [..Foo]}"),
                "not a valid exception name",
                4,
                id="relative-exception-name",
            ),
            pytest.param(
                policy_file("retry: {max_attempts: " + "9" * 5000 + "}"),
                "integer too large",
                4,
                id="int-over-4300-digits",
            ),
        ],
    )
    def test_hostile_yaml(self, tmp_path: Path, text: str, needle: str, line: int | None) -> None:
        """Recursion, depth, bad names and huge numbers are PolicyErrors with file and line."""
        err = problem(tmp_path, text)
        assert needle in str(err)
        if line is not None:
            assert err.line == line
        assert err.__cause__ is None

    def test_control_character(self, tmp_path: Path) -> None:
        """A character YAML refuses (NUL) is a PolicyError with its line."""
        err = problem(tmp_path, "version: 1\npolicies:\n  p: {description: a\x00b}\n")
        assert err.line == 3
        assert "special characters are not allowed" in str(err)

    def test_latin1_byte_names_file_line_and_column(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 is a PolicyError naming the file, line and column."""
        err = problem(tmp_path, b"version: 1\npolicies:\n  p:\n    description: caf\xe9\n")
        assert err.line == 4
        assert "not UTF-8" in str(err)
        assert "0xe9" in str(err)
        assert "column 21" in str(err)

    @pytest.mark.parametrize(
        "toml",
        [
            pytest.param("[tool.resilient]\nx = " + "[" * 2000 + "]" * 2000, id="deep"),
            pytest.param("[tool.resilient]\nversion = " + "9" * 5000, id="huge-int"),
            pytest.param(b"[tool.resilient]\ndescription = 'caf\xe9'\n", id="latin1"),
        ],
    )
    def test_hostile_pyproject(self, tmp_path: Path, toml: str | bytes) -> None:
        """pyproject.toml gets the same treatment as YAML."""
        problem(tmp_path, toml, "pyproject.toml")

    def test_recursive_python_mapping(self) -> None:
        """A mapping given from Python that contains itself is refused, not recursed into."""
        value: list[Any] = []
        value.append(value)
        data = {"version": 1, "policies": {"p": {"fallback": {"value": value}}}}
        with pytest.raises(PolicyError, match="recursive"):
            parse_policies(data)

    @settings(max_examples=150, deadline=None)
    @given(
        st.text(
            alphabet=st.sampled_from(list("[]{}:&*,-!|>'\"#%@ \n\tab01.~<=yY\x00\xe9")),
            max_size=60,
        )
    )
    def test_fuzzed_text_only_policy_error(self, text: str) -> None:
        """Random YAML-ish text either loads or raises PolicyError, nothing else."""
        with contextlib.suppress(PolicyError):
            parse_yaml_text(text)


def parse_yaml_text(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        load_file(path, env=None)


class TestBoundedWork:
    def test_billion_laughs_refused(self, tmp_path: Path) -> None:
        """A few hundred bytes of nested aliases are refused instead of expanded."""
        text = billion_laughs()
        assert len(text.encode()) < 400
        err = problem(tmp_path, text)
        assert "aliases expand the document" in str(err)

    def test_billion_laughs_inside_a_policy(self, tmp_path: Path) -> None:
        """The same bomb as a fallback value is refused too (the validated data is bounded)."""
        bomb = textwrap.indent(billion_laughs(), " " * 8)
        text = "version: 1\npolicies:\n  p:\n    fallback:\n      value:\n" + bomb
        assert "aliases expand" in str(problem(tmp_path, text))

    def test_merge_key_bomb_refused(self, tmp_path: Path) -> None:
        """Merge keys (<<) multiplying each other are bounded like plain aliases."""
        lines = ["a0: &a0 {x: 1}"]
        for i in range(1, 30):
            lines.append(f"a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 9) + "]}")
        assert "aliases expand" in str(problem(tmp_path, "\n".join(lines) + "\n"))

    def test_shared_sections_still_load(self, tmp_path: Path) -> None:
        """Ordinary anchors and merge keys work, and a bad shared value names its line."""
        text = """
            version: 1
            policies:
              base: &base
                retry: &retry {max_attempts: 4, base_delay: 0.1}
              a: {<<: *base, timeout: {total: 5}}
              b: {retry: *retry}
        """
        policies = load_file(write(tmp_path, text), env=None)
        assert {name: p.retry.max_attempts for name, p in policies.items() if p.retry} == {
            "base": 4,
            "a": 4,
            "b": 4,
        }
        err = problem(tmp_path, text.replace("max_attempts: 4", "max_attempts: 0"))
        assert err.line == 4  # the anchored mapping, reported once

    def test_long_extends_chain(self, tmp_path: Path) -> None:
        """A chain of 2,000 extends resolves (each policy merged once, onto its parent)."""
        n = 2000
        text = "version: 1\npolicies:\n  p0: {retry: {max_attempts: 4}}\n" + "".join(
            f"  p{i}: {{extends: p{i - 1}, description: n{i}}}\n" for i in range(1, n)
        )
        policies = load_file(write(tmp_path, text), env=None)
        last = policies[f"p{n - 1}"]
        assert last.retry is not None
        assert last.retry.max_attempts == 4
        assert last.description == f"n{n - 1}"

    def test_long_extends_chain_reports_the_root_once(self, tmp_path: Path) -> None:
        """A mistake at the root of a long chain is one problem, at its own line."""
        n = 2000
        text = "version: 1\npolicies:\n  p0: {retry: {max_attempts: 0}}\n" + "".join(
            f"  p{i}: {{extends: p{i - 1}}}\n" for i in range(1, n)
        )
        err = problem(tmp_path, text)
        assert len(err.problems) == 1
        assert err.line == 3

    def test_ten_thousand_problems(self, tmp_path: Path) -> None:
        """10,000 distinct problems are all reported, each once."""
        n = 10_000
        text = "version: 1\npolicies:\n" + "".join(
            f"  p{i}: {{retry: {{max_attempts: 0}}}}\n" for i in range(n)
        )
        err = problem(tmp_path, text)
        assert len(err.problems) == n
        assert len(set(err.problems)) == n

    def test_cycle_reported_once(self, tmp_path: Path) -> None:
        """A cycle reachable from several policies is one problem."""
        err = problem(tmp_path, "version: 1\npolicies:\n  a: {extends: b}\n  b: {extends: a}\n")
        assert len(err.problems) == 1
        assert "cycle" in str(err)


class TestExceptionNames:
    def test_every_bad_name_reported_at_its_line(self, tmp_path: Path) -> None:
        """Each bad name of a list is its own problem, with its own line."""
        text = """
            version: 1
            policies:
              p:
                retry:
                  retry_on:
                    - Foo
                    - ConnectionError
                    - Bar
        """
        err = problem(tmp_path, text)
        assert len(err.problems) == 2
        assert ":6: policies.p.retry.retry_on[0]: unknown exception 'Foo'" in err.problems[0]
        assert ":8: policies.p.retry.retry_on[2]: unknown exception 'Bar'" in err.problems[1]

    @pytest.mark.parametrize(
        ("name", "needle"),
        [
            pytest.param(
                "no_such_module_xyz.Error", "module 'no_such_module_xyz' is not installed", id="mod"
            ),
            pytest.param("json.no_sub.Error", "there is no module 'json.no_sub'", id="submodule"),
            pytest.param("json.nope", "'json' has no attribute 'nope'", id="no-attribute"),
            pytest.param("json.JSONDecodeErr", "did you mean 'JSONDecodeError'?", id="attr-typo"),
            pytest.param("CircuitOpenErorr", "did you mean 'CircuitOpenError'?", id="library"),
            pytest.param("ConectionError", "did you mean 'ConnectionError'?", id="builtin"),
            pytest.param("TransportError", "did you mean 'httpx.TransportError'?", id="httpx"),
            pytest.param("os.path", "not an exception class", id="not-a-class"),
            pytest.param("a..b", "not a valid exception name", id="empty-part"),
        ],
    )
    def test_message(self, tmp_path: Path, name: str, needle: str) -> None:
        """The message says what is wrong with the name, with a did-you-mean when close."""
        err = problem(tmp_path, policy_file(f"retry: {{retry_on: ['{name}']}}"))
        assert needle in str(err)

    def test_nested_class_path(self) -> None:
        """A dotted path may go through a class (module.Class.Error)."""
        policies = parse_policies(
            {
                "version": 1,
                "policies": {"p": {"retry": {"retry_on": ["resilient.errors.CircuitOpenError"]}}},
            }
        )
        assert policies["p"].retry is not None
        assert policies["p"].retry.retry_on == (resilient.CircuitOpenError,)


class TestAbsurdValues:
    @pytest.mark.parametrize(
        ("body", "needle"),
        [
            pytest.param(
                "circuit_breaker: {window_type: count, failure_rate_window: 1000000}",
                "larger than 100,000 calls",
                id="count-window-1e6",
            ),
            pytest.param(
                "circuit_breaker: {window_type: count, failure_rate_window: 1000000000}",
                "less than or equal to",
                id="count-window-1e9",
            ),
            pytest.param(
                "circuit_breaker: {window_type: count, failure_rate_window: 100000000000000000000}",
                "less than or equal to",
                id="count-window-1e20",
            ),
            pytest.param(
                "circuit_breaker: {failure_rate_window: 1" + "0" * 400 + "}",
                "less than or equal to",
                id="time-window-10**400",
            ),
            pytest.param(
                "bulkhead: {acquire_timeout: 1e10}", "less than or equal to 2592000", id="acquire"
            ),
            pytest.param("retry: {max_delay: 1e300}", "less than or equal to", id="max-delay"),
            pytest.param("timeout: {total: 1e12}", "less than or equal to", id="total"),
            pytest.param(
                "circuit_breaker: {open_duration_multiplier: 1e300}",
                "less than or equal to 1000",
                id="growth",
            ),
            pytest.param(
                "bulkhead: {max_concurrent_requests: 1" + "0" * 30 + "}",
                "less than or equal to",
                id="huge-count",
            ),
        ],
    )
    def test_bounded(self, tmp_path: Path, body: str, needle: str) -> None:
        """Values that would crash the first call are validation errors with the bound."""
        err = problem(tmp_path, policy_file(body))
        assert needle in str(err)
        assert err.line == 4

    def test_longest_duration_fits_thread_waits(self) -> None:
        """The duration bound is below what every platform's thread waits accept."""
        assert MAX_SECONDS <= threading.TIMEOUT_MAX
        assert MAX_SECONDS < 4294967  # Windows' TIMEOUT_MAX
        lock = threading.Lock()
        assert lock.acquire(timeout=BulkheadConfig(acquire_timeout=MAX_SECONDS).acquire_timeout)
        lock.release()

    def test_count_window_smaller_than_min_requests(self, tmp_path: Path) -> None:
        """A count window that can never hold min_requests_threshold calls is an error."""
        err = problem(
            tmp_path,
            policy_file(
                "circuit_breaker: {window_type: count, failure_rate_window: 5, "
                "min_requests_threshold: 10}"
            ),
        )
        assert "failure_rate_window (5 calls) is smaller than min_requests_threshold (10)" in str(
            err
        )

    def test_count_window_fine_without_rate_tripping(self) -> None:
        """Without rate or slow-call tripping, a small count window is harmless."""
        config = CircuitBreakerConfig(
            window_type="count",
            failure_rate_window=5,
            min_requests_threshold=10,
            failure_rate_threshold=None,
        )
        assert config.failure_rate_window == 5


class TestStrictNumbers:
    @pytest.mark.parametrize(
        "body",
        [
            pytest.param("retry: {max_attempts: yes}", id="max_attempts-yes"),
            pytest.param("retry: {per_attempt_timeout: on}", id="per_attempt-on"),
            pytest.param("bulkhead: {max_queue: false}", id="max_queue-false"),
            pytest.param("circuit_breaker: {failure_rate_threshold: true}", id="rate-true"),
        ],
    )
    def test_booleans_are_not_numbers(self, tmp_path: Path, body: str) -> None:
        """yes/on/false are booleans in YAML, never silently 1, 1.0 or 0."""
        err = problem(tmp_path, policy_file(body))
        assert "expected a number, got the boolean" in str(err)

    def test_python_booleans_refused_too(self) -> None:
        """The models refuse booleans for numbers from Python as well."""
        with pytest.raises(ValueError, match="boolean"):
            RetryConfig(max_attempts=True)


class TestEnvironment:
    GOOD = "version: 1\npolicies:\n  a-b: {retry: {}}\n  a.b: {retry: {}}\n  c: {retry: {}}\n"

    def test_ambiguous_policy_name(self, tmp_path: Path) -> None:
        """Two policies that map to the same variable name make an override an error."""
        env = {"RESILIENCE_POLICY__A_B__RETRY__MAX_ATTEMPTS": "2"}
        with pytest.raises(PolicyError) as info:
            load_file(write(tmp_path, self.GOOD), env=env)
        message = str(info.value)
        assert "RESILIENCE_POLICY__A_B__RETRY__MAX_ATTEMPTS" in message
        assert "'a-b' and 'a.b'" in message
        assert "ambiguous" in message

    def test_unambiguous_names_still_work(self, tmp_path: Path) -> None:
        """Only the ambiguous name is refused; others are overridden as usual."""
        policies = load_file(
            write(tmp_path, self.GOOD), env={"RESILIENCE_POLICY__C__RETRY__MAX_ATTEMPTS": "5"}
        )
        assert policies["c"].retry is not None
        assert policies["c"].retry.max_attempts == 5

    def test_over_deep_path_names_the_variable(self, tmp_path: Path) -> None:
        """A path below a value blames the variable, not the file."""
        var = "RESILIENCE_POLICY__C__RETRY__MAX_ATTEMPTS__X"
        with pytest.raises(PolicyError) as info:
            load_file(write(tmp_path, self.GOOD), env={var: "1"})
        assert f"environment variable {var}" in str(info.value)
        assert "'retry.max_attempts' is a value" in str(info.value)
        assert info.value.source == f"environment variable {var}"

    def test_unknown_field_names_the_variable(self, tmp_path: Path) -> None:
        """A misspelt field in the variable's name gets a did-you-mean."""
        var = "RESILIENCE_POLICY__C__RETRY__MAX_ATEMPTS"
        with pytest.raises(PolicyError, match="did you mean 'max_attempts'") as info:
            load_file(write(tmp_path, self.GOOD), env={var: "1"})
        assert var in str(info.value)

    @pytest.mark.parametrize(
        ("var", "value"),
        [
            pytest.param("RESILIENCE_MAX_RETRY_ATTEMPTS", "yes", id="seed-variable-bool"),
            pytest.param("RESILIENCE_POLICY__C__RETRY__PER_ATTEMPT_TIMEOUT", "on", id="on"),
            pytest.param("RESILIENCE_POLICY__C__RETRY__MAX_ATTEMPTS", "-5", id="negative"),
        ],
    )
    def test_bad_value_names_the_variable(self, tmp_path: Path, var: str, value: str) -> None:
        """A bad override value is reported against its variable."""
        with pytest.raises(PolicyError) as info:
            load_file(write(tmp_path, self.GOOD), env={var: value})
        assert f"environment variable {var}" in str(info.value)

    def test_whole_section_then_a_field(self, tmp_path: Path) -> None:
        """A section given as YAML, then one of its fields, both apply."""
        env = {
            "RESILIENCE_POLICY__C__TIMEOUT": "{total: 9}",
            "RESILIENCE_POLICY__C__TIMEOUT__PER_ATTEMPT": "2",
            "RESILIENCE_POLICY__C__RETRY__RETRY_ON": "[KeyError, ValueError]",
        }
        policy = load_file(write(tmp_path, self.GOOD), env=env)["c"]
        assert (policy.total_timeout, policy.per_attempt_timeout) == (9.0, 2.0)
        assert policy.retry is not None
        assert policy.retry.retry_on == (KeyError, ValueError)


class TestParseEnvValue:
    def test_constraints_of_a_model_field_apply(self) -> None:
        """A field's constraints (here gt=0) are checked, and the variable is named."""
        field = RetryConfig.model_fields["base_delay"]
        with pytest.raises(PolicyError) as info:
            parse_env_value("RESILIENCE_X", "-5", field)
        assert "environment variable RESILIENCE_X" in str(info.value)
        assert "'-5'" in str(info.value)
        assert info.value.source == "environment variable RESILIENCE_X"

    @pytest.mark.parametrize(
        ("raw", "annotation", "expected"),
        [
            pytest.param("5", int, 5, id="int"),
            pytest.param(" 0.25 ", float, 0.25, id="float"),
            pytest.param("yes", bool, True, id="bool"),
            pytest.param("null", float | None, None, id="null"),
            pytest.param("null", str | None, "null", id="string-stays-text"),
            pytest.param("[1, 2]", list[int], [1, 2], id="yaml-list"),
        ],
    )
    def test_values(self, raw: str, annotation: Any, expected: Any) -> None:
        """The text is read as the annotation expects it."""
        assert expected == parse_env_value("RESILIENCE_X", raw, annotation)

    def test_retry_on_list(self) -> None:
        """Exception lists are written as YAML lists."""
        field = RetryConfig.model_fields["retry_on"]
        value = parse_env_value("RESILIENCE_X", "[KeyError, TimeoutError]", field)
        assert value == (KeyError, TimeoutError)

    @pytest.mark.parametrize("raw", ["on", "yes", "true"])
    def test_boolean_is_not_a_number(self, raw: str) -> None:
        """on/yes/true are refused for numbers."""
        with pytest.raises(PolicyError, match="RESILIENCE_X"):
            parse_env_value("RESILIENCE_X", raw, int)
        with pytest.raises(PolicyError, match="RESILIENCE_X"):
            parse_env_value("RESILIENCE_X", raw, RetryConfig.model_fields["timeout"])

    def test_secret_value_not_shown(self) -> None:
        """With secret=True the value is left out of the message."""
        with pytest.raises(PolicyError) as info:
            parse_env_value("RESILIENCE_X", "s3cret-not-a-number", int, secret=True)
        assert "s3cret" not in str(info.value)


class TestSeedDefaults:
    def test_max_open_duration_follows_timeout(self) -> None:
        """A breaker open for an hour is valid: the default cap follows timeout_seconds."""
        config = CircuitBreakerConfig(timeout_seconds=3600)
        assert config.max_open_duration == 3600
        assert CircuitBreakerConfig().max_open_duration == 600
        assert CircuitBreakerConfig(timeout_seconds=10).max_open_duration == 600

    def test_explicit_max_open_duration_still_checked(self) -> None:
        """A cap given explicitly below timeout_seconds is still an error."""
        with pytest.raises(ValueError, match="max_open_duration"):
            CircuitBreakerConfig(timeout_seconds=3600, max_open_duration=600)

    def test_jitter_default_is_true(self) -> None:
        """jitter defaults to True, the seed's type; the named kinds stay accepted."""
        assert RetryConfig().jitter is True
        assert RetryConfig().jitter_kind == "full"
        assert RetryConfig(jitter="equal").jitter_kind == "equal"
        assert RetryConfig(jitter=False).jitter_kind == "none"
        assert RetryConfig(jitter=None).jitter is False  # type: ignore[arg-type]

    def test_jitter_true_is_full_jitter(self) -> None:
        """jitter: true and jitter: full build the same wait."""
        waits = {
            type(RetryPlan(RetryConfig(jitter=j), total=None).wait).__name__ for j in (True, "full")
        }
        assert len(waits) == 1

    def test_retry_plan_keeps_no_dead_fields(self) -> None:
        """RetryPlan no longer stores the total budget and rate source it never reads."""
        plan = RetryPlan(RetryConfig(), total=5.0, rate=lambda: 0.0)
        assert not hasattr(plan, "total")
        assert not hasattr(plan, "rate")


class TestTransientDefaults:
    def test_httpx_errors_retried_by_default(self, sleeps: list[float]) -> None:
        """The default retry_on covers httpx's transport errors when httpx is installed."""
        httpx = pytest.importorskip("httpx")
        retry = RetryConfig()
        assert httpx.TransportError in retry.retry_on
        assert httpx.TimeoutException in retry.retry_on
        resilient.load_policies({"version": 1, "policies": {"p": {"retry": {"base_delay": 0}}}})
        calls = []

        @resilient.resilient(policy="p")
        def fetch() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise httpx.ConnectError("connection refused")
            return "ok"

        assert fetch() == "ok"
        assert len(calls) == 3

    def test_import_resilient_imports_no_http_client(self) -> None:
        """httpx and aiohttp are resolved when a policy is built, not at import."""
        code = (
            "import sys, resilient; "
            "assert 'httpx' not in sys.modules and 'aiohttp' not in sys.modules, 'eager'; "
            "resilient.RetryConfig(); print('ok')"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.strip() == "ok"
