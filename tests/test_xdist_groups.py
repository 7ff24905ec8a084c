"""The scheduling table of tests/conftest.py (``make test`` runs ``--dist loadgroup``): it names
files and tests by string, so a rename would silently put a shared fixture's tests back on every
worker; these checks fail instead."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import BACKFILL_SECOND_HALF, XDIST_GROUPS, xdist_group

TESTS = Path(__file__).resolve().parent


def functions_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}  # fmt: skip


def test_every_grouped_module_and_test_exists() -> None:
    for module in XDIST_GROUPS:
        assert (TESTS / module).is_file(), module
    backfill = functions_of(TESTS / "test_backfill.py")
    assert backfill > BACKFILL_SECOND_HALF  # a strict superset: both halves have tests


def test_a_group_is_one_scope_and_other_tests_are_their_own() -> None:
    assert xdist_group("tests/test_demo.py::test_the_plot_is_a_real_picture") == "demo"
    assert xdist_group("tests/test_query.py::test_x[a]") == xdist_group("tests/test_query.py::test_y") == "query"
    halves = {xdist_group(f"tests/test_backfill.py::{name}") for name in functions_of(TESTS / "test_backfill.py")}
    assert halves == {"backfill_a", "backfill_b"}
    assert xdist_group("tests/test_config.py::test_anything") is None
