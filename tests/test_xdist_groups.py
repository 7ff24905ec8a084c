"""The scheduling table of tests/conftest.py (``make test`` runs ``--dist loadgroup``): it names
files and tests by string, so a rename would silently put a shared fixture's tests back on every
worker; these checks fail instead."""

from __future__ import annotations

import ast
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import HEAVY_FIRST, XDIST_GROUPS, built_once, heavy_first_key, xdist_group

TESTS = Path(__file__).resolve().parent


def functions_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}  # fmt: skip


def test_every_grouped_module_and_test_exists() -> None:
    for module in XDIST_GROUPS:
        assert (TESTS / module).is_file(), module


def test_a_group_is_one_scope_and_other_tests_are_their_own() -> None:
    assert xdist_group("tests/test_demo.py::test_the_plot_is_a_real_picture") == "demo"
    assert xdist_group("tests/test_query.py::test_x[a]") == xdist_group("tests/test_query.py::test_y") == "query"
    assert xdist_group("tests/test_backfill.py::test_the_dask_backfill_equals_the_sequential_etl") is None
    assert xdist_group("tests/test_config.py::test_anything") is None


def test_every_heavy_first_test_exists() -> None:
    for entry in HEAVY_FIRST:
        module, name = entry.split("::")
        assert name in functions_of(TESTS / module), entry


def test_heavy_tests_go_first_and_a_group_goes_at_its_heaviest_tests_place() -> None:
    ranks = {"demo": 5}
    assert heavy_first_key(f"tests/{HEAVY_FIRST[0]}", ranks) == 0
    assert heavy_first_key(f"tests/{HEAVY_FIRST[2]}[param]", ranks) == 2
    assert heavy_first_key("tests/test_demo.py::test_anything_of_the_module", ranks) == 5
    assert heavy_first_key("tests/test_config.py::test_anything", ranks) == len(HEAVY_FIRST)


def test_built_once_builds_once_for_askers_at_the_same_time_and_again_after_a_failed_build(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:  # fmt: skip
    name = f"once-{tmp_path.name}"
    builds: list[int] = []
    started = threading.Barrier(4)

    def build(root: Path) -> None:
        builds.append(1)
        if len(builds) == 1:
            raise RuntimeError("the first build fails")
        (root / "made").write_text(str(len(builds)))

    def ask(_: int) -> Path | str:
        started.wait()
        try:
            return built_once(tmp_path_factory, name, build)
        except RuntimeError as exc:
            return str(exc)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    assert got.count("the first build fails") == 1 and len(builds) == 2  # one failure, one retry, then shared
    built = {g for g in got if isinstance(g, Path)}
    assert len(built) == 1 and (built.pop() / "made").read_text() == "2"
