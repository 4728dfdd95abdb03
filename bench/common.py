"""Prompts and timing helpers shared by the benchmark subjects."""

from __future__ import annotations

DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"

_PARAGRAPH = (
    "The appliance splits one language model across the spare computers of an office. "
    "Each computer holds a contiguous range of layers, and the head node sends each token "
    "through them in turn. "
)


def long_prompt(words: int = 220) -> str:
    text = ""
    while len(text.split()) < words:
        text += _PARAGRAPH
    return text + "Summarize this in one sentence:"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
