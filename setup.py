"""Build hook: the installed package carries the shipped digits (its default dataset).

The design keeps the dataset in the checkout's top-level ``data/``; a wheel or a
``pip install .`` copies it into the package at build time, where
``mpicnn.config.data`` finds it when there is no checkout around the package.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# checkout file -> where the installed package carries it
SHIPPED = {"data/digits.h5": "mpicnn/data/digits.h5",
           "data/README.md": "mpicnn/data/digits.md"}      # its source and licence


class BuildWithData(build_py):
    """``build_py`` that also copies the shipped dataset into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):   # an editable install reads the checkout
            return
        for source, target in SHIPPED.items():
            self.copy_file(source, str(Path(self.build_lib) / target))


setup(cmdclass={"build_py": BuildWithData})
