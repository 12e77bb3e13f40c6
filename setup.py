"""Build script: the package, plus the C++/CUDA extension ``alig_fused._C`` (see csrc/)."""

from setuptools import setup

setup()
