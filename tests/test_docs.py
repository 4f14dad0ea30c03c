"""
The docs are code: every ```python block of README.md and docs/*.md runs here.

The blocks of one page run as a reader would run them: in order, in one namespace,
in a fresh directory of their own (the current directory while they run), with the
policy registry, shared runtime state and event subscribers isolated
(:func:`resilient.testing.isolated_registry`) and no ``RESILIENCE_*`` variables.
Before each block, every YAML or TOML block the page showed above it that names a file
in a comment at its top (``# resilience.yaml``, ``# pyproject.toml``) is written to that
file, as the reader would have saved it; later blocks naming the same file replace it.

- A block with a top-level ``await`` runs as the body of a coroutine on the page's
  event loop (one loop per page, as in ``python -m asyncio``).
- A block that defines pytest tests (``def test_...``) has them run: a test without
  parameters is called (an ``async def`` one on the page's loop); tests that take
  fixtures are written, with the page's code, to a test file beside the page's files
  and run by pytest in a subprocess, as the reader would run them, with the plugin's
  fixtures (``virtual_clock``, ``policy_registry``, ...).
- A block marked ``<!-- needs: redis -->`` on the line before its fence is skipped:
  it needs a server the reader would have to start.

Each block is one test, named after its page and the line of its opening fence
(``docs/retries.md:42``); a traceback points at the lines of the page. A page runs
once per session, the first time one of its blocks is asked for.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import importlib.util
import inspect
import json
import linecache
import logging
import os
import re
import subprocess
import sys
import traceback
import types
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import resilient
import resilient.metrics
from resilient.testing import isolated_registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
_FILE_COMMENT = re.compile(r"^\s*#\s*(?P<name>[\w.-]+\.(?:ya?ml|toml))\b")
_NEEDS = re.compile(r"^\s*<!--\s*needs:\s*(?P<what>[\w-]+)\s*-->\s*$")
_SERVERS = frozenset({"redis"})
_PYTHON = frozenset({"python", "py"})
_FILES = frozenset({"yaml", "yml", "toml"})
#: Seconds one pytest subprocess (the fixture tests of one page) may take.
_SUBPROCESS_TIMEOUT = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # path relative to the repository, e.g. "docs/retries.md"
    line: int  # line of the opening fence, 1-based
    lang: str
    code: str
    needs: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def first_code_line(self) -> int:
        return self.line + 1

    def file_name(self) -> str | None:
        """
        For a YAML/TOML block: the file that a comment line at its top names
        (``# resilience.yaml``), if any; ``None`` for a fragment.
        """
        if self.lang not in _FILES:
            return None
        for line in self.code.splitlines():
            if not line.lstrip().startswith("#"):
                break
            if match := _FILE_COMMENT.match(line):
                return match["name"]
        return None


def parse_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of the Markdown file *path*, in order."""
    page = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        lang = match["info"].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(ticks) and set(stripped) == {ticks[0]}:
                break
            text = lines[i]
            body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
            i += 1
        needs = None
        if start > 0 and (marker := _NEEDS.match(lines[start - 1])):
            needs = marker["what"]
            if needs not in _SERVERS:
                msg = f"{page}:{start}: unknown server {needs!r} (known: {sorted(_SERVERS)})"
                raise ValueError(msg)
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", needs))
        i += 1
    return blocks


@functools.cache
def _page_blocks(path: Path) -> tuple[Block, ...]:
    # Parsed once: the run of a page sees the blocks that were collected.
    return tuple(parse_blocks(path))


def _python_blocks() -> list[Block]:
    return [b for page in PAGES for b in _page_blocks(page) if b.lang in _PYTHON]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What became of one block."""

    error: str | None = None  # a traceback or message; None: it ran and its tests passed
    skipped: str | None = None
    fixture_tests: list[str] = field(default_factory=list)


def _padded(block: Block) -> str:
    """The block's code at its own line numbers, so that tracebacks name page lines."""
    return "\n" * (block.first_code_line - 1) + block.code


def _register_source(filename: str, source: str) -> None:
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)


