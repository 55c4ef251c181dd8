"""Packaging beside pyproject.toml (which holds the metadata): the packages are found —
treeopt and every subpackage — and the shipped artefacts of the top-level ``profiles/``
travel in the wheel as ``treeopt/profiles/`` (:mod:`treeopt.paths` finds them there in an
installed package, and at the top level in a clone)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["treeopt", "treeopt.*"]) + ["treeopt.profiles"],
      package_dir={"treeopt.profiles": "profiles"})
