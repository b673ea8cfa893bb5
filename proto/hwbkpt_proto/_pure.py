"""``HWBKPT_PURE=1``: run the Python source of modules that are also built compiled.

Where the package was built with its compiled modules (issue 13: ``hwbkptd._fastpath``
in C, and the request path's pure modules compiled by mypyc, listed in ``setup.py``), an
extension module sits next to each compiled ``.py`` file, and the import system prefers
it (``importlib.machinery.EXTENSION_SUFFIXES`` come before ``SOURCE_SUFFIXES`` in each
path entry's loaders). With ``HWBKPT_PURE`` set to anything but ``""`` or ``"0"``, a finder
placed first on ``sys.meta_path`` loads every submodule of the listed packages from its
``.py`` file instead, so the suite runs the same source both ways (``make pytest-pure``).
It must be installed before the first submodule is imported: ``hwbkpt_proto`` does it for
itself when this module is imported, first thing in its ``__init__``; ``hwbkptd`` calls
:func:`source_first` in its own ``__init__``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["compiled_modules", "pure", "source_first"]


def pure() -> bool:
    """Whether ``HWBKPT_PURE`` asks for the Python source everywhere."""
    return os.environ.get("HWBKPT_PURE", "") not in ("", "0")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` file of a submodule of the packages in ``packages``."""

    def __init__(self) -> None:
        self.packages: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.rpartition(".")
        if parent not in self.packages or not path:
            return None
        for entry in path:
            source = os.path.join(entry, name + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None  # not a plain module (a package, or the C extension): the usual finders


_FINDER = _SourceFirst()


def source_first(package: str) -> None:
    """Load ``package``'s submodules from source from now on, if ``HWBKPT_PURE`` is set.
    Call it in the package's ``__init__``, before it imports any submodule."""
    if not pure():
        return
    _FINDER.packages.add(package)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def compiled_modules(*packages: str) -> list[str]:
    """The imported submodules of ``packages`` that run compiled (an extension module),
    sorted: what ``status`` and the daemon's startup log report."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.rpartition(".")[0] in packages
        and not name.endswith("__mypyc")  # the library a group of mypyc modules shares
        and str(getattr(module, "__file__", "") or "").endswith(suffixes)
    )


source_first(__name__.rpartition(".")[0])