def _format(exc: BaseException, page: str) -> str:
    # Keep the frames from the page on: the harness's own frames say nothing.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != page:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _tests_of(block: Block, namespace: dict[str, Any]) -> list[tuple[str, Any]]:
    """The test functions that *block* defined, in the order it defines them."""
    tree = ast.parse(block.code)
    names = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    ]
    return [(name, namespace[name]) for name in names if callable(namespace.get(name))]


def _takes_fixtures(fn: Any) -> bool:
    return bool(inspect.signature(fn).parameters)


@contextlib.contextmanager
def _fresh_logging() -> Iterator[None]:
    """Logging as a new process has it (pytest's capture handlers are on the root logger)."""
    loggers = [logging.root] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    logging.root.handlers = []
    logging.root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg in logging.root.manager.loggerDict.values():
            if isinstance(lg, logging.Logger):
                lg.handlers = []
                lg.setLevel(logging.NOTSET)
        for lg, level, handlers, propagate, disabled in saved:
            lg.setLevel(level)
            lg.handlers = handlers
            lg.propagate = propagate
            lg.disabled = disabled


@contextlib.contextmanager
def _reader_setting(workdir: Path) -> Iterator[None]:
    """
    A fresh directory, no RESILIENCE_* variables, logging unconfigured, isolated
    policies and state.
    """
    saved_env = dict(os.environ)
    saved_cwd = Path.cwd()
    for name in [n for n in os.environ if n.startswith("RESILIENCE_")]:
        del os.environ[name]
    os.chdir(workdir)
    metrics_on = resilient.metrics.active() is not None
    try:
        with _fresh_logging(), isolated_registry():
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        # the process-wide switches a page may turn on, off again for the next page
        if not metrics_on:
            resilient.disable_metrics()
        resilient.disable_logging()


def _slug(text: str) -> str:
    return re.sub(r"\W", "_", text)


def run_page(
    path: Path, workdir: Path, root: Path = ROOT, blocks: Sequence[Block] | None = None
) -> dict[int, Outcome]:
    """
    Run every Python block of the page *path* (or the *blocks* parsed from it);
    the outcome of each, by the line of its fence.
    """
    if blocks is None:
        blocks = parse_blocks(path, root)
    page = path.relative_to(root).as_posix()
    outcomes: dict[int, Outcome] = {}
    module = types.ModuleType(f"docs_page_{_slug(page)}")
    module.__file__ = str(workdir / "page.py")
    namespace = module.__dict__
    first_failure: str | None = None
    loop: asyncio.AbstractEventLoop | None = None
    fixture_blocks: list[Block] = []
    sys.modules[module.__name__] = module
    try:
        with _reader_setting(workdir):
            for block in blocks:
                name = block.file_name()
                if name is not None:
                    (workdir / name).write_text(block.code, encoding="utf-8")
                    continue
                if block.lang not in _PYTHON:
                    continue
                outcome = outcomes[block.line] = Outcome()
                if block.needs is not None:
                    outcome.skipped = f"needs a {block.needs} server (marked on the page)"
                    continue
                source = _padded(block)
                _register_source(page, source)
                try:
                    # dont_inherit: not this module's `from __future__ import annotations`
                    code = compile(
                        source,
                        page,
                        "exec",
                        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                        dont_inherit=True,
                    )
                    result = eval(code, namespace)
                    if inspect.iscoroutine(result):
                        loop = loop or asyncio.new_event_loop()
                        loop.run_until_complete(result)
                    tests = _tests_of(block, namespace)
                    outcome.fixture_tests = [n for n, fn in tests if _takes_fixtures(fn)]
                    for test_name, fn in tests:
                        if test_name in outcome.fixture_tests:
                            continue
                        if inspect.iscoroutinefunction(fn):
                            loop = loop or asyncio.new_event_loop()
                            loop.run_until_complete(fn())
                        else:
                            fn()
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    outcome.error = _format(exc, page)
                    if first_failure is not None:
                        outcome.error += (
                            f"\n(an earlier block of this page failed too: {first_failure})"
                        )
                    else:
                        first_failure = block.id
                if outcome.fixture_tests:
                    fixture_blocks.append(block)
    finally:
        sys.modules.pop(module.__name__, None)
        if loop is not None:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    python = [b for b in blocks if b.lang in _PYTHON and b.needs is None]
    module_file = _write_module(page, python, workdir)
    _check_names(module_file, python, outcomes)
    if fixture_blocks:
        _run_fixture_tests(module_file, python, fixture_blocks, outcomes, workdir)
    return outcomes


