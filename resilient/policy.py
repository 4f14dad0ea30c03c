"""
Policies: loading policy files, ``extends``, environment overrides, the registry.

A policy file looks like this::

    version: 1
    policies:
      default:
        retry: {max_attempts: 3, base_delay: 0.1}
      broker:
        extends: default
        circuit_breaker: {failure_threshold: 2, timeout_seconds: 10}

Loading is all-or-nothing: every problem in a file is collected and reported in
one :class:`~resilient.PolicyError` that names the file, the line and the key, and
the registry is only replaced when the whole file is valid.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from resilient._models import (
    TRANSIENT_ERRORS,
    CircuitBreakerConfig,
    FallbackConfig,
    Policy,
    RetryConfig,
    RetryStrategy,
    TimeoutConfig,
)
from resilient.backends._config import BackendConfig
from resilient.errors import PolicyError

__all__ = [
    "TRANSIENT_ERRORS",
    "CircuitBreakerConfig",
    "FallbackConfig",
    "Policy",
    "PolicyRegistry",
    "RetryConfig",
    "RetryStrategy",
    "TimeoutConfig",
    "get_policy",
    "load_policies",
    "parse_policies",
    "policy_names",
    "registry",
]

SUPPORTED_VERSIONS = (1,)
_TOP_LEVEL_KEYS = ("version", "policies", "redis_url", "backend")
_POLICY_KEYS = (*Policy.model_fields, "extends")
# Per-policy override: RESILIENCE_POLICY__<NAME>__<SECTION>__<FIELD>=value
# (double underscores throughout, so it never collides with RESILIENCE_POLICY_FILE)
_ENV_POLICY_PREFIX = "RESILIENCE_POLICY__"

Path_ = tuple[str | int, ...]
Origin = tuple[str, int | None]  # (source, line)


# --------------------------------------------------------------------------- reading


def _read_yaml(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML safely, returning the data and the line of every key path."""
    import yaml  # lazy: only loading a file needs it

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    if node is None:
        return None, {}
    lines: dict[Path_, int] = {}
    _collect_lines(node, (), lines, source)
    loader = yaml.SafeLoader("")
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    return data, lines


def _yaml_error(exc: Exception, source: str) -> PolicyError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    if "python/" in str(exc) or "could not determine a constructor" in str(exc):
        problem = (
            f"{problem}: policy files are loaded safely, so YAML tags that build "
            "Python objects (such as !!python/object) are not allowed"
        )
    where = f"{source}:{line}" if line else source
    return PolicyError(f"{where}: invalid YAML: {problem}", source=source, line=line)


