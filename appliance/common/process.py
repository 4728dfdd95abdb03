"""Child-process helpers shared by the head, the worker and `anyway up`.

Children die with their parent (PR_SET_PDEATHSIG), so an agent killed with SIGKILL
does not leave an orphaned RPC server holding its port and memory; stopping is
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # parent already gone before prctl took effect
        os.kill(os.getpid(), sig)


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], *, grace_s: float) -> int | None:
    """SIGTERM, wait `grace_s`, then SIGKILL. Returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=5)
    except ProcessLookupError:
        return proc.poll()


async def aterminate(proc: asyncio.subprocess.Process, *, grace_s: float) -> int | None:
    """Async SIGTERM, then SIGKILL after `grace_s`, without blocking the event loop."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        # A stopped process cannot act on SIGTERM; let it see it.
        proc.send_signal(signal.SIGCONT)
    except ProcessLookupError:
        pass
    try:
        return await asyncio.wait_for(proc.wait(), timeout=grace_s)
    except asyncio.TimeoutError:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        return await proc.wait()
