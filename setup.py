"""Only the compiled histogram kernel is configured here; everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and calibration uses
the (slower, identical) numpy path. ``int8pipe`` logs which one a calibration used.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline.calibration._histogram",
            sources=["pipeline/calibration/_histogram.c"],
            optional=True,
        )
    ]
)
