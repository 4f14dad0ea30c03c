"""
The ``resilient`` command.

    resilient validate resilience.yaml          # exit 1 and file:line: key: problem
    resilient schema --output resilience.schema.json
    resilient show resilience.yaml broker       # resolved: extends + RESILIENCE_* applied
    resilient demo                              # 15 s of a flaky service, in memory
    resilient status --redis redis://host:6379  # the fleet's shared breaker state
    resilient simulate resilience.yaml --policy broker --scenario outage
    resilient serve --app myapp:monitor     # /health, /health/live, /health/ready, /metrics
    resilient chaos run experiment.yaml --report run.html --plot run.png

Exit codes: 0 ok, 1 an invalid policy file or input, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resilient._models import Policy, policy_file_schema
from resilient._version import __version__
from resilient.errors import PolicyError, did_you_mean

__all__ = ["main", "policy_file_schema"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


# --------------------------------------------------------------------------- helpers


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _policy_error(path: str, exc: PolicyError) -> str:
    """The loader's message, prefixed with the file when it does not name it."""
    message = str(exc)
    if message.startswith(path):
        return message
    return f"{path}: {message}"


def _env(args: argparse.Namespace) -> Mapping[str, str] | None:
    return None if args.no_env else os.environ


def _dump_policy(policy: Policy) -> dict[str, Any]:
    # mode="json": exception classes become their names, enums their values.
    return policy.model_dump(mode="json")


# --------------------------------------------------------------------------- commands


def _cmd_validate(args: argparse.Namespace) -> int:
    from resilient.policy import load_file

    env = _env(args)
    invalid = 0
    for path in args.files:
        try:
            policies = load_file(path, env=env)
        except PolicyError as exc:
            invalid += 1
            _err(_policy_error(path, exc))
            continue
        names = ", ".join(policies)
        count = _plural(len(policies), "policy", "policies")
        print(f"ok {path} ({count}: {names})" if names else f"ok {path} ({count})")
    if invalid and len(args.files) > 1:
        _err(f"{invalid} of {len(args.files)} files invalid")
    return EXIT_INVALID if invalid else EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(policy_file_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output is None or args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        _err(f"{args.output}: cannot write: {exc.strerror or exc}")
        return EXIT_INVALID
    _err(f"wrote {args.output}")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from resilient.policy import load_file

    try:
        policies = load_file(args.file, env=_env(args))
    except PolicyError as exc:
        _err(_policy_error(args.file, exc))
        return EXIT_INVALID
    if args.name is not None:
        if args.name not in policies:
            known = ", ".join(policies) or "(none)"
            hint = did_you_mean(args.name, policies)
            _err(f"{args.file}: unknown policy {args.name!r}{hint}; known policies: {known}")
            return EXIT_INVALID
        policies = {args.name: policies[args.name]}
    document = {
        "version": 1,
        "policies": {name: _dump_policy(policy) for name, policy in policies.items()},
    }
    if args.json:
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    import yaml

    overrides = "ignored" if args.no_env else "applied"
    sys.stdout.write(
        f"# {args.file} resolved: extends merged, RESILIENCE_* overrides {overrides}, "
        "defaults filled in\n"
    )
    sys.stdout.write(
        yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)
    )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from resilient import _demo

    return _demo.run(duration=args.duration, seed=args.seed, quiet=args.quiet)


