"""
The backend settings (resilient.backends._config): a malformed ``redis_url`` fails when
the settings are built (a policy file, ``configure()``), never inside a call; a missing
redis extra is named; credentials never appear in messages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

import resilient
from resilient import backends
from resilient.backends import BackendConfig, redact_url

pytest.importorskip("redis")

BAD_URLS = [
    pytest.param("localhost:6379", "has no scheme", id="no-scheme"),
    pytest.param("htp://localhost:6379", "unknown scheme 'htp'", id="bad-scheme"),
    pytest.param("redis://localhost:99999/0", "Port out of range", id="port-too-big"),
    pytest.param("redis://localhost:0/0", "port 0 is not between 1 and 65535", id="port-zero"),
    pytest.param("redis://localhost:port/0", "does not parse", id="port-not-a-number"),
    pytest.param("redis://[::1", "Invalid IPv6 URL", id="unclosed-ipv6"),
    pytest.param("redis://:6379/0", "has no host", id="no-host"),
    pytest.param("redis://localhost:6379/abc", "must be a number", id="db-not-a-number"),
    pytest.param("redis://localhost:6379/0?cluster=maybe", "cluster='maybe'", id="cluster"),
    pytest.param("redis://localhost:6379/0?db=x", "Invalid value for 'db'", id="query-db"),
    pytest.param("redis://localhost:6379/0?colour=red", "colour", id="unknown-query"),
    pytest.param("unix://", "needs the socket's path", id="unix-no-path"),
]


class TestRedisUrl:
    @pytest.mark.parametrize(("url", "why"), BAD_URLS)
    def test_a_malformed_url_is_a_validation_error(self, url: str, why: str) -> None:
        """BackendConfig refuses what redis-py would refuse at the first call."""
        with pytest.raises(pydantic.ValidationError, match="redis_url") as caught:
            BackendConfig(redis_url=url)
        assert why in str(caught.value)

    @pytest.mark.parametrize(("url", "why"), BAD_URLS)
    def test_a_policy_file_with_a_malformed_url_fails_at_load_with_its_line(
        self, url: str, why: str, tmp_path: Path
    ) -> None:
        """The policy file's redis_url is checked at load: a PolicyError naming file:line."""
        path = tmp_path / "resilience.yaml"
        path.write_text(f"version: 1\nredis_url: '{url}'\npolicies:\n  a: {{}}\n")
        with pytest.raises(resilient.PolicyError) as caught:
            resilient.load_policies(str(path))
        text = str(caught.value)
        assert f"{path}:2" in text
        assert "redis_url" in text
        assert why in text

    def test_configure_with_a_malformed_url_fails_at_once(self) -> None:
        """configure() raises before any call; the backend in use does not change."""
        with pytest.raises(pydantic.ValidationError, match="has no scheme"):
            backends.configure("localhost:6379")
        assert backends.current().name == "memory"

    @pytest.mark.parametrize(
        "url",
        [
            "redis://localhost:6379/0",
            "redis://localhost",
            "rediss://user:pw@cache.internal:6380/2",
            "redis://[::1]:6379/0",
            "REDIS://localhost:6379/0",
            "redis://localhost:6379/0?cluster=true",
            "redis://localhost:6379/0?socket_keepalive=true&client_name=app",
            "unix:///var/run/redis.sock?db=1",
        ],
    )
    def test_well_formed_urls_are_accepted(self, url: str) -> None:
        """Every form redis-py accepts (and our cluster= flag) still validates."""
        assert BackendConfig(redis_url=url).redis_url == url

    def test_an_error_never_shows_the_password(self) -> None:
        """Neither the message nor pydantic's input echo carries the credentials."""
        url = "redis://admin:hunter2@localhost:99999/0?password=hunter2&username=admin"
        with pytest.raises(pydantic.ValidationError) as caught:
            BackendConfig(redis_url=url)
        text = str(caught.value)
        assert "hunter2" not in text
        assert "admin" not in text
        assert "redis://***@localhost:99999/0?password=***&username=***" in text

    def test_repr_never_shows_the_password(self) -> None:
        """repr(BackendConfig) redacts the URL (it ends up in logs and tracebacks)."""
        config = BackendConfig(redis_url="redis://:hunter2@localhost:6379/0")
        assert "hunter2" not in repr(config)
        assert "redis://***@localhost:6379/0" in repr(config)

    def test_missing_redis_extra_is_named_at_load(self, tmp_path: Path) -> None:
        """Without redis-py, a redis_url fails at load naming the extra to install."""
        path = tmp_path / "resilience.yaml"
        path.write_text("version: 1\nredis_url: redis://localhost:6379/0\npolicies: {a: {}}\n")
        code = (
            "import sys; sys.modules['redis'] = None\n"
            "import resilient\n"
            "try:\n"
            f"    resilient.load_policies({str(path)!r})\n"
            "except resilient.PolicyError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    print('loaded')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        assert f"{path}:2" in out
        assert "pip install 'resilient-policies[redis]'" in out


class TestRedactUrl:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("redis://localhost:6379/0", "redis://localhost:6379/0"),
            ("redis://:pw@host:6379/0", "redis://***@host:6379/0"),
            ("redis://user:pw@host/0", "redis://***@host/0"),
            ("redis://user@host/0", "redis://***@host/0"),
            ("redis://u:p@ss@host/0", "redis://***@host/0"),
            ("rediss://host/0?password=pw&db=1", "rediss://host/0?password=***&db=1"),
            ("redis://host/0?username=u&password=p", "redis://host/0?username=***&password=***"),
            ("redis://host/0?ssl_password=p", "redis://host/0?ssl_password=***"),
            ("unix://u:p@/tmp/redis.sock?password=p", "unix://***@/tmp/redis.sock?password=***"),
            ("redis://host/0?cluster=true", "redis://host/0?cluster=true"),
            ("u:pw@host:6379", "***@host:6379"),
            ("redis://:pw@[::1", "redis://***@[::1"),
        ],
    )
    def test_credentials_are_replaced(self, url: str, shown: str) -> None:
        """User info and credential query parameters become ***; the rest stays readable."""
        assert shown == redact_url(url)
