# Only the cffi module lives here; all metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build_qkernel.py:ffibuilder"])