def _cmd_status(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from resilient.backends._config import BackendConfig, redact_url

    settings, where = _status_settings(args)
    if settings is None:
        return EXIT_INVALID if where else EXIT_USAGE
    try:
        config = BackendConfig.model_validate(settings)
    except ValidationError as exc:
        problems = "; ".join(
            str(err["msg"]).removeprefix("Value error, ") for err in exc.errors(include_url=False)
        )
        _err(f"resilient status: {where}: {problems}")
        return EXIT_INVALID
    url = redact_url(config.redis_url or "")
    try:
        from resilient.backends.redis import fleet_status
    except ImportError:
        _err("resilient status: needs redis-py (pip install 'resilient-policies[redis]')")
        return EXIT_INVALID
    try:
        status = fleet_status(config)
    except Exception as exc:
        _err(f"resilient status: {url}: {type(exc).__name__}: {exc}")
        return EXIT_INVALID
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return EXIT_OK
    sys.stdout.write(f"{status['url']}: {len(status['replicas'])} replica(s) seen\n")
    for replica, info in sorted(status["replicas"].items()):
        sys.stdout.write(f"  {replica}  policies: {', '.join(info.get('policies', []))}\n")
    if not status["policies"]:
        sys.stdout.write("no shared breaker state\n")
    for name, entry in status["policies"].items():
        detail = f"generation {entry['generation']}, trips {entry['trips']}"
        if entry["retry_after"] is not None:
            detail += f", trial calls in {entry['retry_after']:.3g}s"
        if entry["state"] == "half-open":
            detail += f", trial permits taken {entry['trial_permits_taken']}"
        sys.stdout.write(
            f"{name:<24} {entry['state']:<9} {detail}; replicas: {len(entry['replicas'])}\n"
        )
    return EXIT_OK


def _status_settings(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """
    The backend settings ``status`` reads the fleet with, and where the URL came
    from. The URL: ``--redis``, else ``RESILIENCE_REDIS_URL``, else the policy
    file's ``redis_url`` (FILE, else the file the library would discover); the
    file's ``backend:`` settings (key prefix...) apply too. ``(None, "")`` when
    there is no URL at all (a usage error, already reported), ``(None, where)``
    when the policy file is invalid (reported).
    """
    from resilient.policy import discover, load_file

    url: str | None = args.redis
    where = "--redis"
    if not url:
        url = os.environ.get("RESILIENCE_REDIS_URL", "").strip() or None
        where = "RESILIENCE_REDIS_URL"
    fleet: Any = None
    source = args.file
    try:
        if args.file is not None:
            fleet = getattr(load_file(args.file, env=None), "fleet", None)
        elif url is None:
            policies, source = discover(os.environ, apply_env=False)
            fleet = getattr(policies, "fleet", None)
    except PolicyError as exc:
        _err(_policy_error(source or "policy file", exc))
        return None, str(source or "policy file")
    settings: dict[str, Any] = fleet.model_dump() if fleet is not None else {}
    if url is None:
        url = settings.get("redis_url")
        where = f"redis_url of {source}"
    if not url:
        searched = f" ({source} has none)" if source and not source.startswith("<") else ""
        _err(
            "resilient status: no Redis URL: pass --redis URL, set RESILIENCE_REDIS_URL "
            f"or put redis_url in the policy file{searched}"
        )
        return None, ""
    settings.update(redis_url=url, socket_timeout=2.0, connect_timeout=2.0)
    if args.prefix is not None:
        settings["key_prefix"] = args.prefix
    return settings, where


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        _err("resilient serve: needs uvicorn (pip install 'resilient-policies[server]')")
        return EXIT_INVALID
    from resilient._health_http import asgi_app

    monitor, owner = _load_monitor(args.app)
    if monitor is None:
        return EXIT_INVALID
    app: Any = asgi_app(monitor, start_monitor=True)
    if owner is not None and getattr(owner, "initialized", True) is False:
        app = _ManagerLifespan(app, owner)  # a manager made but not initialised at import
    config = uvicorn.Config(
        app, host=args.host, port=args.port, lifespan="on", log_level=args.log_level
    )
    server = uvicorn.Server(config)
    server.run()
    return EXIT_OK if server.started else EXIT_INVALID


class _ManagerLifespan:
    """
    ASGI wrapper for ``resilient serve`` of a ResilienceManager that its module made
    but did not initialise: the server's startup initialises it (which starts its
    health checks) and its shutdown closes it.
    """

    def __init__(self, app: Any, manager: Any) -> None:
        self.app = app
        self.manager = manager

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        manager = self.manager

        async def receive_() -> Any:
            message = await receive()
            if message["type"] == "lifespan.startup" and not manager.initialized:
                await manager.initialize()
            return message

        try:
            await self.app(scope, receive_, send)
        finally:
            await manager.close()


def _load_monitor(spec: str) -> tuple[Any, Any]:
    """
    ``(monitor, manager)`` for what ``module:attribute`` names: a health monitor
    itself (no manager), or a ResilienceManager and its ``health_monitor``.
    ``(None, None)`` when there is none (reported).
    """
    import importlib

    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m` and uvicorn: the current directory
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            _err(f"resilient serve: --app {spec}: no module named {exc.name!r}")
        else:
            _err(f"resilient serve: --app {spec}: importing {module_name}: {exc}")
        return None, None
    except Exception as exc:
        _err(f"resilient serve: --app {spec}: importing {module_name}: {type(exc).__name__}: {exc}")
        return None, None
    where = module_name
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            hint = did_you_mean(part, names)
            _err(f"resilient serve: --app {spec}: {where} has no attribute {part!r}{hint}")
            return None, None
        target = getattr(target, part)
        where = f"{where}.{part}"
    if isinstance(target, type):
        _err(
            f"resilient serve: --app {spec}: the class {target.__name__}; name an instance "
            "(a HealthMonitor or a ResilienceManager created in the module)"
        )
        return None, None
    if callable(getattr(target, "get_system_health_summary", None)):
        return target, None
    if hasattr(target, "health_monitor"):
        monitor = target.health_monitor
        if monitor is None:
            _err(
                f"resilient serve: --app {spec}: the manager's health monitoring is off "
                "(health_monitoring_enabled=False, or RESILIENCE_HEALTH_MONITORING_ENABLED)"
            )
        return monitor, (target if monitor is not None else None)
    _err(
        f"resilient serve: --app {spec}: a {type(target).__name__}, not a health monitor "
        "or a ResilienceManager"
    )
    return None, None


# --------------------------------------------------------------------------- parser


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"not a number: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value >= 1.0 or value == float("inf"):
        msg = f"must be at least 1 second, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _app_spec(text: str) -> str:
    module, sep, attribute = text.partition(":")
    if not sep or not module or not attribute:
        msg = f"expected module:attribute (e.g. myapp.health:monitor), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"not a port number: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 <= value <= 65535:
        msg = f"must be 0..65535, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``resilient`` command."""
    parser = argparse.ArgumentParser(
        prog="resilient",
        description="Policy-file driven resilience: check, inspect and try out policies.",
        epilog="Exit status: 0 ok, 1 invalid policy file or input, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    no_env_help = "ignore RESILIENCE_* environment overrides"

    validate = commands.add_parser(
        "validate",
        help="check policy files (every problem, with file:line and key)",
        description="Load each policy file the way resilient does and report every problem "
        "(file:line, key, did-you-mean). Exit 1 if any file is invalid.",
    )
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="resilience.yaml or pyproject.toml"
    )
    validate.add_argument("--no-env", action="store_true", help=no_env_help)
    validate.set_defaults(handler=_cmd_validate)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of policy files (for editors)",
        description="Print the JSON Schema of a policy file. Editors using yaml-language-server "
        "validate a file whose first line is `# yaml-language-server: $schema=FILE`.",
    )
    schema.add_argument(
        "-o", "--output", metavar="FILE", help="write the schema to FILE instead of stdout"
    )
    schema.set_defaults(handler=_cmd_schema)

    show = commands.add_parser(
        "show",
        help="print policies as resolved (extends, env overrides, defaults)",
        description="Print the policies of FILE (or only NAME) after `extends` is merged, "
        "RESILIENCE_* overrides are applied and defaults are filled in. The output is a "
        "valid policy file.",
    )
    show.add_argument("file", metavar="FILE", help="resilience.yaml or pyproject.toml")
    show.add_argument("name", metavar="NAME", nargs="?", help="only this policy")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--no-env", action="store_true", help=no_env_help)
    show.set_defaults(handler=_cmd_show)

    demo = commands.add_parser(
        "demo",
        help="watch retries, a circuit breaker and a fallback handle a flaky service",
        description="Call a simulated flaky service (healthy -> degrading -> outage -> "
        "recovery) through three policies, in memory and in real time, and print what the "
        "retries, breakers and fallback do. Loads the demo's policies into this process.",
    )
    demo.add_argument(
        "-d",
        "--duration",
        type=_duration,
        default=15.0,
        metavar="SECONDS",
        help="how long the demo runs (default: 15; at least 1)",
    )
    demo.add_argument(
        "--seed", type=int, metavar="N", help="seed of the simulated service's randomness"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="print only the summary table")
    demo.set_defaults(handler=_cmd_demo)

    status = commands.add_parser(
        "status",
        help="print the fleet's shared breaker state (Redis backend)",
        description="Read the shared state from Redis: each policy's breaker state, "
        "generation and trips, and the replicas seen (docs/distributed.md). The Redis URL "
        "is --redis, else RESILIENCE_REDIS_URL, else the policy file's redis_url (FILE, or "
        "the file resilient would discover); the file's backend settings apply too.",
    )
    status.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        help="policy file (default: discovered as the library does)",
    )
    status.add_argument("--redis", metavar="URL", help="redis://, rediss:// or unix:// URL")
    status.add_argument(
        "--prefix",
        default=None,
        help="key prefix (default: the file's backend.key_prefix, else resilient)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)

    serve = commands.add_parser(
        "serve",
        help="serve a health monitor over HTTP (/health, /health/live, /health/ready, /metrics)",
        description="Import MODULE:ATTRIBUTE (a resilient.health.HealthMonitor, or a "
        "ResilienceManager whose health_monitor is served), start its checks and serve "
        "/health (application/health+json), /health/live, /health/ready and /metrics with "
        "uvicorn (the `server` extra). MODULE is imported from the current directory too.",
    )
    serve.add_argument(
        "--app",
        required=True,
        type=_app_spec,
        metavar="MODULE:ATTRIBUTE",
        help="where the monitor or manager is, e.g. myapp.health:monitor",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8080, help="port to bind (default: 8080)")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    serve.set_defaults(handler=_cmd_serve)

    from resilient.testing._cli import add_simulate_parser  # stdlib-only module

    add_simulate_parser(commands)

    # ---- chaos command group (resilient/chaos/_cli.py; stdlib-only at import) ----
    from resilient.chaos._cli import add_chaos_parser

    add_chaos_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``resilient`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `resilient show ... | head`: the reader went away
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
        except (OSError, ValueError):
            pass
        return EXIT_OK
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
