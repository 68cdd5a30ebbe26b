"""Docs that cannot rot: every example validated, every tutorial executed, every path real.

- every file in ``examples/`` (and ``infra/federation.yaml``) passes ``fedpipe validate``;
- every ``yaml`` block of the docs validates against ``FederationConfig`` (a block that is
  not a federation config says so: ``<!-- docs-test: skip: REASON -->`` on the line before);
- the tutorials' ``bash`` and ``python`` blocks run in order in a scratch folder, as a reader
  runs them (a block whose fence carries ``title="FILE"`` is written to FILE first); a block
  that cannot run here is marked skip with its reason; elsewhere ``<!-- docs-test: run -->``
  opts a block in;
- every repository path and ``fl_components`` name the docs mention exists;
- the generated configuration reference lists every field of ``FederationConfig`` with its
  default, checked against the model's JSON schema and a default instance;
- the README is short and its first commands are ``make demo`` and ``make test``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
TUTORIALS = DOCS / "tutorials"
EXAMPLES = [*sorted((REPO / "examples").glob("*.yaml")), REPO / "infra" / "federation.yaml"]

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<lang>[\w-]*)(?P<info>.*)$")
MARKER = re.compile(
    r"^\s*<!--\s*docs-test:\s*(?P<verb>skip|run)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$"
)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a docs page."""

    page: Path
    line: int
    lang: str
    title: str | None
    body: str
    marker: str | None  # "skip", "run" or None
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def in_tutorial(self) -> bool:
        return self.page.is_relative_to(TUTORIALS)

    @property
    def runs(self) -> bool:
        """Executed by the tutorial test: a tutorial's bash/python block unless skipped."""
        if self.marker == "skip" or self.lang not in ("bash", "python", "yaml"):
            return False
        if self.lang == "yaml" or (self.lang == "python" and self.title):
            return self.title is not None and (self.in_tutorial or self.marker == "run")
        return self.in_tutorial or self.marker == "run"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a markdown page, each with the docs-test marker before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            body.append(lines[end][len(indent) :] if lines[end].startswith(indent) else lines[end])
            end += 1
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = MARKER.match(lines[before]) if before >= 0 else None
        title = TITLE.search(opening["info"])
        blocks.append(
            Block(
                page=page,
                line=index + 1,
                lang=opening["lang"],
                title=title["title"] if title else None,
                body="\n".join(body) + "\n",
                marker=marker["verb"] if marker else None,
                reason=(marker["reason"] or "").strip() if marker else None,
            )
        )
        index = end + 1
    return blocks


PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [block for page in PAGES for block in parse_blocks(page)]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _console_script() -> tuple[str, str]:
    """(module, function) of the ``fedpipe`` console script, as pyproject.toml declares it."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fedpipe"].partition(":")
    return module, function


# --- examples and config snippets -----------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_passes_fedpipe_validate(path: Path) -> None:
    module, _ = _console_script()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from {module} import app; app()",
            "validate",
            str(path),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"name"' in done.stdout  # it printed the config with its defaults


YAML_BLOCKS = [
    b
    for b in [*BLOCKS, *parse_blocks(REPO / "README.md")]
    if b.lang == "yaml" and b.marker != "skip"
]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.where)
def test_every_yaml_block_in_the_docs_is_a_valid_config(block: Block) -> None:
    from fl_components.config import config_from_dict

    raw = yaml.safe_load(block.body)
    assert isinstance(raw, dict), f"{block.where}: a yaml block must be a config (a mapping)"
    config_from_dict(raw, source=block.where)  # raises ConfigError naming the bad field


def test_every_skip_says_why_and_every_tutorial_block_names_its_language() -> None:
    unexplained = [b.where for b in BLOCKS if b.marker == "skip" and not b.reason]
    assert not unexplained, f"docs-test: skip without a reason at {unexplained}"
    unnamed = [b.where for b in BLOCKS if b.in_tutorial and not b.lang]
    assert not unnamed, f"tutorial blocks without a language (bash, python, yaml, text): {unnamed}"


def test_the_blocks_are_found() -> None:
    # the parser itself: a page of known shape gives the blocks it holds
    assert len(YAML_BLOCKS) >= 8
    csv = [b for b in BLOCKS if b.page.name == "own-csv-files.md" and b.runs]
    assert [(b.lang, b.title) for b in csv][:3] == [
        ("python", "make_data.py"),
        ("bash", None),
        ("yaml", "my-federation.yaml"),
    ]


# --- the tutorials, executed ----------------------------------------------------------

TUTORIAL_PAGES = sorted({b.page for b in BLOCKS if b.runs})


def _trains(page: Path) -> bool:
    return any(re.search(r"\bfedpipe (run|demo)\b", b.body) for b in parse_blocks(page) if b.runs)


def _scratch(tmp_path: Path) -> dict[str, str]:
    """A reader's folder: the repo's examples and infra beside, this checkout's fedpipe first."""
    for name in ("examples", "infra"):
        (tmp_path / name).symlink_to(REPO / name)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    module, function = _console_script()
    fedpipe = bin_dir / "fedpipe"
    fedpipe.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; sys.argv[0] = \'fedpipe\'; '
        f'from {module} import {function}; sys.exit({function}())" "$@"\n'
    )
    fedpipe.chmod(0o755)
    python = bin_dir / "python"  # a script, not a link: a link loses the venv
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FEDPIPE_"))
    }
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "COLUMNS": "120",
    }


