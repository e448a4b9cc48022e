"""The package graph points one way: ``model`` ← ``pipelines.data`` ← ``pipelines.training`` ←
``pipelines.evaluation`` ← ``pipelines.experiments``, and ``pipelines.data`` ← ``pipelines.inference`` (batch
colorization); ``serve`` reads ``model`` only; ``jobs`` may use anything but never another job. Every import counts, including the ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("model", "pipelines", "serve", "jobs", "bench")

# A package (or subpackage) → the packages of this repo it may import.
ALLOWED = {
    "model": {"model"},
    "pipelines.data": {"model", "pipelines.data"},
    "pipelines.inference": {"model", "pipelines.data", "pipelines.inference"},
    "pipelines.training": {"model", "pipelines.data", "pipelines.training"},
    "pipelines.evaluation": {"model", "pipelines.data", "pipelines.training", "pipelines.evaluation"},
    "pipelines.experiments": {"model", "pipelines.data", "pipelines.training", "pipelines.evaluation",
                              "pipelines.experiments"},
    "serve": {"model", "serve"},
    "bench": {"model", "pipelines.data", "pipelines.inference", "pipelines.training", "pipelines.evaluation",
              "serve", "bench"},
    "jobs": {"model", "pipelines.data", "pipelines.inference", "pipelines.training", "pipelines.evaluation",
             "pipelines.experiments", "serve", "jobs.flags"},
}


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from jobs import flags`
    return found


def owner(module: str) -> str | None:
    """The key of ALLOWED a module of this repo belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] not in OURS:
        return None
    if parts[0] == "pipelines":
        return ".".join(parts[:2]) if len(parts) > 1 else "pipelines"
    if parts[0] == "jobs":
        return "jobs.flags" if parts[1:2] == ["flags"] else "jobs"
    return parts[0]


def violations(package: str, source: str) -> list[str]:
    allowed = ALLOWED[package]
    bad = []
    for module in sorted(imported_modules(source)):
        target = owner(module)
        if target is None or target in allowed or module in OURS:  # a bare package: `from jobs import flags`
            continue
        if package == "jobs" and target == "jobs":
            bad.append(f"imports the job {module} (jobs share code through the packages or jobs/flags.py)")
        else:
            bad.append(f"imports {module} ({target} is above {package} or beside it)")
    return bad


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "pipelines":
        return ".".join(parts[:2])
    return parts[0]


def repo_files() -> list[Path]:
    return sorted(p for top in ALLOWED if top.count(".") == 0 or top.startswith("pipelines.")
                  for p in (ROOT / top.replace(".", "/")).glob("*.py"))


def test_every_package_imports_only_what_lies_below_it():
    problems = []
    for path in repo_files():
        if path.name == "__init__.py" and path.parent.name == "pipelines":
            continue
        for problem in violations(package_of(path), path.read_text()):
            problems.append(f"{path.relative_to(ROOT)} {problem}")
    assert not problems, "\n".join(problems)


def test_pipelines_holds_nothing_loose_but_its_init():
    loose = sorted(p.name for p in (ROOT / "pipelines").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"put these in a stage subpackage of pipelines/: {loose}"
    stages = sorted(p.name for p in (ROOT / "pipelines").iterdir() if (p / "__init__.py").is_file())
    assert stages == ["data", "evaluation", "experiments", "inference", "training"]


@pytest.mark.parametrize("package,source,expected", [
    ("model", "def f():\n    from pipelines.data.layout import read_all\n", "pipelines.data.layout"),
    ("serve", "import pipelines.data.shards\n", "pipelines.data.shards"),
    ("pipelines.data", "from pipelines.training import loop\n", "pipelines.training"),
    ("jobs", "from jobs.train import build_parser\n", "the job jobs.train"),
])
def test_the_check_finds_an_upward_import_even_inside_a_function(package, source, expected):
    assert any(expected in problem for problem in violations(package, source))


def test_the_check_allows_the_shared_flags_and_downward_imports():
    assert violations("jobs", "from jobs import flags\nfrom pipelines.experiments.ablation import rung\n") == []
    assert violations("pipelines.evaluation", "from pipelines.training.tracking import tracking_uri\n") == []
