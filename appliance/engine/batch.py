"""Filling a llama.cpp batch: one place for the engine's passes and the draft model's.

Each item is (token, position, sequence id, whether its logits are wanted)."""

from __future__ import annotations

from typing import Any, Sequence


def fill_batch(batch: Any, items: Sequence[tuple[int, int, int, bool]]) -> None:
    batch.n_tokens = len(items)
    for i, (tok, pos, seq_id, want) in enumerate(items):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = 1 if want else 0