def _collect_lines(node: Any, path: Path_, lines: dict[Path_, int], source: str) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            if key == "<<":  # merge key: its keys are reported at the merge line
                _collect_lines(value_node, path, lines, source)
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                msg = f"{source}:{line}: duplicate key '{dotted}'"
                raise PolicyError(msg, source=source, line=line, key=dotted)
            seen.add(key)
            lines.setdefault((*path, key), line)
            _collect_lines(value_node, (*path, key), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.setdefault((*path, index), item.start_mark.line + 1)
            _collect_lines(item, (*path, index), lines, source)


# --------------------------------------------------------------------------- errors


class _Problems:
    """Collects every problem of a load, so one error reports them all."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[tuple[str, int | None, str, str]] = []  # source, line, key, text

    def add(self, text: str, *, key: Path_ = (), origin: Origin | None = None) -> None:
        source, line = origin if origin is not None else (self.source, None)
        item = (source, line, _dotted(key), text)
        # A mistake in a parent policy shows up again in every policy extending it:
        # report the line once.
        if line is not None and any(
            (s, n, t) == (source, line, text) and k.rsplit(".", 1)[-1] == item[2].rsplit(".", 1)[-1]
            for s, n, k, t in self.items
        ):
            return
        self.items.append(item)

    def raise_if_any(self, policy: str | None = None) -> None:
        if not self.items:
            return
        rendered = []
        self.items.sort(key=lambda item: (item[0], item[1] or 0))
        for source, line, key, text in self.items:
            where = f"{source}:{line}" if line else source
            rendered.append(f"{where}: {key}: {text}" if key else f"{where}: {text}")
        source, line, key, _ = self.items[0]
        if len(rendered) == 1:
            message = rendered[0]
        else:
            message = f"{len(rendered)} problems in policies:\n  " + "\n  ".join(rendered)
        raise PolicyError(
            message,
            source=source,
            line=line,
            key=key or None,
            policy=policy,
            problems=tuple(rendered),
        )


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: str, options: Any) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location down the nested models."""
    import typing

    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        nested = None
        for candidate in (annotation, *typing.get_args(annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nested = candidate
                break
        current = nested
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_SHOW_INPUT = frozenset(
    {
        "int_parsing",
        "float_parsing",
        "int_type",
        "float_type",
        "bool_parsing",
        "greater_than",
        "greater_than_equal",
        "less_than_equal",
        "less_than",
        "enum",
        "literal_error",
    }
)


def _explain(err: Mapping[str, Any], model: type[BaseModel]) -> tuple[tuple[Any, ...], str]:
    """Turn one pydantic error into (key path, human text)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        options = list(parent.model_fields) if parent is not None else []
        if parent is Policy:
            options.append("extends")
        hint = did_you_mean(loc[-1], options)
        if hint:
            return loc, f"unknown key{hint}"
        return loc, f"unknown key; valid keys here: {', '.join(sorted(options))}"
    if kind == "missing":
        return loc, "required key is missing"
    message = str(err["msg"])
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in _SHOW_INPUT:
        message = f"{message} (got {value!r})"
    return loc, message


# --------------------------------------------------------------------------- parsing


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Document:
    """One parsed policy source with its line map."""

    def __init__(
        self, data: Any, source: str, lines: Mapping[Path_, int], *, prefix: Path_ = ()
    ) -> None:
        self.data = data
        self.source = source
        self.lines = lines
        self.prefix = prefix  # key path of the document root inside the file (pyproject)

    def origin(self, path: Path_) -> Origin:
        probe = path
        while probe:
            line = self.lines.get((*self.prefix, *probe))
            if line is not None:
                return self.source, line
            probe = probe[:-1]
        return self.source, None


def parse_policies(
    data: Any,
    *,
    source: str = "<python>",
    lines: Mapping[Path_, int] | None = None,
    env: Mapping[str, str] | None = None,
    prefix: Path_ = (),
) -> dict[str, Policy]:
    """
    Validate a policy document (the parsed YAML) and return its policies.

    Resolves ``extends``, applies environment overrides (``env``; ``None`` means
    no overrides) and validates every policy.

    Raises:
        PolicyError: For every problem found, all reported at once.
    """
    doc = _Document(data, source, lines or {}, prefix=prefix)
    problems = _Problems(source)
    if not isinstance(data, Mapping):
        problems.add("a policy file must be a mapping with 'version' and 'policies'")
        problems.raise_if_any()
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            hint = did_you_mean(key, _TOP_LEVEL_KEYS)
            problems.add(f"unknown top-level key{hint}", key=(key,), origin=doc.origin((key,)))
    version = data.get("version", 1)
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        problems.add(
            f"unsupported version {version!r}; this release reads version 1",
            key=("version",),
            origin=doc.origin(("version",)),
        )
    raw = data.get("policies", {})
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add("'policies' must be a mapping of name -> policy", key=("policies",))
        problems.raise_if_any()
    for name, body in raw.items():
        if not isinstance(body, Mapping) and body is not None:
            problems.add(
                "a policy must be a mapping of sections",
                key=("policies", name),
                origin=doc.origin(("policies", name)),
            )
    problems.raise_if_any()
    raw = {str(name): dict(body or {}) for name, body in raw.items()}

    resolved: dict[str, dict[str, Any]] = {}
    chains: dict[str, list[str]] = {}
    for name in raw:
        merged = _resolve_extends(name, raw, doc, problems, resolved, chains)
        if merged is not None:
            resolved[name] = merged

    env_origins: dict[tuple[str, Path_], str] = {}
    if env is not None:
        _apply_env(resolved, env, env_origins, problems)

    policies: dict[str, Policy] = {}
    for name, body in resolved.items():
        try:
            policies[name] = Policy.model_validate(body)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc, text = _explain(err, Policy)
                key = ("policies", name, *loc)
                env_var = _env_origin(env_origins, name, loc)
                if env_var is not None:
                    origin: Origin = (f"environment variable {env_var}", None)
                else:
                    origin = _origin_through_chain(doc, chains.get(name, [name]), loc)
                problems.add(text, key=key, origin=origin)
    fleet = _parse_backend(data, doc, problems)
    problems.raise_if_any()
    result = PolicySet(policies)
    result.fleet = fleet
    return result


class PolicySet(dict[str, Policy]):
    """The policies of one source, plus its ``redis_url``/``backend`` settings (``fleet``)."""

    fleet: BackendConfig | None = None


def _parse_backend(data: Mapping[str, Any], doc: _Document, problems: _Problems) -> Any:
    """Validate the top-level ``redis_url`` and ``backend`` keys (resilient.backends)."""
    if "redis_url" not in data and "backend" not in data:
        return None
    body = data.get("backend") or {}
    if not isinstance(body, Mapping) or "redis_url" in body:
        where = doc.origin(("backend",))
        problems.add(
            "'backend' must be a mapping of settings (redis_url goes at the top level)",
            key=("backend",),
            origin=where,
        )
        return None
    try:
        return BackendConfig.model_validate({**body, "redis_url": data.get("redis_url")})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc, text = _explain(err, BackendConfig)
            key = loc if loc == ("redis_url",) else ("backend", *loc)
            problems.add(text, key=key, origin=doc.origin(key))
    return None


def _env_origin(origins: Mapping[tuple[str, Path_], str], name: str, loc: Path_) -> str | None:
    probe = tuple(loc)
    while probe:
        var = origins.get((name, probe))
        if var is not None:
            return var
        probe = probe[:-1]
    return None


def _origin_through_chain(doc: _Document, chain: list[str], loc: Path_) -> Origin:
    """The line of a key of a merged policy: the first policy in the chain that sets it."""
    for policy_name in chain:
        line = doc.lines.get((*doc.prefix, "policies", policy_name, *loc))
        if line is not None:
            return doc.source, line
    for depth in range(len(loc) - 1, -1, -1):
        for policy_name in chain:
            line = doc.lines.get((*doc.prefix, "policies", policy_name, *loc[:depth]))
            if line is not None:
                return doc.source, line
    return doc.origin(("policies", chain[0]))


def _resolve_extends(
    name: str,
    raw: Mapping[str, dict[str, Any]],
    doc: _Document,
    problems: _Problems,
    resolved: dict[str, dict[str, Any]],
    chains: dict[str, list[str]],
) -> dict[str, Any] | None:
    chain = [name]
    bodies = [raw[name]]
    current = raw[name]
    while "extends" in current:
        parent = current["extends"]
        key = ("policies", chain[-1], "extends")
        if not isinstance(parent, str):
            problems.add("'extends' must name one policy", key=key, origin=doc.origin(key))
            return None
        if parent in chain:
            cycle = " -> ".join([*chain, parent])
            problems.add(f"'extends' forms a cycle: {cycle}", key=key, origin=doc.origin(key))
            return None
        if parent not in raw:
            hint = did_you_mean(parent, raw)
            known = ", ".join(sorted(raw)) or "(none)"
            problems.add(
                f"extends unknown policy {parent!r}{hint}; known policies: {known}",
                key=key,
                origin=doc.origin(key),
            )
            return None
        chain.append(parent)
        current = raw[parent]
        bodies.append(current)
    merged: dict[str, Any] = {}
    for body in reversed(bodies):
        merged = _deep_merge(merged, {k: v for k, v in body.items() if k != "extends"})
    chains[name] = chain
    return merged


# --------------------------------------------------------------------------- environment


def _parse_env_value(value: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _env_bool(value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    return None


# The seed's variables that change every policy: (variable, section, field).
# ``field`` None means the variable switches the whole section on or off.
GLOBAL_ENV_OVERRIDES: tuple[tuple[str, str, str | None], ...] = (
    ("RESILIENCE_CIRCUIT_BREAKER_ENABLED", "circuit_breaker", None),
    ("RESILIENCE_ADAPTIVE_CIRCUIT_BREAKER_ENABLED", "circuit_breaker", "enable_ml_prediction"),
    ("RESILIENCE_RETRY_ENABLED", "retry", None),
    ("RESILIENCE_MAX_RETRY_ATTEMPTS", "retry", "max_attempts"),
    ("RESILIENCE_BULKHEAD_ENABLED", "bulkhead", None),
    ("RESILIENCE_MAX_CONCURRENT_REQUESTS", "bulkhead", "max_concurrent_requests"),
)


def _apply_env(
    policies: dict[str, dict[str, Any]],
    env: Mapping[str, str],
    origins: dict[tuple[str, Path_], str],
    problems: _Problems,
) -> None:
    for var, section, field in GLOBAL_ENV_OVERRIDES:
        value = env.get(var)
        if value is None or value.strip() == "":
            continue
        if field is None:
            enabled = _env_bool(value)
            if enabled is None:
                problems.add(
                    f"expected true or false, got {value!r}",
                    origin=(f"environment variable {var}", None),
                )
                continue
            if not enabled:
                for body in policies.values():
                    body.pop(section, None)
            continue
        for name, body in policies.items():
            if isinstance(body.get(section), Mapping):
                body[section] = {**body[section], field: _parse_env_value(value)}
                origins[(name, (section, field))] = var

    by_env_name = {_env_name(name): name for name in policies}
    for var in sorted(env):
        if not var.startswith(_ENV_POLICY_PREFIX):
            continue
        parts = var[len(_ENV_POLICY_PREFIX) :].split("__")
        origin: Origin = (f"environment variable {var}", None)
        if len(parts) < 2 or not all(parts):
            problems.add(
                f"expected {_ENV_POLICY_PREFIX}<POLICY>__<SECTION>[__<FIELD>], got {var}",
                origin=origin,
            )
            continue
        policy_key, *path = parts
        policy_name = by_env_name.get(policy_key.upper())
        if policy_name is None:
            close = difflib.get_close_matches(policy_key.upper(), list(by_env_name), n=1)
            hint = f" (did you mean '{by_env_name[close[0]]}'?)" if close else ""
            known = ", ".join(sorted(policies)) or "(none)"
            problems.add(
                f"names unknown policy {policy_key.lower()!r}{hint}; known policies: {known}",
                origin=origin,
            )
            continue
        keys = [p.lower() for p in path]
        target: dict[str, Any] = policies[policy_name]
        for key in keys[:-1]:
            child = target.get(key)
            child = dict(child) if isinstance(child, Mapping) else {}
            target[key] = child
            target = child
        target[keys[-1]] = _parse_env_value(env[var])
        origins[(policy_name, tuple(keys))] = var


def _env_name(policy_name: str) -> str:
    return policy_name.upper().replace("-", "_").replace(".", "_")


# --------------------------------------------------------------------------- registry


class PolicyRegistry:
    """
    Name -> :class:`Policy`, replaced atomically as a whole.

    ``generation`` goes up on every replacement; compiled pipelines remember the
    generation they were built for and rebuild when it changes, so the warm call
    path costs one integer comparison.
    """

    __slots__ = ("_explicit", "_lock", "_policies", "_source", "fleet", "generation")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: Mapping[str, Policy] | None = None
        self._source = "<not loaded>"
        self._explicit = False
        self.generation = 0
        #: ``redis_url``/``backend`` of the policy file (resilient.backends), or None
        self.fleet: BackendConfig | None = None

    @property
    def source(self) -> str:
        """Where the current policies came from."""
        return self._source

    @property
    def loaded(self) -> bool:
        """Whether policies were loaded (explicitly or by discovery)."""
        return self._policies is not None

    def replace(
        self, policies: Mapping[str, Policy], source: str, *, explicit: bool = True
    ) -> None:
        """Swap in a new set of policies; pipelines rebuild on their next call."""
        with self._lock:
            self._policies = dict(policies)
            self.fleet = getattr(policies, "fleet", None)
            self._source = source
            self._explicit = explicit
            self.generation += 1

    def touch(self) -> None:
        """Make every pipeline rebuild at its next call (policies unchanged)."""
        with self._lock:
            self.generation += 1

    def clear(self) -> None:
        """Forget every policy; the next look-up discovers files again."""
        with self._lock:
            self._policies = None
            self.fleet = None
            self._source = "<not loaded>"
            self._explicit = False
            self.generation += 1

    def policies(self) -> Mapping[str, Policy]:
        """All policies, discovering the policy file first if none was loaded."""
        current = self._policies
        if current is None:
            with self._lock:
                if self._policies is None:
                    policies, source = discover()
                    self._policies = policies
                    self.fleet = getattr(policies, "fleet", None)
                    self._source = source
                    self.generation += 1
                current = self._policies
        return current

    def get(self, name: str) -> Policy:
        """
        Return the policy called *name*.

        Raises:
            PolicyError: No policy has that name; the message lists the known ones.
        """
        policies = self.policies()
        policy = policies.get(name)
        if policy is None:
            hint = did_you_mean(name, policies)
            known = ", ".join(sorted(policies)) or "(none)"
            msg = f"unknown policy {name!r}{hint}; known policies ({self._source}): {known}"
            raise PolicyError(msg, policy=name, source=self._source)
        return policy


registry = PolicyRegistry()


def _builtin_defaults() -> dict[str, Policy]:
    return {"default": Policy(retry=RetryConfig(), circuit_breaker=CircuitBreakerConfig())}


def load_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None) -> dict[str, Policy]:
    """Read and validate one policy file (YAML, or ``pyproject.toml``)."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{source}: cannot read policy file: {exc.strerror or exc}"
        raise PolicyError(msg, source=source) from None
    if file.name == "pyproject.toml" or file.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = f"{source}: invalid TOML: {exc}"
            raise PolicyError(msg, source=source) from None
        section = data.get("tool", {}).get("resilient")
        if section is None:
            msg = f"{source}: no [tool.resilient] table"
            raise PolicyError(msg, source=source)
        return parse_policies(section, source=source, env=env, prefix=("tool", "resilient"))
    data, lines = _read_yaml(text, source)
    if data is None:
        data = {"version": 1, "policies": {}}
    return parse_policies(data, source=source, lines=lines, env=env)


def discover(
    env: Mapping[str, str] | None = None, *, apply_env: bool = True
) -> tuple[dict[str, Policy], str]:
    """
    Find and load the policy file the way DESIGN §4 orders the sources:
    ``RESILIENCE_POLICY_FILE``, ``./resilience.yaml`` (or ``.yml``),
    ``[tool.resilient]`` in ``./pyproject.toml``, else the built-in ``default``.
    With *apply_env* false, ``RESILIENCE_*`` overrides are not applied (the
    file is still found through ``RESILIENCE_POLICY_FILE``).
    """
    environ = os.environ if env is None else env
    overrides = environ if apply_env else None
    explicit = environ.get("RESILIENCE_POLICY_FILE")
    if explicit:
        return load_file(explicit, env=overrides), explicit
    for candidate in ("resilience.yaml", "resilience.yml"):
        if Path(candidate).is_file():
            return load_file(candidate, env=overrides), candidate
    pyproject = Path("pyproject.toml")
    if pyproject.is_file():
        import tomllib

        try:
            has_table = "resilient" in tomllib.loads(pyproject.read_text("utf-8")).get("tool", {})
        except (OSError, tomllib.TOMLDecodeError):
            has_table = False
        if has_table:
            return load_file(pyproject, env=overrides), "pyproject.toml"
    defaults = _builtin_defaults()
    data = {"version": 1, "policies": {k: v.model_dump() for k, v in defaults.items()}}
    return parse_policies(data, source="<built-in defaults>", env=overrides), "<built-in defaults>"


def load_policies(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    apply_env: bool = True,
) -> dict[str, Policy]:
    """
    Load policies and make them the active set, replacing the previous one atomically.

    Args:
        source: A YAML file, a ``pyproject.toml``, an already-parsed mapping
            (``{"version": 1, "policies": {...}}``), or ``None`` to discover the
            file as described in the docs.
        env: The environment to read ``RESILIENCE_*`` overrides from
            (default: ``os.environ``).
        apply_env: Set to false to ignore environment overrides.

    Returns:
        The loaded policies by name.

    Raises:
        PolicyError: The source is invalid; the active policies are unchanged.
    """
    environ: Mapping[str, str] | None = (os.environ if env is None else env) if apply_env else None
    if source is None:
        policies, where = discover(os.environ if env is None else env, apply_env=apply_env)
    elif isinstance(source, Mapping):
        policies, where = parse_policies(source, env=environ), "<python>"
    else:
        policies, where = load_file(source, env=environ), str(source)
    registry.replace(policies, where)
    return policies


def get_policy(name: str) -> Policy:
    """Return the active policy called *name* (see :meth:`PolicyRegistry.get`)."""
    return registry.get(name)


def policy_names() -> list[str]:
    """Names of the active policies, sorted."""
    return sorted(registry.policies())
