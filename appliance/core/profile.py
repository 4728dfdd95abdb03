"""Model profile: what the planner needs to know about a GGUF model, without its weights.

How many repeating layers there are, how many bytes each one weighs, how much sits
outside the layers (token embeddings on the head, the output head on the last device),
and how much KV cache each token costs per layer. `build_profile` derives it from a
GGUF file's metadata and tensor table, purely; reading the file is the job of
`appliance.common.modelfile.load_profile`. Inconsistent metadata raises `ProfileError`
with a one-line reason.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

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


def build_profile(
    *,
    path: str,
    file_bytes: int,
    meta: Callable[[str], Any],
    tensors: Sequence[tuple[str, int]],
    vocab_tokens: int | None,
) -> ModelProfile:
    """The profile of a model from its metadata (`meta(key)`, None if absent) and tensor
    table ((name, bytes) pairs); `vocab_tokens` is the length of tokenizer.ggml.tokens."""
    where = path
    arch = meta("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ProfileError(f"{where}: GGUF file has no general.architecture")

    def arch_key(name: str) -> Any:
        return meta(f"{arch}.{name}")

    n_layers_meta = arch_key("block_count")
    layer_bytes: dict[int, int] = {}
    input_bytes = 0
    output_bytes = 0
    token_embd_bytes = 0
    has_output_proj = False
    for name, n_bytes in tensors:
        m = _BLOCK_RE.match(name)
        if m:
            i = int(m.group(1))
            layer_bytes[i] = layer_bytes.get(i, 0) + n_bytes
        elif name.startswith("output"):
            output_bytes += n_bytes
            if name == "output.weight":
                has_output_proj = True
        else:
            input_bytes += n_bytes
            if name == "token_embd.weight":
                token_embd_bytes = n_bytes
    if not has_output_proj:
        # Tied embeddings: llama.cpp duplicates token_embd as the output projection
        # on the output device.
        output_bytes += token_embd_bytes

    if not isinstance(n_layers_meta, int) or isinstance(n_layers_meta, bool) or n_layers_meta <= 0:
        raise ProfileError(f"{where}: GGUF file has no valid {arch}.block_count")
    if sorted(layer_bytes) != list(range(n_layers_meta)):
        raise ProfileError(
            f"{where}: {arch}.block_count is {n_layers_meta} but the tensor table has "
            f"{len(layer_bytes)} blocks"
        )

    def int_key(name: str) -> int | None:
        v = arch_key(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    n_embd = int_key("embedding_length") or 0
    n_head = int_key("attention.head_count") or 0
    n_head_kv = int_key("attention.head_count_kv")
    n_head_kv = n_head_kv if n_head_kv is not None else n_head
    head_dim = n_embd // n_head if n_head else 0
    key_len, value_len = int_key("attention.key_length"), int_key("attention.value_length")
    k_dim = key_len if key_len is not None else head_dim
    v_dim = value_len if value_len is not None else head_dim
    kv_bytes = (k_dim + v_dim) * n_head_kv * KV_CACHE_ELEMENT_BYTES

    template = meta("tokenizer.chat_template")
    vocab = vocab_tokens if vocab_tokens is not None else (int_key("vocab_size") or 0)
    add_bos = meta("tokenizer.ggml.add_bos_token")
    name = meta("general.name")
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    return ModelProfile(
        path=path,
        file_bytes=file_bytes,
        architecture=arch,
        name=name if isinstance(name, str) else path.rsplit("/", 1)[-1].removesuffix(".gguf"),
        n_layers=n_layers_meta,
        layer_bytes=tuple(layer_bytes[i] for i in range(n_layers_meta)),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        kv_bytes_per_token_per_layer=kv_bytes,
        context_length=int_key("context_length") or 0,
        embedding_length=n_embd,
        vocab_size=vocab,
        has_chat_template=isinstance(template, str) and bool(template),
        chat_template=template if isinstance(template, str) and template else None,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_id=eos if isinstance(eos, int) else None,
        add_bos_token=bool(add_bos) if add_bos is not None else True,
    )
