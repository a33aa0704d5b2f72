"""cffi builder for qnoded's C kernel (out-of-line API mode, built at install time).

``setup.py`` names this file in ``cffi_modules``; pip compiles the extension
``qnoded._qkernel`` from ``csrc/qkernel.c``.  ``QNODED_SANITIZE=address``
builds it with AddressSanitizer and UBSan for the sanitizer test.
"""

from __future__ import annotations

import os
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

_compile = ["-O3", "-std=c99", "-Wall", "-Wextra"]
_link: list[str] = []
if os.environ.get("QNODED_SANITIZE") == "address":
    _compile = ["-O1", "-g", "-std=c99", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                "-fno-sanitize-recover=undefined"]
    _link = ["-fsanitize=address,undefined"]


def make_builder(module: str = "qnoded._qkernel", *, absolute: bool = False) -> cffi.FFI:
    """The FFI builder for the kernel, as extension ``module``.

    setuptools (pip install) wants the source path relative to the project
    root; ``ffi.compile()`` elsewhere (the sanitizer test) needs it absolute.
    """
    ffi = cffi.FFI()
    # The header's prototypes, and its constants as "..." so the C compiler
    # fills in their values (one source of truth).
    ffi.cdef(
        "\n".join(
            line
            for line in (HERE / "qkernel.h").read_text().splitlines()
            if not line.startswith("#")
        )
        + "".join(
            f"#define {name} ...\n"
            for name in ("QK_OK", "QK_EINVAL", "QK_ENOTSORTED", "QK_ECAPACITY", "QK_ENOTBIT")
        )
    )
    ffi.set_source(
        module,
        '#include "qkernel.h"',
        sources=[str(HERE / "qkernel.c") if absolute else "csrc/qkernel.c"],
        include_dirs=[str(HERE)],
        extra_compile_args=_compile,
        extra_link_args=_link,
        libraries=["m"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
