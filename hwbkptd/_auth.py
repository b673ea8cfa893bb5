"""Who may act on which process: the kernel's ptrace access rule, applied to the peer.

A client may act on a process only if it could ``ptrace`` that process itself
(``__ptrace_may_access`` in kernel/ptrace.c, without LSMs): it has ``CAP_SYS_PTRACE`` in its
effective set (root normally has), or its uid equals the target's real, effective and
saved uids, its gid equals the target's real, effective and saved gids, and the target is
dumpable. Nobody may target the daemon itself. The check runs at every request that names a
process or thread, because a target's credentials change (a setuid exec).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hwbkpt_proto import HwbkptError, NoSuchProcessError, PermissionDeniedError
from hwbkptd import _kernel

__all__ = ["CAP_SYS_PTRACE", "Peer", "authorize", "has_cap_sys_ptrace"]

CAP_SYS_PTRACE = 19


def has_cap_sys_ptrace(pid: int) -> bool:
    """Whether process ``pid`` (a peer) has CAP_SYS_PTRACE in its effective set."""
    try:
        return bool(_kernel.effective_caps(pid) >> CAP_SYS_PTRACE & 1)
    except HwbkptError:
        return False


@dataclass(frozen=True, slots=True)
class Peer:
    """A client's credentials (SO_PEERCRED at connect) and whether it may trace anything.

    ``privileged`` is decided once per connection, as the credentials it stands on are
    those of the moment the client connected.
    """

    pid: int
    uid: int
    gid: int
    privileged: bool

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> Peer:
        return cls(pid, uid, gid, uid == 0 or has_cap_sys_ptrace(pid))


def authorize(peer: Peer, target: int) -> None:
    """Raise PermissionDeniedError unless ``peer`` may ptrace process ``target``.

    A privileged peer needs no look-up (a missing process fails later with ESRCH where it
    is used); anyone else is checked against the target's credentials as they are now.
    Raises NoSuchProcessError if ``target`` does not exist.
    """
    if target == os.getpid():
        raise PermissionDeniedError(
            f"process {target} is hwbkptd itself: the daemon never traces itself, so nobody "
            "may watch it, stop it, or read or write its registers or memory through it"
        )
    if target <= 0:
        raise NoSuchProcessError(f"there is no process {target}")
    if peer.privileged:
        return
    try:
        creds = _kernel.proc_creds(target)
    except NoSuchProcessError:
        raise
    except HwbkptError as err:
        raise NoSuchProcessError(f"process {target} cannot be inspected: {err}") from err
    uids = {creds.ruid, creds.euid, creds.suid}
    gids = {creds.rgid, creds.egid, creds.sgid}
    if uids != {peer.uid} or gids != {peer.gid}:
        raise PermissionDeniedError(
            f"you (uid {peer.uid}, gid {peer.gid}) may not act on process {target} "
            f"(uids {creds.ruid}/{creds.euid}/{creds.suid}, gids {creds.rgid}/{creds.egid}/"
            f"{creds.sgid}): the ptrace rule needs all of them equal to yours, or CAP_SYS_PTRACE"
        )
    if not creds.dumpable:
        raise PermissionDeniedError(
            f"process {target} is not dumpable (setuid, or prctl(PR_SET_DUMPABLE, 0)); "
            "the ptrace rule lets only CAP_SYS_PTRACE act on it"
        )
