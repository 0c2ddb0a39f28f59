"""Builds the optional C extensions; everything else is in pyproject.toml.

Both are optional: where one cannot be compiled (no C compiler, no OpenMP),
the install goes on and the engine steps through torch alone (``_kernels``),
the daemon decodes and encodes through wire.py (``_codec``).
"""

import platform

from setuptools import Extension, setup

compile_args = ["-O3", "-ffast-math", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    # One clone per instruction set level, chosen at load time (see _kernels.c).
    compile_args.append("-DSL_TARGET_CLONES")

setup(
    ext_modules=[
        Extension(
            "streamlstm._kernels",
            sources=["streamlstm/_kernels.c"],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        ),
        # The codec parses untrusted Kafka bytes: a module of its own, without the
        # kernels' -ffast-math (which lets the compiler assume away the NaN and range
        # checks it makes) and without OpenMP. `make test-sanitize` builds it again with
        # ASan and UBSan.
        Extension(
            "streamlstm._codec",
            sources=["streamlstm/_codec.c"],
            extra_compile_args=["-O2"],
            extra_link_args=["-lm"],
            optional=True,
        ),
    ]
)
