"""One benchmark subject without the appliance: plain llama-cpp-python, alone or over RPC.

Run as a subprocess by `bench/run.py` (registering RPC devices is process-global, so
each layout gets a fresh process):

  (a) `python -m bench.bare --model M`                      the model in one process
  (b) `python -m bench.bare --model M --rpc H:P,H:P --split 15,16 --n-gpu-layers 31`
      the bare llama.cpp RPC split: what `llama-server --rpc` does, no appliance around it

Prints one JSON object: decode tokens/s, prompt tokens/s, time to first token, per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import DECODE_PROMPT, long_prompt


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--rpc", default="")
    p.add_argument("--split", default="")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--tunnels", default="", help="TunnelSpec JSON file: reach these endpoints over the TLS data plane")
    p.add_argument("--load-only", action="store_true", help="only load the model (cold load timing), no generation")
    args = p.parse_args()

    from llama_cpp import Llama
    from llama_cpp import _logger

    _logger.set_verbose(False)
    kw: dict = {"n_ctx": args.n_ctx, "verbose": False}
    if args.rpc:
        from appliance.common import ggml

        endpoints = args.rpc.split(",")
        if args.tunnels:
            from pathlib import Path

            from appliance.common.dataplane import TunnelSpec, open_tunnels

            endpoints = open_tunnels(TunnelSpec.from_json(Path(args.tunnels).read_text()), endpoints)
        ggml.register_rpc_servers(endpoints)
        kw.update(n_gpu_layers=args.n_gpu_layers, tensor_split=[float(x) for x in args.split.split(",")])
    t_load = time.perf_counter()
    llm = Llama(args.model, **kw)
    load_s = time.perf_counter() - t_load
    if args.load_only:
        print(json.dumps({"load_s": load_s}))
        return 0
    prompt = long_prompt()
    runs = []
    for _ in range(args.reps):
        # Prefill: a long prompt, one token out.
        llm.reset()
        t0 = time.perf_counter()
        n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
        for _chunk in llm.create_completion(prompt, max_tokens=1, temperature=0, stream=True):
            ttft = time.perf_counter() - t0
            break
        # Decode: time between the first and the last streamed token.
        llm.reset()
        stamps = []
        for _chunk in llm.create_completion(DECODE_PROMPT, max_tokens=args.tokens, temperature=0, repeat_penalty=1.0, stream=True):
            stamps.append(time.perf_counter())
        runs.append(
            {
                "prompt_tokens": n_prompt,
                "ttft_s": ttft,
                "prompt_tps": n_prompt / ttft,
                "decode_tokens": len(stamps),
                "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                "load_s": load_s,
            }
        )
    print(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
