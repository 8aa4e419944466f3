"""The layout: every module imports on its own (a move that breaks an import fails here first)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import alignkit

MODULES = sorted(m.name for m in pkgutil.walk_packages(alignkit.__path__, "alignkit."))


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__name__ == name
