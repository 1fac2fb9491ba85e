"""The package list, which pyproject.toml's `find` cannot say: the packages found in the tree,
and `edge_runtime.recipes`, which is the top-level models/ folder (pyproject.toml maps it), so
that an installed wheel carries the model recipes (edge_runtime/models.py reads them there)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["edge_runtime*", "edge_wire*", "proxy*", "edge_client*", "edgectl*"]),
                "edge_runtime.recipes"])
