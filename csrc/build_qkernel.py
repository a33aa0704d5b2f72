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

# -O3 and no -ffast-math: the kernel's rounding rules (window bounds, slot
# residuals) are defined in IEEE double and the numpy reference repeats them.
_compile = ["-O3", "-std=c99", "-Wall", "-Wextra", "-fno-math-errno"]
_link: list[str] = ["-pthread"]
_sanitize = os.environ.get("QNODED_SANITIZE", "")
if _sanitize == "address":
    _san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    _compile = ["-std=c99", "-Wall", "-Wextra", *_san, "-O1", "-g"]
    _compile.append("-fno-sanitize-recover=undefined")  # a UB report fails the test run
    _link = [*_san, "-pthread"]
elif _sanitize:
    raise ValueError(f"QNODED_SANITIZE={_sanitize!r}: only 'address' is supported")

# Integer constants of the header, declared "..." so the compiler fills them in.
CONSTANTS = (
    "QK_OK",
    "QK_EINVAL",
    "QK_ENOTSORTED",
    "QK_ECAPACITY",
    "QK_ENOTBIT",
    "QK_ERANGE",
    "QP_ENOTCONVERGED",
    "QP_MAX_PASSES",
    "QK_T_MIN",
    "QK_T_MAX",
    "QK_WINDOW_MAX",
)

HEADERS = ("qkernel.h", "qpost.h")
SOURCES = ("qkernel.c", "qpost.c")


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
            for header in HEADERS
            for line in (HERE / header).read_text().splitlines()
            if not line.startswith("#")
        )
        + "".join(f"#define {name} ...\n" for name in CONSTANTS)
    )
    ffi.set_source(
        module,
        "".join(f'#include "{header}"\n' for header in HEADERS),
        sources=[str(HERE / src) if absolute else f"csrc/{src}" for src in SOURCES],
        include_dirs=[str(HERE)],
        extra_compile_args=_compile,
        extra_link_args=_link,
        # GMP: the privacy-amplification hash multiplies numbers of 1e8 bits.
        libraries=["gmp", "m"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
