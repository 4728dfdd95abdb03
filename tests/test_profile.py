"""Model profile from GGUF metadata, and clear one-line errors for bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.common.modelfile import ProfileError, load_profile


def test_demo_model_profile(demo_model: Path) -> None:
    p = load_profile(demo_model)
    assert p.architecture == "llama"
    assert p.n_layers == 30
    assert len(p.layer_bytes) == 30 and all(b == p.layer_bytes[0] for b in p.layer_bytes)
    assert p.layer_bytes[0] == 2_216_448
    # Tied embeddings: token_embd (Q8_0, 30 MB) stays on the head and is duplicated as output.
    assert p.input_bytes == 30_081_024
    assert p.output_bytes == 30_081_024 + 2304  # + output_norm
    # 3 KV heads x (64 + 64) dims x 2 bytes (f16)
    assert p.kv_bytes_per_token_per_layer == 768
    assert p.context_length == 8192
    assert p.has_chat_template and p.chat_template and "im_start" in p.chat_template
    assert p.layers_total_bytes + p.input_bytes + 2304 < p.file_bytes


def test_tiny_model_profile(tiny_model: Path) -> None:
    p = load_profile(tiny_model)
    assert p.n_layers == 8 and p.has_chat_template


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, expect",
    [
        pytest.param(lambda d, src: _write(d / "t.gguf", src.read_bytes()[:50_000_000]), "truncated", id="truncated-in-tensors"),
        pytest.param(lambda d, src: _write(d / "h.gguf", src.read_bytes()[:2000]), "corrupt or truncated", id="truncated-in-header"),
        pytest.param(lambda d, src: _write(d / "g.gguf", b"GGUF" + bytes(range(256)) * 8), "corrupt or truncated", id="garbage-after-magic"),
        pytest.param(lambda d, src: _write(d / "x.txt", b"hello world\n"), "not a GGUF file", id="text-file"),
        pytest.param(lambda d, src: _write(d / "e.gguf", b""), "not a GGUF file", id="empty-file"),
        pytest.param(lambda d, src: d / "missing.gguf", "no such file", id="missing"),
        pytest.param(lambda d, src: d, "is a directory", id="directory"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, demo_model: Path, make, expect: str) -> None:
    bad = make(tmp_path, demo_model)
    with pytest.raises(ProfileError) as exc:
        load_profile(bad)
    msg = str(exc.value)
    assert expect in msg and str(bad) in msg and "\n" not in msg


@pytest.mark.parametrize("cmd", [["inspect"], ["plan", "--node", "a=1G"]], ids=["inspect", "plan"])
def test_cli_bad_model_exit_2_no_traceback(tmp_path: Path, cmd: list[str]) -> None:
    bad = _write(tmp_path / "bad.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    res = subprocess.run(
        [sys.executable, "-m", "appliance", cmd[0], str(bad), *cmd[1:]], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("anyway: error:")


def test_cli_inspect_prints_profile(demo_model: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "appliance", "inspect", str(demo_model)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "layers" in res.stdout and "30" in res.stdout and "chat template" in res.stdout
