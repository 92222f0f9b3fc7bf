"""Every public module declares its surface in a sorted ``__all__`` that names real objects."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["bus", "producers", "consumers", "connectors", "schemas"]


def _modules():
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        yield package
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_all_is_sorted_and_complete(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not name.count(".") or name.endswith("__init__"), f"{name} has no __all__"
        return
    assert list(exported) == sorted(exported), f"{name}.__all__ is not sorted"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing objects: {missing}"
