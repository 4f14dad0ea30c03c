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
the registry is only replaced when the whole file is valid. Whatever the file
holds (broken UTF-8, recursive or exploding aliases, absurd nesting or numbers),
loading raises nothing but :class:`~resilient.PolicyError`, and its work is
bounded by the size of the file.
"""

from __future__ import annotations

import functools
import os
import threading
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from resilient._models import (
    TRANSIENT_ERRORS,
    CircuitBreakerConfig,
    FallbackConfig,
    Policy,
    RetryConfig,
    RetryStrategy,
    TimeoutConfig,
)
from resilient.backends._config import ENV_REDIS_URL, BackendConfig, RedisUrl
from resilient.errors import PolicyError, did_you_mean

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
    "parse_env_value",
    "parse_policies",
    "policy_names",
    "read_yaml_file",
    "registry",
    "validate_model",
]

SUPPORTED_VERSIONS = (1,)
_TOP_LEVEL_KEYS = ("version", "policies", "redis_url", "backend")
_POLICY_KEYS = (*Policy.model_fields, "extends")
# Per-policy override: RESILIENCE_POLICY__<NAME>__<SECTION>__<FIELD>=value
# (double underscores throughout, so it never collides with RESILIENCE_POLICY_FILE)
_ENV_POLICY_PREFIX = "RESILIENCE_POLICY__"

#: Deepest nesting of a policy document, aliases followed (a policy file needs
#: about six levels; the bound keeps every recursive consumer far from Python's
#: recursion limit).
MAX_DEPTH = 100
#: Values that aliases (or objects shared within a Python mapping) may add to a
#: document beyond the values it spells out: a "billion laughs" file of a few
#: hundred bytes would otherwise expand to a billion values.
MAX_ALIAS_EXPANSION = 100_000

Path_ = tuple[str | int, ...]
Origin = tuple[str, int | None]  # (source, line)
M = typing.TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- reading


@functools.cache
def _loader_class() -> type[Any]:
    """PyYAML's safe loader, bounded: nesting depth, and integers that fail to convert."""
    import yaml  # lazy: only loading a file needs it

    class _PolicyLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            # The composer recurses once per level: stop long before RecursionError.
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    parser: Any = self  # types-PyYAML leaves peek_event untyped
                    mark = parser.peek_event().start_mark
                    problem = f"nesting deeper than {MAX_DEPTH} levels"
                    raise yaml.composer.ComposerError(None, None, problem, mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def fetch_flow_collection_start(self, token_class: Any) -> None:
            # The scanner looks ahead through every open '[' or '{' (quadratic in
            # their number): refuse deep flow nesting before the composer sees it.
            if self.flow_level >= MAX_DEPTH:
                problem = f"nesting deeper than {MAX_DEPTH} levels"
                raise yaml.scanner.ScannerError(None, None, problem, self.get_mark())
            super().fetch_flow_collection_start(token_class)

        def construct_yaml_int(self, node: Any) -> int:
            try:
                return super().construct_yaml_int(node)
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                problem = f"integer too large ({len(str(node.value))} characters)"
                raise yaml.constructor.ConstructorError(
                    None, None, problem, node.start_mark
                ) from None

    _PolicyLoader.add_constructor("tag:yaml.org,2002:int", _PolicyLoader.construct_yaml_int)
    return _PolicyLoader


def _read_yaml(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML safely, returning the data and the line of every key path."""
    import yaml

    try:
        loader = _loader_class()(text)  # the reader refuses control characters here
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_shape(node, _node_children, source)
        lines: dict[Path_, int] = {}
        _collect_lines(node, (), lines, source, set())
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    except PolicyError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Defence in depth: a constructor failure that PyYAML does not wrap.
        msg = f"{source}: invalid YAML: {type(exc).__name__}: {exc}"
        raise PolicyError(msg, source=source) from None
    finally:
        loader.dispose()
    return data, lines


def _yaml_error(exc: Exception, source: str, text: str = "") -> PolicyError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    position = getattr(exc, "position", None)  # ReaderError: a character YAML refuses
    reason = getattr(exc, "reason", None)
    if isinstance(position, int) and reason:
        line = text.count("\n", 0, position) + 1
        character = getattr(exc, "character", None)
        shown = f" (character #x{character:04x})" if isinstance(character, int) else ""
        problem = f"{reason}{shown}"
    if "python/" in str(exc) or "could not determine a constructor" in str(exc):
        problem = (
            f"{problem}: policy files are loaded safely, so YAML tags that build "
            "Python objects (such as !!python/object) are not allowed"
        )
    where = f"{source}:{line}" if line else source
    return PolicyError(f"{where}: invalid YAML: {problem}", source=source, line=line)


def _node_children(node: Any) -> list[Any] | None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return None


def _data_children(value: Any) -> list[Any] | None:
    if isinstance(value, Mapping):
        return [part for pair in value.items() for part in pair]
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return None


_DONE = object()


def _check_shape(root: Any, children: Callable[[Any], list[Any] | None], source: str) -> None:
    """
    Refuse a document that is recursive, nested deeper than :data:`MAX_DEPTH`, or
    that aliases expand by more than :data:`MAX_ALIAS_EXPANSION` values.

    Works on the graph as it is (a node that aliases share is measured once, and
    its expanded size remembered), without recursion, so the check itself costs
    time linear in the size of the file.
    """
    kids = children(root)
    if kids is None:
        return
    sizes: dict[int, tuple[int, int]] = {}  # id -> (expanded size, height)
    on_path = {id(root)}
    # frame: [node, iterator over its children, expanded size so far, height so far]
    stack: list[list[Any]] = [[root, iter(kids), 1, 1]]
    distinct = expanded = 1
    problem: tuple[str, Any] | None = None
    while stack and problem is None:
        frame = stack[-1]
        child = next(frame[1], _DONE)
        if child is _DONE:
            stack.pop()
            on_path.discard(id(frame[0]))
            sizes[id(frame[0])] = (frame[2], frame[3])
            if stack:
                stack[-1][2] += frame[2]
                stack[-1][3] = max(stack[-1][3], frame[3] + 1)
            continue
        grandchildren = children(child)
        if grandchildren is None:  # a scalar
            frame[2] += 1
            frame[3] = max(frame[3], 2)
            distinct += 1
            expanded += 1
            continue
        key = id(child)
        if key in on_path:
            problem = ("an alias refers to a node that contains it (a recursive structure)", child)
        elif key in sizes:  # shared: an alias, or the same object twice in a mapping
            size, height = sizes[key]
            frame[2] += size
            frame[3] = max(frame[3], height + 1)
            expanded += size
            if len(stack) + height > MAX_DEPTH:
                problem = (f"nesting deeper than {MAX_DEPTH} levels (aliases followed)", child)
            elif expanded - distinct > MAX_ALIAS_EXPANSION:
                problem = (
                    f"aliases expand the document by more than {MAX_ALIAS_EXPANSION:,} "
                    "values; write the repeated parts out, or share fewer of them",
                    child,
                )
        elif len(stack) >= MAX_DEPTH:
            problem = (f"nesting deeper than {MAX_DEPTH} levels", child)
        else:
            on_path.add(key)
            stack.append([child, iter(grandchildren), 1, 1])
            distinct += 1
            expanded += 1
    if problem is not None:
        text, where = problem
        mark = getattr(where, "start_mark", None)
        line = mark.line + 1 if mark is not None else None
        prefix = f"{source}:{line}" if line else source
        raise PolicyError(f"{prefix}: {text}", source=source, line=line)


def _collect_lines(
    node: Any, path: Path_, lines: dict[Path_, int], source: str, visited: set[int]
) -> None:
    """Record the line of every key path; a node shared by aliases is walked once."""
    import yaml

    if id(node) in visited:
        return  # its keys are reported at the line of the alias (the parent key)
    if isinstance(node, yaml.MappingNode):
        visited.add(id(node))
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            if key == "<<":  # merge key: the merged keys keep their own lines
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else []
                for item in merged or [value_node]:
                    _collect_lines(item, path, lines, source, visited)
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = _dotted((*path, key))
                msg = f"{source}:{line}: duplicate key '{dotted}'"
                raise PolicyError(msg, source=source, line=line, key=dotted)
            seen.add(key)
            lines.setdefault((*path, key), line)
            _collect_lines(value_node, (*path, key), lines, source, visited)
    elif isinstance(node, yaml.SequenceNode):
        visited.add(id(node))
        for index, item in enumerate(node.value):
            lines.setdefault((*path, index), item.start_mark.line + 1)
            _collect_lines(item, (*path, index), lines, source, visited)


# --------------------------------------------------------------------------- errors


class _Problems:
    """Collects every problem of a load, so one error reports them all."""

    def __init__(self, source: str, noun: str = "policies") -> None:
        self.source = source
        self.noun = noun
        self.items: list[tuple[str, int | None, str, str]] = []  # source, line, key, text
        self._reported: set[tuple[str, int, str, str]] = set()

    def add(self, text: str, *, key: Path_ = (), origin: Origin | None = None) -> None:
        source, line = origin if origin is not None else (self.source, None)
        dotted = _dotted(key)
        if line is not None:
            # A mistake in a parent policy shows up again in every policy extending
            # it: report the line once (a set, so 10,000 problems stay cheap).
            mark = (source, line, text, dotted.rsplit(".", 1)[-1])
            if mark in self._reported:
                return
            self._reported.add(mark)
        self.items.append((source, line, dotted, text))

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
            message = f"{len(rendered)} problems in {self.noun}:\n  " + "\n  ".join(rendered)
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


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``RetryConfig | None`` -> ``RetryConfig``), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location down the nested models."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):  # an item of a list of models: same model
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _nested_model(field.annotation)
    return current


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
        message = f"{message} (got {_short(value)})"
    return loc, message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


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

    def line_of(self, policy: str, loc: Path_) -> int | None:
        return self.lines.get((*self.prefix, "policies", policy, *loc))


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
    if env is not None and env.get(ENV_REDIS_URL, "").strip():
        # the variable wins over the file's redis_url: a bad one fails the load, not a call
        parse_env_value(ENV_REDIS_URL, env[ENV_REDIS_URL], RedisUrl, secret=True)
    if not isinstance(data, Mapping):
        problems.add("a policy file must be a mapping with 'version' and 'policies'")
        problems.raise_if_any()
    _check_shape(data, _data_children, source)
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            hint = did_you_mean(key, _TOP_LEVEL_KEYS)
            problems.add(f"unknown top-level key{hint}", key=(key,), origin=doc.origin((key,)))
    version = data.get("version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        problems.add(
            f"unsupported version {_short(version)}; this release reads version 1",
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

    resolved, parents = _resolve_extends(raw, doc, problems)

    env_origins: dict[tuple[str, Path_], str] = {}
    if env is not None:
        _apply_env(resolved, env, env_origins, problems)

    origins = _ChainOrigins(doc, parents)
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
                    origin = origins.origin(name, loc)
                problems.add(text, key=key, origin=origin)
    fleet = _parse_backend(data, doc, problems)
    problems.raise_if_any()
    interned: dict[Any, Any] = {}
    result = PolicySet({name: _intern(policy, interned) for name, policy in policies.items()})
    result.fleet = fleet
    return result


def _intern(model: M, table: dict[Any, Any]) -> M:
    """
    One instance per distinct value: *model* itself, or the equal model already in
    *table* (its sections interned first, so that policies share their equal sections).

    The models are frozen, so sharing one instance is invisible but for the bytes:
    a file of many policies that repeat sections (``extends``, copied defaults)
    keeps each distinct section once. Equality is strict (see :func:`_strict`),
    and a section holding an unhashable value (a list as a fallback value) is kept
    as it is.
    """
    values = vars(model)
    for field, value in values.items():
        if isinstance(value, BaseModel):
            shared = _intern(value, table)
            if shared is not value:
                # the same value (strictly equal), in a model made by this load
                values[field] = shared
    fields = model.model_fields_set
    names = frozenset(fields)
    try:
        key = (type(model), names, _strict(tuple(values.values())))
    except TypeError:  # unhashable: not shared
        key = None
    shared = table.setdefault(key, model) if key is not None else model
    if shared is model:
        # A model of its own still shares the set of its explicitly set field names
        # (a set costs 216 bytes or more): pydantic never changes that set in place
        # on a frozen model (a copy gets a copy of it).
        same = table.setdefault((type(model), names), fields)
        if same is not fields:
            object.__setattr__(model, "__pydantic_fields_set__", same)
    return typing.cast("M", shared)


def _strict(value: Any) -> Any:
    """
    *value* as a key whose equality also compares types, recursively through tuples
    and frozensets (as ``functools.lru_cache(typed=True)`` does for arguments): a
    fallback of ``1`` and one of ``True`` are equal for ``==`` but not the same
    section. Nested models are already interned, so they compare by identity.

    Raises:
        TypeError: *value* holds something unhashable.
    """
    kind = type(value)
    if kind is tuple:
        return (kind, tuple(_strict(item) for item in value))
    if kind is frozenset:
        return (kind, frozenset(_strict(item) for item in value))
    if isinstance(value, BaseModel):
        return (kind, id(value))
    hash(value)
    return (kind, value)


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


class _ChainOrigins:
    """
    The line of a key of a merged policy: the first policy up its ``extends``
    chain that sets the key. Answers are remembered per (policy, key), so the
    errors of a long chain cost time linear in its length, not quadratic.
    """

    def __init__(self, doc: _Document, parents: Mapping[str, str]) -> None:
        self.doc = doc
        self.parents = parents
        self._owner: dict[tuple[str, Path_], int | None] = {}

    def _line(self, name: str, loc: Path_) -> int | None:
        walked: list[str] = []
        current: str | None = name
        line: int | None = None
        while current is not None:
            if (current, loc) in self._owner:
                line = self._owner[(current, loc)]
                break
            walked.append(current)
            line = self.doc.line_of(current, loc)
            if line is not None:
                break
            current = self.parents.get(current)
        for walked_name in walked:
            self._owner[(walked_name, loc)] = line
        return line

    def origin(self, name: str, loc: Path_) -> Origin:
        for depth in range(len(loc), 0, -1):
            line = self._line(name, tuple(loc[:depth]))
            if line is not None:
                return self.doc.source, line
        return self.doc.origin(("policies", name))


def _resolve_extends(
    raw: Mapping[str, dict[str, Any]], doc: _Document, problems: _Problems
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """
    Merge every policy with its ``extends`` chain; returns the merged bodies (in
    the file's order) and each policy's parent.

    Each policy is merged once, onto its already merged parent, so a chain of
    *n* policies costs *n* merges. A policy whose chain is broken (a cycle, an
    unknown or malformed parent) is reported once, at the key that breaks it.
    """
    resolved: dict[str, dict[str, Any]] = {}
    parents: dict[str, str] = {}
    failed: set[str] = set()
    for start in raw:
        if start in resolved or start in failed:
            continue
        walk: list[str] = []
        on_walk: set[str] = set()
        name = start
        base: dict[str, Any] | None
        while True:
            walk.append(name)
            on_walk.add(name)
            body = raw[name]
            if "extends" not in body:
                base = {}
                break
            parent = body["extends"]
            key = ("policies", name, "extends")
            if not isinstance(parent, str):
                problems.add("'extends' must name one policy", key=key, origin=doc.origin(key))
                base = None
                break
            if parent in on_walk:
                cycle = " -> ".join([*walk[walk.index(parent) :], parent])
                problems.add(f"'extends' forms a cycle: {cycle}", key=key, origin=doc.origin(key))
                base = None
                break
            if parent not in raw:
                hint = did_you_mean(parent, raw)
                known = ", ".join(sorted(raw)) or "(none)"
                problems.add(
                    f"extends unknown policy {parent!r}{hint}; known policies: {known}",
                    key=key,
                    origin=doc.origin(key),
                )
                base = None
                break
            parents[name] = parent
            if parent in resolved:
                base = resolved[parent]
                break
            if parent in failed:
                base = None
                break
            name = parent
        if base is None:
            failed.update(walk)
            continue
        for name in reversed(walk):
            base = _deep_merge(base, {k: v for k, v in raw[name].items() if k != "extends"})
            resolved[name] = base
    return {name: resolved[name] for name in raw if name in resolved}, parents


# --------------------------------------------------------------------------- environment


def _annotation_of(spec: Any) -> Any:
    """A type, ``Annotated[...]``, or a pydantic field (its type and constraints)."""
    if isinstance(spec, FieldInfo):
        if spec.metadata:
            return typing.Annotated[(spec.annotation, *spec.metadata)]
        return spec.annotation
    return spec


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    try:
        adapter = _ADAPTERS.get(annotation)
    except TypeError:  # unhashable annotation: no cache
        return TypeAdapter(annotation)
    if adapter is None:
        adapter = _ADAPTERS[annotation] = TypeAdapter(annotation)
    return adapter


def _parse_env(raw: str, annotation: Any) -> Any:
    """
    The value of an environment variable as the type *annotation* expects it.

    The text is tried as it is first (``"5"`` for a number, ``"yes"`` for a
    boolean, ``"redis://..."`` for a string), then as YAML (``"[A, B]"``,
    ``"{...}"``, ``"null"``). A YAML boolean is never taken for a number.

    Raises:
        ValueError: The text is not a valid value; the message says why.
    """
    adapter = _adapter(_annotation_of(annotation))
    text = raw.strip()
    try:
        return adapter.validate_python(text)
    except ValidationError as exc:
        first = exc
    try:
        parsed: Any = _read_yaml(text, "<environment>")[0]
    except PolicyError:
        parsed = text  # not YAML either: the first error says best what is wrong
    if isinstance(parsed, str | bool):
        raise ValueError(_validation_text(first)) from None
    try:
        return adapter.validate_python(parsed)
    except ValidationError as exc:
        raise ValueError(_validation_text(exc)) from None


def _validation_text(exc: ValidationError) -> str:
    texts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        message = str(err["msg"]).removeprefix("Value error, ")
        texts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(texts)


def parse_env_value(var: str, raw: str, annotation: Any, *, secret: bool = False) -> Any:
    """
    Parse the environment variable *var* (its text *raw*) as *annotation* expects.

    *annotation* is a type (``int``, ``float | None``), an ``Annotated`` type with
    constraints, or a pydantic field (``Model.model_fields["name"]``, whose
    constraints apply too). Numbers never accept booleans. With *secret*, the
    value is left out of the message.

    Raises:
        PolicyError: The value is invalid; the message names *var*.
    """
    try:
        return _parse_env(raw, annotation)
    except ValueError as exc:
        shown = "" if secret else f" (got {_short(raw)})"
        source = f"environment variable {var}"
        raise PolicyError(f"{source}: {exc}{shown}", source=source, key=var) from None


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
        origin: Origin = (f"environment variable {var}", None)
        if field is None:
            enabled = _env_bool(value)
            if enabled is None:
                problems.add(f"expected true or false, got {_short(value)}", origin=origin)
                continue
            if not enabled:
                for body in policies.values():
                    body.pop(section, None)
            continue
        section_model = _nested_model(Policy.model_fields[section].annotation)
        assert section_model is not None
        try:
            parsed = _parse_env(value, section_model.model_fields[field])
        except ValueError as exc:
            problems.add(f"{exc} (got {_short(value)})", origin=origin)
            continue
        for name, body in policies.items():
            if isinstance(body.get(section), Mapping):
                body[section] = {**body[section], field: parsed}
                origins[(name, (section, field))] = var

    by_env_name: dict[str, list[str]] = {}
    for name in policies:
        by_env_name.setdefault(_env_name(name), []).append(name)
    for var in sorted(env):
        if var.startswith(_ENV_POLICY_PREFIX):
            _apply_policy_var(var, env[var], policies, by_env_name, origins, problems)


def _apply_policy_var(
    var: str,
    value: str,
    policies: dict[str, dict[str, Any]],
    by_env_name: Mapping[str, list[str]],
    origins: dict[tuple[str, Path_], str],
    problems: _Problems,
) -> None:
    """Apply one ``RESILIENCE_POLICY__<NAME>__<SECTION>[__<FIELD>...]`` variable."""
    parts = var[len(_ENV_POLICY_PREFIX) :].split("__")
    origin: Origin = (f"environment variable {var}", None)
    if len(parts) < 2 or not all(parts):
        problems.add(
            f"expected {_ENV_POLICY_PREFIX}<POLICY>__<SECTION>[__<FIELD>], got {var}",
            origin=origin,
        )
        return
    policy_key, *path = parts
    names = by_env_name.get(policy_key.upper(), [])
    if len(names) > 1:
        both = " and ".join(repr(n) for n in sorted(names))
        problems.add(
            f"policies {both} both map to {policy_key.upper()!r} in environment variable "
            "names, so the override is ambiguous; rename one of them",
            origin=origin,
        )
        return
    if not names:
        hint = did_you_mean(policy_key, policies)
        known = ", ".join(sorted(policies)) or "(none)"
        problems.add(
            f"names unknown policy {policy_key.lower()!r}{hint}; known policies: {known}",
            origin=origin,
        )
        return
    policy_name = names[0]
    keys = [p.lower() for p in path]
    model: type[BaseModel] = Policy
    field: FieldInfo | None = None
    for depth, key in enumerate(keys):
        field = model.model_fields.get(key)
        where = ".".join(keys[: depth + 1])
        if field is None:
            hint = did_you_mean(key, model.model_fields)
            problems.add(f"unknown key {where!r}{hint}", origin=origin)
            return
        nested = _nested_model(field.annotation)
        if depth < len(keys) - 1:
            if nested is None:
                problems.add(
                    f"{where!r} is a value, not a section: it has no key {keys[depth + 1]!r}",
                    origin=origin,
                )
                return
            model = nested
    assert field is not None
    try:
        parsed = _parse_env(value, field)
    except ValueError as exc:
        problems.add(f"{exc} (got {_short(value)})", origin=origin)
        return
    if isinstance(parsed, BaseModel):
        # A whole section: keep what was given, so later variables can add fields to it.
        parsed = parsed.model_dump(exclude_unset=True)
    target: dict[str, Any] = policies[policy_name]
    for key in keys[:-1]:
        child = target.get(key)
        child = dict(child) if isinstance(child, Mapping) else {}
        target[key] = child
        target = child
    target[keys[-1]] = parsed
    origins[(policy_name, tuple(keys))] = var


def _env_name(policy_name: str) -> str:
    return policy_name.upper().replace("-", "_").replace(".", "_")


# --------------------------------------------------------------------------- registry


class PolicyRegistry:
    """
    Name -> :class:`Policy`, replaced atomically as a whole.

    Every replacement calls :attr:`on_change`; the runtime
    (:mod:`resilient.runtime`) sets it to its ``touch``, so compiled pipelines
    rebuild at their next call.
    """

    __slots__ = ("_lock", "_policies", "_source", "fleet", "on_change")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: Mapping[str, Policy] | None = None
        self._source = "<not loaded>"
        #: ``redis_url``/``backend`` of the policy file (resilient.backends), or None
        self.fleet: BackendConfig | None = None
        self.on_change: Callable[[], None] = _nothing

    @property
    def source(self) -> str:
        """Where the current policies came from."""
        return self._source

    @property
    def loaded(self) -> bool:
        """Whether policies were loaded (explicitly or by discovery)."""
        return self._policies is not None

    def replace(self, policies: Mapping[str, Policy], source: str) -> None:
        """Swap in a new set of policies; pipelines rebuild on their next call."""
        self.set_contents(dict(policies), source, getattr(policies, "fleet", None))

    def touch(self) -> None:
        """Make every pipeline rebuild at its next call (policies unchanged)."""
        self.on_change()

    def clear(self) -> None:
        """Forget every policy; the next look-up discovers files again."""
        self.set_contents(None, "<not loaded>", None)

    def contents(self) -> tuple[Mapping[str, Policy] | None, str, BackendConfig | None]:
        """``(policies or None, source, fleet settings)``, for :meth:`set_contents`."""
        with self._lock:
            return self._policies, self._source, self.fleet

    def set_contents(
        self, policies: Mapping[str, Policy] | None, source: str, fleet: BackendConfig | None
    ) -> None:
        """Put back what :meth:`contents` returned (``None``: not loaded)."""
        with self._lock:
            self._policies = policies
            self._source = source
            self.fleet = fleet
        self.on_change()

    def policies(self) -> Mapping[str, Policy]:
        """All policies, discovering the policy file first if none was loaded."""
        current = self._policies
        if current is None:
            with self._lock:
                found = self._policies is None
                if found:
                    policies, source = discover()
                    self._policies = policies
                    self.fleet = getattr(policies, "fleet", None)
                    self._source = source
                current = self._policies
                assert current is not None
            if found:
                self.on_change()
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


def _nothing() -> None:
    pass


registry = PolicyRegistry()


def _builtin_defaults() -> dict[str, Policy]:
    return {"default": Policy(retry=RetryConfig(), circuit_breaker=CircuitBreakerConfig())}


def load_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None) -> dict[str, Policy]:
    """Read and validate one policy file (YAML, or ``pyproject.toml``)."""
    file = Path(path)
    source = str(path)
    text = _read_text(path, "policy file")
    if file.name == "pyproject.toml" or file.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = f"{source}: invalid TOML: {exc}"
            raise PolicyError(msg, source=source) from None
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            msg = f"{source}: invalid TOML: {type(exc).__name__}: {exc}"
            raise PolicyError(msg, source=source) from None
        tool = data.get("tool")
        section = tool.get("resilient") if isinstance(tool, Mapping) else None
        if section is None:
            msg = f"{source}: no [tool.resilient] table"
            raise PolicyError(msg, source=source)
        return parse_policies(section, source=source, env=env, prefix=("tool", "resilient"))
    data, lines = _read_yaml(text, source)
    if data is None:
        data = {"version": 1, "policies": {}}
    return parse_policies(data, source=source, lines=lines, env=env)


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    """The text of the file *path*; unreadable or not UTF-8: a PolicyError naming it."""
    source = str(path)
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        msg = f"{source}: cannot read {what}: {exc.strerror or exc}"
        raise PolicyError(msg, source=source) from None
    return _decode(content, source)


def _decode(content: bytes, source: str) -> str:
    """The file's text; a file that is not UTF-8 is a PolicyError naming line and column."""
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content.count(b"\n", 0, exc.start) + 1
        column = exc.start - (content.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = content[exc.start : exc.start + 1].hex()
        msg = (
            f"{source}:{line}: the file is not UTF-8 text: byte 0x{byte} at column {column} "
            "(save the file as UTF-8)"
        )
        raise PolicyError(msg, source=source, line=line) from None


def discover(
    env: Mapping[str, str] | None = None, *, apply_env: bool = True
) -> tuple[dict[str, Policy], str]:
    """
    Find and load the policy file in the order docs/policies.md gives:
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


def validate_model(
    model: type[M],
    data: Any,
    *,
    source: str = "<python>",
    lines: Mapping[Path_, int] | None = None,
    check: Callable[[M], typing.Iterable[tuple[Path_, str]]] | None = None,
    what: str = "document",
) -> M:
    """
    Validate *data* as *model* the way policy files are validated: every problem
    at once, each with ``source:line``, its key and a did-you-mean for unknown keys.

    Other documents than policy files (chaos experiments) use it so they report
    errors exactly like policy files do.

    Args:
        model: The pydantic model of the document.
        data: The parsed document (``lines`` maps its key paths to lines).
        source: The file name shown in messages.
        lines: Line of every key path, as :func:`read_yaml_file` returns it.
        check: Called with the valid document; yields ``(key path, problem)`` for
            what the model cannot judge alone (names that must exist elsewhere).
        what: What the document is, for the message of a document that is not a mapping.

    Raises:
        PolicyError: Every problem found, reported at once.
    """
    doc = _Document(data, source, lines or {})
    problems = _Problems(source, f"the {what}")
    if not isinstance(data, Mapping):
        problems.add(f"a {what} must be a mapping of keys")
        problems.raise_if_any()
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc, text = _explain(err, model)
            problems.add(text, key=loc, origin=doc.origin(loc))
        problems.raise_if_any()
        raise  # pragma: no cover - errors() is never empty
    if check is not None:
        for loc, text in check(result):
            problems.add(text, key=loc, origin=doc.origin(loc))
        problems.raise_if_any()
    return result


def read_yaml_file(path: str | os.PathLike[str]) -> tuple[Any, dict[Path_, int]]:
    """
    Read a YAML file with the policy loader's safety bounds; returns the data and
    the line of every key path (for :func:`validate_model`).

    Raises:
        PolicyError: The file cannot be read, is not UTF-8 or not valid YAML (file:line).
    """
    return _read_yaml(_read_text(path, "file"), str(path))


def get_policy(name: str) -> Policy:
    """Return the active policy called *name* (see :meth:`PolicyRegistry.get`)."""
    return registry.get(name)


def policy_names() -> list[str]:
    """Names of the active policies, sorted."""
    return sorted(registry.policies())