def _write_module(page: str, blocks: list[Block], workdir: Path) -> Path:
    """The page's Python code as one module, each block at its own lines."""
    text: list[str] = []
    for block in blocks:
        text += [""] * (block.first_code_line - 1 - len(text))
        text += block.code.splitlines()
    path = workdir / f"test_{_slug(Path(page).stem)}_page.py"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def _check_names(module_file: Path, blocks: list[Block], outcomes: dict[int, Outcome]) -> None:
    """
    Names a block uses without defining or importing them, also inside function
    bodies that the page never calls: the reader who copies the block would hit a
    NameError later. (ruff's F821 on the page's module.)
    """
    if importlib.util.find_spec("ruff") is None:
        return
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--select",
            "F821",
            "--output-format",
            "json",
            "--exit-zero",
            str(module_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for problem in json.loads(done.stdout):
        row = problem["location"]["row"]
        for block in blocks:
            if block.first_code_line <= row < block.first_code_line + block.code.count("\n"):
                outcome = outcomes[block.line]
                message = f"{block.page}:{row}: {problem['message']}"
                outcome.error = f"{outcome.error}\n{message}" if outcome.error else message


def _run_fixture_tests(
    test_file: Path,
    blocks: list[Block],
    fixture_blocks: list[Block],
    outcomes: dict[int, Outcome],
    workdir: Path,
) -> None:
    """Run the tests that take fixtures from the page's module, with pytest."""
    for block in blocks:
        if _has_top_level_await(block):
            for b in fixture_blocks:
                outcomes[b.line].error = (
                    f"{block.id} has a top-level await: a page whose tests take fixtures "
                    "cannot also have one (the tests run from a module)"
                )
            return
    report = workdir / "report.xml"
    node_ids = [
        f"{test_file.name}::{n}" for b in fixture_blocks for n in outcomes[b.line].fixture_tests
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESILIENCE_", "PYTEST_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(workdir),
            "-c",
            os.devnull,
            f"--junitxml={report}",
            *node_ids,
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT,
        check=False,
    )
    results = _junit_results(report) if report.exists() else {}
    for block in fixture_blocks:
        outcome = outcomes[block.line]
        problems = []
        skips = []
        for name in outcome.fixture_tests:
            verdict = results.get(name)
            if verdict is None:
                problems.append(f"{name}: not run by pytest")
            elif verdict.startswith("skipped:"):
                # e.g. redis_server without a redis-server: the test's own decision
                skips.append(f"{name}: {verdict}")
            elif verdict:
                problems.append(f"{name}: {verdict}")
        if skips and not problems and outcome.error is None:
            outcome.skipped = "; ".join(skips)
        if problems:
            message = (
                f"pytest ran the tests of {block.id} (file {test_file.name}, lines as on the "
                "page):\n" + "\n".join(problems) + f"\n\n{done.stdout}\n{done.stderr}"
            )
            outcome.error = f"{outcome.error}\n\n{message}" if outcome.error else message


def _has_top_level_await(block: Block) -> bool:
    try:
        ast.parse(block.code)
    except SyntaxError:
        return True  # compile() accepted it only with PyCF_ALLOW_TOP_LEVEL_AWAIT
    return False


def _junit_results(report: Path) -> dict[str, str]:
    """Test name -> "" (passed) or what went wrong."""
    results: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        verdict = ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                verdict = f"{kind}: {found.get('message', '')}"
                break
        results[name] = verdict
    return results


_RUNS: dict[Path, dict[int, Outcome]] = {}


@pytest.fixture(scope="session")
def run_docs_page(tmp_path_factory: pytest.TempPathFactory) -> Any:
    def run(path: Path) -> dict[int, Outcome]:
        if path not in _RUNS:
            workdir = tmp_path_factory.mktemp(path.stem)
            _RUNS[path] = run_page(path, workdir, blocks=_page_blocks(path))
        return _RUNS[path]

    return run


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: b.id)
def test_doc_block(block: Block, run_docs_page: Any) -> None:
    outcome = run_docs_page(ROOT / block.page)[block.line]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    if outcome.error:
        pytest.fail(f"{block.id} fails:\n{outcome.error}", pytrace=False)