def run_page(page: Path, tmp_path: Path) -> list[tuple[str, float]]:
    """Run a page's runnable blocks in order in ``tmp_path``; (block, seconds) per block."""
    env = _scratch(tmp_path)
    timings: list[tuple[str, float]] = []
    for block in parse_blocks(page):
        if not block.runs:
            continue
        started = time.perf_counter()
        if block.title:
            target = tmp_path / block.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body)
            continue
        if block.lang == "python":
            command = [sys.executable, "-c", block.body]
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.body]
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{output}"
        assert "Traceback" not in output, f"{block.where} printed a traceback:\n{output}"
        timings.append((block.where, time.perf_counter() - started))
    return timings


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if _trains(p) else [], id=p.name)
        for p in TUTORIAL_PAGES
    ],
)
def test_tutorial_runs_as_written(page: Path, tmp_path: Path) -> None:
    timings = run_page(page, tmp_path)
    assert timings, f"{page.name}: no block ran"
    print(f"{page.relative_to(REPO)}: {sum(s for _, s in timings):.1f} s", *timings, sep="\n  ")


# --- paths and names the docs mention -------------------------------------------------

PATH = re.compile(r"`((?:fl_components|flows|tasks|ops|tests|benchmarks|infra|examples)/[\w./-]*)")
NAME = re.compile(r"`(fl_components(?:\.\w+)+)")
API = re.compile(r"^:::\s*([\w.]+)", re.M)


def _mentions(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found = []
    for page in [*PAGES, REPO / "README.md"]:
        text = page.read_text(encoding="utf-8")
        found += [(str(page.relative_to(REPO)), m) for m in pattern.findall(text)]
    return found


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = [
        (page, path) for page, path in _mentions(PATH) if not (REPO / path.rstrip(".,:;")).exists()
    ]
    assert not missing, f"paths named in the docs that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_every_fl_components_name_the_docs_use_resolves() -> None:
    names = _mentions(NAME) + [
        (str(p.relative_to(REPO)), m) for p in PAGES for m in API.findall(p.read_text())
    ]
    assert names
    broken = [(page, name) for page, name in names if not _resolves(name)]
    assert not broken, f"names in the docs that do not import: {broken}"


# --- the generated configuration reference --------------------------------------------


def _schema_paths(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every field path of the JSON schema (sections too, lists as ``name[]``)."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return defs[node["$ref"].rsplit("/", 1)[1]]
        if "allOf" in node and len(node["allOf"]) == 1:
            return resolve(node["allOf"][0])
        return node

    paths: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, prop in resolve(node).get("properties", {}).items():
            path = f"{prefix}{name}"
            paths[path] = prop
            target = resolve(prop)
            if "properties" in target:
                walk(target, f"{path}.")
            elif target.get("type") == "array" and "items" in target:
                items = resolve(target["items"])
                if "properties" in items:
                    walk(items, f"{path}[].")

    walk(schema, "")
    return paths


def _reference_rows(page: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in page.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`") and len(cells) == 5:
            rows[cells[0].strip("`")] = cells
    return rows


def test_config_reference_lists_every_field_of_the_model_with_its_default() -> None:
    from fl_components.config import FederationConfig

    page = _hooks().config_reference()
    rows = _reference_rows(page)
    schema = _schema_paths(FederationConfig.model_json_schema())
    assert set(rows) == set(schema), (
        f"missing from the reference: {sorted(set(schema) - set(rows))}; "
        f"not in the model: {sorted(set(rows) - set(schema))}"
    )
    for path, cells in rows.items():
        declared = schema[path]
        if cells[2] == "(section)" or path == "sites":
            continue
        if "default" not in declared:
            assert cells[2] == "required", (
                f"{path}: no default in the model, {cells[2]} in the page"
            )
            continue
        shown = json.loads(cells[2].strip("`"))
        assert shown == declared["default"], (
            f"{path}: the reference says {cells[2]}, the model {declared['default']!r}"
        )
        description = " ".join(schema[path].get("description", "").split())
        start = description[:20].replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
        assert start in cells[4], f"{path}: description {description!r} not in {cells[4]!r}"


def test_cli_reference_lists_every_command() -> None:
    hooks = _hooks()
    page = hooks.cli_reference()
    _, root = hooks.cli_app()
    commands = [path for path, _ in hooks.cli_commands(root, "fedpipe")]
    assert len(commands) > 10
    for path in commands:
        assert f"## `{path}`" in page, path
    assert "`--rounds`" in page and "`--database-url`" in page


# --- the README ------------------------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 160, "the README is a front page: move detail to docs/"
    blocks = parse_blocks(REPO / "README.md")
    commands_before = [
        line
        for line in readme.split("```", 1)[0].splitlines()
        if re.match(r"\s*(\$ |make |fedpipe )", line)
    ]
    assert not commands_before, f"a command comes before the set-up block: {commands_before}"
    first = next(b for b in blocks if b.lang in ("bash", "sh", "shell", ""))
    assert first.line == next(b.line for b in blocks), "the first code block is the set-up"
    commands = [line.split("#", 1)[0].strip() for line in first.body.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_readme_links_into_the_docs_resolve() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
