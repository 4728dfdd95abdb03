"""Synthetic GGUF models for the scale lab: GB-class llama models anyone can regenerate.

    python -m bench.synth identity --size 4G --out /tmp/id-4g.gguf   # writes the demo's text
    python -m bench.synth random --size 4G --out /tmp/rand-4g.gguf    # a real model's shape

Why: every figure measured with the 98 MB demo model says nothing about a 40 GB model on
1 Gbit/s links. Nobody should have to download a big model to reproduce a load, re-plan
or recovery measurement, so the lab makes them, deterministically from a seed:

* `identity`: the demo model (SmolLM2-135M) with extra "identity" blocks stacked after its
  30 layers. Each extra block has a wide feed-forward network (weights from the seed) but
  all-zero output projections (`attn_output`, `ffn_down`): it adds exactly 0.0 to the
  residual stream, so the model writes exactly the demo model's text while every block is
  really loaded, sent to the workers and computed. The extra blocks are much wider than the
  demo's, which needs a per-layer `feed_forward_length`: llama.cpp reads one for the `deci`
  architecture (llama's graph with per-layer sizes), so the stack is written as `deci`.
* `random`: a llama-architecture model of a chosen shape (layers, width, FFN, heads) with
  random weights and the demo model's tokenizer: the tensor sizes of a real 7B-class model.

Quantization: Q8_0 or Q4_0 blocks written directly (a random int8/int4 payload and one
fp16 scale per 32 weights), so a 4 GB file takes seconds, not a quantization run.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

QTYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0}
BLOCK = 32


def parse_size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)


def _quant_bytes(n_weights: int, qtype: str) -> int:
    block_bytes = gguf.GGML_QUANT_SIZES[QTYPES[qtype]][1]
    return n_weights // BLOCK * block_bytes


def quantized(rng: np.random.Generator, rows: int, cols: int, qtype: str, *, zero: bool = False) -> np.ndarray:
    """`rows` x `cols` weights as raw blocks (uint8 [rows, bytes per row]): random values with
    a std of about 1/sqrt(cols), or exact zeros (scale 0) when `zero`."""
    assert cols % BLOCK == 0, f"columns must be a multiple of {BLOCK}"
    nb = cols // BLOCK
    if qtype == "Q8_0":
        blocks = np.zeros((rows, nb), dtype=[("d", "<f2"), ("q", "i1", 32)])
        if not zero:
            blocks["d"] = np.float16(1.0 / (73.0 * np.sqrt(cols)))
            blocks["q"] = rng.integers(-127, 128, size=(rows, nb, 32), dtype=np.int8)
    else:  # Q4_0: d, then 16 bytes of two 4-bit values (value - 8)
        blocks = np.zeros((rows, nb), dtype=[("d", "<f2"), ("q", "u1", 16)])
        if not zero:
            blocks["d"] = np.float16(1.0 / (4.6 * np.sqrt(cols)))
            blocks["q"] = rng.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    return blocks.view(np.uint8).reshape(rows, -1)


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # gguf order: (cols, rows) for matrices, like llama.cpp's ne
    qtype: str | None  # None: F32
    make: object  # () -> np.ndarray, called when the tensor is written


def _block_tensors(i: int, *, embd: int, ffn: int, kv_dim: int, qtype: str, rng: np.random.Generator,
                   identity: bool) -> list[Tensor]:
    def q(rows: int, cols: int, zero: bool = False):  # noqa: ANN202 - a thunk
        return lambda: quantized(rng, rows, cols, qtype, zero=zero)

    p = f"blk.{i}."
    return [
        Tensor(p + "attn_norm.weight", (embd,), None, lambda: ones(embd)),
        Tensor(p + "attn_q.weight", (embd, embd), qtype, q(embd, embd)),
        Tensor(p + "attn_k.weight", (embd, kv_dim), qtype, q(kv_dim, embd)),
        Tensor(p + "attn_v.weight", (embd, kv_dim), qtype, q(kv_dim, embd)),
        Tensor(p + "attn_output.weight", (embd, embd), qtype, q(embd, embd, zero=identity)),
        Tensor(p + "ffn_norm.weight", (embd,), None, lambda: ones(embd)),
        Tensor(p + "ffn_gate.weight", (embd, ffn), qtype, q(ffn, embd)),
        Tensor(p + "ffn_up.weight", (embd, ffn), qtype, q(ffn, embd)),
        Tensor(p + "ffn_down.weight", (ffn, embd), qtype, q(embd, ffn, zero=identity)),
    ]


def _tensor_bytes(t: Tensor) -> int:
    n = int(np.prod(t.shape))
    return _quant_bytes(n, t.qtype) if t.qtype else 4 * n


def _write(out: Path, *, arch: str, kv: Iterator[tuple[str, object, object, object]], tensors: list[Tensor],
           copied: list[object], endianess: object = None) -> Path:
    """Write a GGUF: key/values, then `copied` tensors (from a reader) and generated ones, streaming."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, value, vtype, sub in kv:
        w.add_key_value(key, value, vtype, sub_type=sub)  # type: ignore[arg-type]
    for t in copied:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)  # type: ignore[attr-defined]
    for t in tensors:
        if t.qtype:
            nbytes = _tensor_bytes(t)
            w.add_tensor_info(t.name, (t.shape[1], nbytes // t.shape[1]) if len(t.shape) == 2 else (nbytes,),
                              np.dtype(np.uint8), nbytes, QTYPES[t.qtype])
        else:
            w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), _tensor_bytes(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    done, total = 0, sum(int(t.data.nbytes) for t in copied) + sum(_tensor_bytes(t) for t in tensors)  # type: ignore[attr-defined]
    for t in copied:
        w.write_tensor_data(np.asarray(t.data), tensor_endianess=endianess)  # type: ignore[attr-defined]
        done += int(t.data.nbytes)  # type: ignore[attr-defined]
    for t in tensors:
        data = t.make()  # type: ignore[operator]
        w.write_tensor_data(data)
        done += data.nbytes
        if sys.stderr.isatty():
            print(f"\r[synth] {done / 1e9:6.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
    w.close()
    print(file=sys.stderr)
    os.replace(tmp, out)
    return out


def _fields(reader: gguf.GGUFReader, *, skip: set[str]) -> Iterator[tuple[str, object, object, object]]:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        yield field.name, field.contents(), vtype, sub


def identity_stack(*, base: Path, out: Path, extra_layers: int, extra_ffn: int = 16384, qtype: str = "Q8_0",
                   seed: int = 0) -> Path:
    """`base` (a llama model, e.g. the demo) with `extra_layers` zero-output blocks after its own."""
    reader = gguf.GGUFReader(str(base), "r")
    arch = reader.fields["general.architecture"].contents()
    n = int(reader.fields[f"{arch}.block_count"].contents())
    embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    base_ffn = reader.fields[f"{arch}.feed_forward_length"].contents()
    ffns = list(base_ffn) if isinstance(base_ffn, list) else [int(base_ffn)] * n
    rng = np.random.default_rng(seed)
    kv_dim = embd // heads * kv_heads
    tensors = [
        t
        for i in range(n, n + extra_layers)
        for t in _block_tensors(i, embd=embd, ffn=extra_ffn, kv_dim=kv_dim, qtype=qtype, rng=rng, identity=True)
    ]
    skip = {f"{arch}.block_count", f"{arch}.feed_forward_length", "general.name"}
    out_arch = "deci"  # llama's graph, with per-layer feed-forward widths
    kv = [(out_arch + k[len(arch):] if k.startswith(arch + ".") else k, v, vt, st)
          for k, v, vt, st in _fields(reader, skip=skip)]
    kv += [
        (f"{out_arch}.block_count", n + extra_layers, gguf.GGUFValueType.UINT32, None),
        (f"{out_arch}.feed_forward_length", ffns + [extra_ffn] * extra_layers, gguf.GGUFValueType.ARRAY,
         gguf.GGUFValueType.UINT32),
        ("general.name", f"identity stack: {base.stem} + {extra_layers} x ffn {extra_ffn} {qtype}",
         gguf.GGUFValueType.STRING, None),
    ]
    # Base tensors first (in their order), then the extra blocks; llama.cpp looks tensors up by name.
    return _write(out, arch=out_arch, kv=iter(kv), tensors=tensors, copied=list(reader.tensors),
                  endianess=reader.endianess)


def random_model(*, tokenizer_from: Path, out: Path, layers: int, embd: int = 4096, ffn: int = 11008,
                 heads: int = 32, kv_heads: int = 8, qtype: str = "Q8_0", seed: int = 0, ctx: int = 4096,
                 arch: str = "llama") -> Path:
    """A model of the given shape with random weights and `tokenizer_from`'s tokenizer; `arch`
    is llama, or qwen2 (the same tensors, another graph: NeoX-style rotary embeddings)."""
    reader = gguf.GGUFReader(str(tokenizer_from), "r")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)
    kv_dim = embd // heads * kv_heads
    tensors = [Tensor("token_embd.weight", (embd, vocab), qtype, lambda: quantized(rng, vocab, embd, qtype))]
    for i in range(layers):
        tensors += _block_tensors(i, embd=embd, ffn=ffn, kv_dim=kv_dim, qtype=qtype, rng=rng, identity=False)
    tensors += [
        Tensor("output_norm.weight", (embd,), None, lambda: ones(embd)),
        Tensor("output.weight", (embd, vocab), qtype, lambda: quantized(rng, vocab, embd, qtype)),
    ]
    kv = [(k, v, t, s) for k, v, t, s in _fields(reader, skip=set()) if k.startswith("tokenizer.")]
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv += [
        ("general.name", f"random {arch} {layers}L {embd}d ffn {ffn} {qtype} seed {seed}", gguf.GGUFValueType.STRING, None),
        (f"{arch}.block_count", layers, u32, None),
        (f"{arch}.context_length", ctx, u32, None),
        (f"{arch}.embedding_length", embd, u32, None),
        (f"{arch}.feed_forward_length", ffn, u32, None),
        (f"{arch}.attention.head_count", heads, u32, None),
        (f"{arch}.attention.head_count_kv", kv_heads, u32, None),
        (f"{arch}.rope.dimension_count", embd // heads, u32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, f32, None),
        (f"{arch}.rope.freq_base", 10000.0, f32, None),
        ("general.file_type", 7 if qtype == "Q8_0" else 2, u32, None),
    ]
    return _write(out, arch=arch, kv=iter(kv), tensors=tensors, copied=[])


def layers_for(size: int, per_layer: int, fixed: int) -> int:
    return max(1, round((size - fixed) / per_layer))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in ("identity", "random"):
        s = sub.add_parser(kind)
        s.add_argument("--out", required=True, type=Path)
        s.add_argument("--size", help="target file size (e.g. 1G, 4G); sets the layer count")
        s.add_argument("--layers", type=int, help="extra layers (identity) or layers (random)")
        s.add_argument("--quant", choices=sorted(QTYPES), default="Q8_0")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--base", type=Path, help="base / tokenizer model (default: the demo model)")
        if kind == "identity":
            s.add_argument("--ffn", type=int, default=16384, help="feed-forward width of the extra blocks")
        else:
            s.add_argument("--embd", type=int, default=4096)
            s.add_argument("--ffn", type=int, default=11008)
            s.add_argument("--heads", type=int, default=32)
            s.add_argument("--kv-heads", type=int, default=8)
            s.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    a = p.parse_args(argv)
    from appliance.common.modelfile import fetch_demo

    base = a.base or fetch_demo(quiet=True)
    if a.kind == "identity":
        r = gguf.GGUFReader(str(base), "r")
        embd = int(r.fields["llama.embedding_length"].contents())
        heads = int(r.fields["llama.attention.head_count"].contents())
        kv_dim = embd // heads * int(r.fields["llama.attention.head_count_kv"].contents())
        per = sum(_tensor_bytes(t) for t in _block_tensors(0, embd=embd, ffn=a.ffn, kv_dim=kv_dim, qtype=a.quant,
                                                              rng=np.random.default_rng(0), identity=True))
        n = a.layers or layers_for(parse_size(a.size or "1G"), per, base.stat().st_size)
        identity_stack(base=base, out=a.out, extra_layers=n, extra_ffn=a.ffn, qtype=a.quant, seed=a.seed)
    else:
        kv_dim = a.embd // a.heads * a.kv_heads
        per = sum(_tensor_bytes(t) for t in _block_tensors(0, embd=a.embd, ffn=a.ffn, kv_dim=kv_dim, qtype=a.quant,
                                                              rng=np.random.default_rng(0), identity=False))
        vocab = len(gguf.GGUFReader(str(base), "r").fields["tokenizer.ggml.tokens"].data)
        fixed = 2 * _quant_bytes(vocab * a.embd, a.quant)
        n = a.layers or layers_for(parse_size(a.size or "1G"), per, fixed)
        random_model(tokenizer_from=base, out=a.out, layers=n, embd=a.embd, ffn=a.ffn, heads=a.heads,
                     kv_heads=a.kv_heads, qtype=a.quant, seed=a.seed, arch=a.arch)
    print(f"{a.out}: {a.out.stat().st_size / 1e9:.2f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