# ------------------------------------------------------------------ the harness itself


class TestHarness:
    """The harness catches what it promises to catch."""

    def _run(self, tmp_path: Path, text: str) -> dict[int, Outcome]:
        (tmp_path / "docs").mkdir()
        (tmp_path / "work").mkdir()
        page = tmp_path / "docs" / "page.md"
        page.write_text(text, encoding="utf-8")
        return run_page(page, tmp_path / "work", root=tmp_path)

    def test_blocks_share_a_namespace_files_and_report_page_lines(self, tmp_path: Path) -> None:
        outcomes = self._run(
            tmp_path,
            "# t\n\n```yaml\n# resilience.yaml\nversion: 1\npolicies:\n  p: {}\n```\n\n"
            "```python\nimport resilient\n"
            "x = sorted(resilient.load_policies('resilience.yaml'))\n```\n"
            "\n```python\nassert x == ['p']\nawait __import__('asyncio').sleep(0)\n"
            "assert x == ['q'], 'wrong'\n```\n",
        )
        assert outcomes[10].error is None
        error = outcomes[15].error
        assert error is not None
        assert "AssertionError: wrong" in error
        assert ' "docs/page.md", line 18' in error

    def test_test_functions_are_run(self, tmp_path: Path) -> None:
        outcomes = self._run(
            tmp_path,
            "```python\ndef test_plain():\n    assert 1 == 2\n\n"
            "def test_fixture(virtual_clock):\n    assert virtual_clock.now == 1.0\n```\n\n"
            "<!-- needs: redis -->\n```python\nraise SystemExit\n```\n",
        )
        error = outcomes[1].error
        assert error is not None
        assert "assert 1 == 2" in error
        assert "test_fixture: failure" in error
        assert outcomes[10].skipped

    def test_undefined_names_are_caught_even_in_uncalled_functions(self, tmp_path: Path) -> None:
        outcomes = self._run(
            tmp_path,
            "```python\nimport logging\nlog = logging.getLogger('x')\n```\n\n"
            "```python\ndef handler(exc):\n    log.warning('%s', exc)\n"
            "    return CACHE.get('k')\n```\n",
        )
        assert outcomes[1].error is None
        error = outcomes[6].error
        assert error is not None
        assert "docs/page.md:9: Undefined name `CACHE`" in error
        assert "`log`" not in error  # defined by the block before

    def test_files_named_below_a_modeline_and_replaced_by_later_blocks(
        self, tmp_path: Path
    ) -> None:
        outcomes = self._run(
            tmp_path,
            "```yaml\n# yaml-language-server: $schema=s.json\n# resilience.yaml\n"
            "policies:\n  a: {}\n```\n\n"
            "```python\nimport resilient\nassert resilient.policy_names() == ['a']\n```\n\n"
            "```yaml\npolicies:\n  fragment: {}\n```\n\n"
            "```yaml\n# resilience.yaml\npolicies:\n  b: {}\n```\n\n"
            "```python\nfrom pathlib import Path\n"
            "assert 'b:' in Path('resilience.yaml').read_text()\n```\n",
        )
        assert outcomes[8].error is None
        assert outcomes[24].error is None
