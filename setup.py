"""The package's metadata is in setup.cfg; the build system in pyproject.toml."""
from setuptools import setup

setup()
