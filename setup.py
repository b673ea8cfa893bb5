"""Build of the compiled modules (issue 13); everything else is in pyproject.toml."""

from __future__ import annotations

import os

from mypyc.build import mypycify
from setuptools import Extension, setup

HWBKPTD = ["_alloc", "_model", "_records", "_engine", "_stops", "_signals", "_prepared"]
PROTO = ["_connection"]

paths = [f"hwbkptd/{m}.py" for m in HWBKPTD] + [f"proto/hwbkpt_proto/{m}.py" for m in PROTO]
fastpath = Extension(
    "hwbkptd._fastpath",
    sources=["hwbkptd/_fastpath.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
setup(
    ext_modules=[
        fastpath,
        *mypycify(
            ["--no-warn-unused-configs", *paths],
            opt_level=os.environ.get("HWBKPT_MYPYC_OPT", "3"),
            separate=[
                ([p for p in paths if p.startswith("hwbkptd/")], "hwbkptd._native"),
                ([p for p in paths if p.startswith("proto/")], "hwbkpt_proto._native"),
            ],
        ),
    ]
)
