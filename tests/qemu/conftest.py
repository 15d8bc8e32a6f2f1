"""The ``qemu`` tier is opt-in: a boot test runs only when the ``-m`` expression names
``qemu`` (``make qemu-test`` does; ``make test`` deselects it), so a plain ``pytest`` never
spends a minute booting a VM because an image happens to be in the cache."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "qemu" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="boots a VM: run `make qemu-test` (pytest -m qemu)")
    for item in items:
        if item.get_closest_marker("qemu") is not None:
            item.add_marker(skip)
