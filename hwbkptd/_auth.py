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

from hwbkpt_proto import HwbkptError, NoSuchProcessError, PermissionDeniedError
from hwbkptd import _kernel

__all__ = ["CAP_SYS_PTRACE", "authorize", "has_cap_sys_ptrace"]

CAP_SYS_PTRACE = 19


def has_cap_sys_ptrace(pid: int) -> bool:
    """Whether process ``pid`` (a peer) has CAP_SYS_PTRACE in its effective set."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except OSError:
        return False
    return False


def authorize(peer_pid: int, peer_uid: int, peer_gid: int, target: int) -> None:
    """Raise PermissionDeniedError unless the peer may ptrace ``target``.

    Raises NoSuchProcessError if ``target`` does not exist.
    """
    if target == os.getpid():
        raise PermissionDeniedError(
            f"process {target} is hwbkptd itself; nobody may set watches on the daemon"
        )
    if target <= 0:
        raise NoSuchProcessError(f"there is no process {target}")
    try:
        creds = _kernel.proc_creds(target)
    except NoSuchProcessError:
        raise
    except HwbkptError as err:
        raise NoSuchProcessError(f"process {target} cannot be inspected: {err}") from err
    if peer_uid == 0 or has_cap_sys_ptrace(peer_pid):
        return
    uids = {creds.ruid, creds.euid, creds.suid}
    gids = {creds.rgid, creds.egid, creds.sgid}
    if uids != {peer_uid} or gids != {peer_gid}:
        raise PermissionDeniedError(
            f"you (uid {peer_uid}, gid {peer_gid}) may not act on process {target} "
            f"(uids {creds.ruid}/{creds.euid}/{creds.suid}, gids {creds.rgid}/{creds.egid}/"
            f"{creds.sgid}): the ptrace rule needs all of them equal to yours, or CAP_SYS_PTRACE"
        )
    if not creds.dumpable:
        raise PermissionDeniedError(
            f"process {target} is not dumpable (setuid, or prctl(PR_SET_DUMPABLE, 0)); "
            "the ptrace rule lets only CAP_SYS_PTRACE act on it"
        )
