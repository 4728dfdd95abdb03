"""The head's allow-list of node identities, followed as it changes on disk.

Why its own module: the allow-list is what `anyway keys add` and `anyway keys revoke` edit
(DIR/nodes/*.key), and a revocation must take effect at once, not at the head's next
restart. `KeyRing` reloads the directory when its listing changes (checked every
KEYS_RELOAD_INTERVAL_S) and reports who was added and who was revoked; the control server
authenticates against it (the ZAP handler maps each Curve key to its node's name) and the
engine's data-plane tunnels pin the certificates it holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from appliance.common import logs
from appliance.common.keys import Identity, allow_list_stamp, load_allow_list

log = logs.get("head.keys")


class KeyRing:
    def __init__(self, *, keys_dir: Path, on_change: Callable[[set[str], set[str], list[str]], None]) -> None:
        """`on_change(added, revoked, errors)` is called after each reload that changed something."""
        self.keys_dir = keys_dir
        self.on_change = on_change
        self.nodes: dict[str, Identity] = {}
        self.by_curve: dict[bytes, str] = {}
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self.reload()

    def name_of(self, curve_public_z85: bytes) -> str | None:
        return self.by_curve.get(curve_public_z85)

    def reload(self) -> bool:
        """Re-read the allow-list if its directory changed; True if it did."""
        stamp = allow_list_stamp(self.keys_dir)
        if stamp == self._stamp:
            return False
        first = self._stamp is None
        self._stamp = stamp
        errors: list[str] = []
        fresh = load_allow_list(self.keys_dir, errors=errors)
        # A key that changed under the same name is a revocation of the old one.
        revoked = {n for n, old in self.nodes.items() if n not in fresh or fresh[n].curve_public != old.curve_public}
        added = {n for n, new in fresh.items() if n not in self.nodes or self.nodes[n].curve_public != new.curve_public}
        self.nodes = fresh
        self.by_curve = {i.curve_public: n for n, i in fresh.items()}
        if first:
            added = set()  # what the head starts with is no news
        if added or revoked or errors:
            log.info("allow_list_reloaded", nodes=len(fresh), added=",".join(sorted(added)),
                     revoked=",".join(sorted(revoked)), errors=len(errors))
            self.on_change(added, revoked, errors)
        return True

    async def loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.reload()
