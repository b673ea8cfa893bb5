"""Shared fixtures: target programs (tests/_progs.py) and the daemon (tests/_daemon.py)."""

from tests._daemon import *  # noqa: F403
from tests._progs import *  # noqa: F403
