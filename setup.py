"""The one compiled part: the mesh's forwarding step in C (see src/corral/dataplane/_fastpoll.c).

Optional: without a C compiler, or off Linux, the build goes on without it and the mesh
forwards in Python (corral.dataplane.reactor picks whichever is there).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(Extension(
        "corral.dataplane._fastpoll",
        ["src/corral/dataplane/_fastpoll.c"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        optional=True,
    ))

setup(ext_modules=ext_modules)
