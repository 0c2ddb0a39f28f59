"""Builds the optional C extensions; everything else is in pyproject.toml.

All are optional: where one cannot be compiled (no C compiler, no OpenMP),
the install goes on and the engine steps through NumPy alone (``_kernels``),
the daemon decodes and encodes through wire.py (``consumers/codec/_codec.c``),
live quality updates its realized errors in NumPy (``_quality``).

The kernels link OpenBLAS from the ``scipy-openblas32`` wheel, a build
requirement and a dependency: its ``get_include_dir`` / ``get_lib_dir`` /
``get_library`` give the header and library to build against, and at run
time ``streamlstm.kernels`` imports the wheel first, which loads the library
into the process, so the extension needs no rpath to a build folder.
"""

import platform

from setuptools import Extension, setup

compile_args = ["-O3", "-ffast-math", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    # One clone per instruction set level, chosen at load time (see _kernels.c).
    compile_args.append("-DSL_TARGET_CLONES")

try:
    import scipy_openblas32 as openblas

    blas = {
        "include_dirs": [openblas.get_include_dir()],
        "library_dirs": [openblas.get_lib_dir()],
        "libraries": [openblas.get_library()],
        # Found at run time without the wheel imported first: beside an installed
        # streamlstm (site-packages/scipy_openblas32/lib), else where it was built against.
        "extra_link_args": [
            "-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib",
            f"-Wl,-rpath,{openblas.get_lib_dir()}",
        ],
    }
except ImportError:  # no BLAS to link: the extension is left out (optional)
    blas = {"include_dirs": ["/nonexistent-scipy-openblas32"], "extra_link_args": []}
blas["extra_link_args"] = ["-fopenmp", "-lm", *blas["extra_link_args"]]

setup(
    ext_modules=[
        Extension(
            "streamlstm._kernels",
            sources=["streamlstm/_kernels.c"],
            extra_compile_args=compile_args,
            optional=True,
            **blas,
        ),
        # Live quality's realized-error update: NaN marks an error not judged, and it
        # must round as NumPy does (the NumPy path gives the same figures, bit for
        # bit), so neither -ffast-math nor fused multiply-adds. `make test-sanitize`
        # builds it again with ASan and UBSan.
        Extension(
            "streamlstm._quality",
            sources=["streamlstm/_quality.c"],
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        ),
        # The codec parses untrusted Kafka bytes: a module of its own, without the
        # kernels' -ffast-math (which lets the compiler assume away the NaN and range
        # checks it makes) and without OpenMP. `make test-sanitize` builds it again with
        # ASan and UBSan.
        Extension(
            "streamlstm.consumers.codec._codec",
            sources=["consumers/codec/_codec.c"],
            extra_compile_args=["-O2"],
            extra_link_args=["-lm"],
            optional=True,
        ),
    ]
)
