"""The one thing pyproject.toml cannot say without an experimental table: the optional C part.

holysheep/_speedups.c does the SSE decoder's common case. `optional=True`: on a machine without
a compiler or Python headers the build goes on without it, and the pure Python decoder does all
the work (HOLYSHEEP_NO_EXTENSIONS=1 forces that at run time too).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("holysheep._speedups", ["holysheep/_speedups.c"], optional=True)])
