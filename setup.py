"""The package list, found rather than kept by hand; every other setting is in pyproject.toml.

A hand-kept list in pyproject lost a subpackage three times (the wheel then failed at import).
pyproject's `packages.find` cannot express this tree: configs/ and kernels/ sit at the top of the
repository and install as `qmoe_cli.configs` and `qmoe_cli.native` (pyproject's package-dir), so
the list is every directory under qmoe_cli/ plus those two. Directories without an __init__.py
count too (namespace search), so a new stage or asset ships unasked; tests/test_wheel.py
compares the built wheel with the tree.
"""

from setuptools import find_namespace_packages, setup

# Data directories (assets/tiny-switch, ...) are found too: each ships all its files
# (pyproject's package-data), and setuptools warns about a data directory left out.
packages = find_namespace_packages(include=["qmoe_cli", "qmoe_cli.*"], exclude=["*__pycache__*"])
setup(packages=[*packages, "qmoe_cli.configs", "qmoe_cli.native"])
