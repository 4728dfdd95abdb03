"""Model profile: what the planner needs to know about a GGUF model, read without loading it.

The head reads the model's metadata and tensor table (never the weights) with `gguf`
to learn how many repeating layers there are, how many bytes each one weighs, how much
sits outside the layers (token embeddings on the head, the output head on the last
device), and how much KV cache each token costs per layer. A file that is not a GGUF
model, or that is corrupt or truncated, raises `ProfileError` with a one-line reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
KV_CACHE_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is f16
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class ProfileError(Exception):
    """The file cannot be profiled; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelProfile:
    path: str
    file_bytes: int
    architecture: str
    name: str
    n_layers: int
    layer_bytes: tuple[int, ...]
    input_bytes: int  # token embeddings and anything else the head keeps on its CPU
    output_bytes: int  # output norm + output projection (tied embeddings are duplicated)
    kv_bytes_per_token_per_layer: int
    context_length: int
    embedding_length: int
    vocab_size: int
    has_chat_template: bool
    chat_template: str | None = field(default=None, repr=False)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool = True

    @property
    def layers_total_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def max_layer_bytes(self) -> int:
        return max(self.layer_bytes) if self.layer_bytes else 0

    @property
    def total_weight_bytes(self) -> int:
        return self.layers_total_bytes + self.input_bytes + self.output_bytes

    def kv_bytes(self, *, n_ctx: int, n_layers: int) -> int:
        return self.kv_bytes_per_token_per_layer * n_ctx * n_layers

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chat_template")
        d["layer_bytes"] = list(self.layer_bytes)
        d["total_weight_bytes"] = self.total_weight_bytes
        return d


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field is reported as missing
        return None


def load_profile(path: str | os.PathLike[str]) -> ModelProfile:
    """Read a GGUF file's metadata and tensor table into a `ModelProfile`."""
    p = Path(path)
    where = str(p)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise ProfileError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ProfileError(f"{where}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ProfileError(f"{where}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")

    from gguf import GGUFReader  # imported late: numpy import cost only when needed

    try:
        reader = GGUFReader(str(p), "r")
    except Exception as exc:  # noqa: BLE001 - gguf raises many types on bad input
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProfileError(f"{where}: corrupt or truncated GGUF file ({msg})") from None

    tensors = list(reader.tensors)
    if not tensors:
        raise ProfileError(f"{where}: GGUF file has no tensors (not a model)")
    for t in tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ProfileError(
                f"{where}: truncated GGUF file (tensor {t.name} ends at byte {end}, file has {size})"
            )

    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ProfileError(f"{where}: GGUF file has no general.architecture")

    def arch_key(name: str) -> Any:
        return _field(reader, f"{arch}.{name}")

    n_layers_meta = arch_key("block_count")
    layer_bytes: dict[int, int] = {}
    input_bytes = 0
    output_bytes = 0
    token_embd_bytes = 0
    has_output_proj = False
    for t in tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            i = int(m.group(1))
            layer_bytes[i] = layer_bytes.get(i, 0) + int(t.n_bytes)
        elif t.name.startswith("output"):
            output_bytes += int(t.n_bytes)
            if t.name == "output.weight":
                has_output_proj = True
        else:
            input_bytes += int(t.n_bytes)
            if t.name == "token_embd.weight":
                token_embd_bytes = int(t.n_bytes)
    if not has_output_proj:
        # Tied embeddings: llama.cpp duplicates token_embd as the output projection
        # on the output device.
        output_bytes += token_embd_bytes

    if not isinstance(n_layers_meta, int) or n_layers_meta <= 0:
        raise ProfileError(f"{where}: GGUF file has no valid {arch}.block_count")
    if sorted(layer_bytes) != list(range(n_layers_meta)):
        raise ProfileError(
            f"{where}: {arch}.block_count is {n_layers_meta} but the tensor table has "
            f"{len(layer_bytes)} blocks"
        )

    n_embd = int(arch_key("embedding_length") or 0)
    n_head = int(arch_key("attention.head_count") or 0)
    n_head_kv = arch_key("attention.head_count_kv")
    n_head_kv = int(n_head_kv) if isinstance(n_head_kv, int) else n_head
    key_len = arch_key("attention.key_length")
    value_len = arch_key("attention.value_length")
    head_dim = n_embd // n_head if n_head else 0
    k_dim = int(key_len) if isinstance(key_len, int) else head_dim
    v_dim = int(value_len) if isinstance(value_len, int) else head_dim
    kv_bytes = (k_dim + v_dim) * n_head_kv * KV_CACHE_ELEMENT_BYTES

    ctx_len = arch_key("context_length")
    template = _field(reader, "tokenizer.chat_template")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(arch_key("vocab_size") or 0)
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    name = _field(reader, "general.name")

    return ModelProfile(
        path=str(p.resolve()),
        file_bytes=size,
        architecture=arch,
        name=name if isinstance(name, str) else p.stem,
        n_layers=n_layers_meta,
        layer_bytes=tuple(layer_bytes[i] for i in range(n_layers_meta)),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        kv_bytes_per_token_per_layer=kv_bytes,
        context_length=int(ctx_len) if isinstance(ctx_len, int) else 0,
        embedding_length=n_embd,
        vocab_size=vocab,
        has_chat_template=isinstance(template, str) and bool(template),
        chat_template=template if isinstance(template, str) and template else None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(add_bos) if add_bos is not None else True,
    )
