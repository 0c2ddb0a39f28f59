"""Builds the engine's optional C kernels; everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler, no
OpenMP), the install goes on and the engine steps through torch alone.
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
            sources=["streamlstm/_kernels.c", "streamlstm/_codec.c"],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        )
    ]
)
