"""Does resuming an answer in one batched pass change the greedy text? Measured, per model.

    .venv/bin/python -m bench.divergence [--prompts 20] [--tokens 120]

After an engine restart the appliance brings prompt + tokens already sent back into the KV
cache in one batched prefill (appliance.engine.engine, `_prefill`). For each model and many
prompts, this decodes a greedy answer token by token (what the first engine did), then for
several fault points k re-prefills prompt + the first k tokens in one batch and decodes on,
and counts the answers that differ. It also reports the largest difference between a
position's logits computed in a batch and one at a time. Run in one process on ggml's CPU
backend: the kernels the workers' RPC servers run. Writes docs/divergence.json and a
section of docs/RECOVERY.md is written from it by hand.

Models: the demo model (llama architecture, Q4_1), an identity stack of it (the `deci`
graph with Q8_0 blocks, bench.synth), and a random qwen2-architecture model (NeoX rotary
embeddings, Q8_0), so more than one graph and more than one quantization are covered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Once upon a time, in a land far away,", "The history of the city begins", "Write a poem about the sea:\n",
    "def fibonacci(n):", "The three primary colors are", "Q: What is the capital of France?\nA:",
    "In 1492, Columbus", "Here is a recipe for bread:", "The theory of relativity states that",
    "My favourite programming language is", "Dear customer, we regret to inform you", "The mitochondria is",
    "Step 1: preheat the oven", "import numpy as np\n", "The weather today is", "Chapter 1\n\nIt was a dark",
    "SELECT name FROM users WHERE", "The best way to learn a language is", "In the beginning", "Breaking news:",
]
FAULT_POINTS = (5, 20, 60)


def models() -> list[tuple[str, Path]]:
    from appliance.common.config import cache_dir
    from appliance.common.modelfile import fetch_demo
    from bench.synth import identity_stack, random_model

    demo = fetch_demo(quiet=True)
    d = cache_dir() / "models"
    ident, qwen = d / "div-identity-4x2048.gguf", d / "div-random-qwen2.gguf"
    if not ident.exists():
        identity_stack(base=demo, out=ident, extra_layers=4, extra_ffn=2048)
    if not qwen.exists():
        random_model(tokenizer_from=demo, out=qwen, layers=4, embd=512, ffn=1536, heads=8, kv_heads=2, arch="qwen2")
    return [("demo (llama, Q4_1)", demo), ("identity stack (deci, Q4_1 + Q8_0)", ident), ("random qwen2 (Q8_0)", qwen)]


def measure(path: Path, n_prompts: int, tokens: int) -> dict:  # type: ignore[type-arg]
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, verbose=False, flash_attn=False, logits_all=True)

    def greedy(prefix: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prefix)  # one batched pass, like the engine's prefill
        out: list[int] = []
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t == llm.token_eos():
                break
            out.append(t)
            llm.eval([t])  # one token at a time, like a decode step
        return out

    total = diverged = 0
    worst_logit = 0.0
    for p in PROMPTS[:n_prompts]:
        ptoks = llm.tokenize(p.encode(), add_bos=True)
        ref = greedy(ptoks, tokens)
        # The logits of every position: in one batch vs one token at a time.
        seq = ptoks + ref[:60]
        llm.reset()
        llm.eval(seq)
        batch = np.array(llm.scores[: len(seq)])
        llm.reset()
        step = []
        for i, t in enumerate(seq):
            llm.eval([t])
            step.append(np.array(llm.scores[i]))
        worst_logit = max(worst_logit, float(np.abs(batch - np.array(step)).max()))
        for k in FAULT_POINTS:
            if k >= len(ref) - 5:
                continue
            total += 1
            if ref[:k] + greedy(ptoks + ref[:k], len(ref) - k) != ref:
                diverged += 1
    return {"resumes": total, "diverged": diverged, "max_logit_diff": worst_logit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.divergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "divergence.json")
    a = p.parse_args(argv)
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    out = {"date": time.strftime("%Y-%m-%d"), "llamafile": "LLAMAFILE = 1" in info, "models": {}}
    for name, path in models():
        r = measure(path, a.prompts, a.tokens)
        out["models"][name] = r
        print(f"{name}: {r['diverged']}/{r['resumes']} resumed answers differ; "
              f"largest batch-vs-step logit difference {r['max_logit_diff']:.3g}", file=sys.stderr)
    a.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
