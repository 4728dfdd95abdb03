"""`anyway up`: the one-machine appliance starts, answers, and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from appliance.cli.up import free_port
from helpers import wait_until

pytestmark = pytest.mark.slow


def processes_mentioning(text: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_up_serves_and_sigterm_stops_everything(tmp_path: Path, tiny_model: Path) -> None:
    port = free_port()
    state = tmp_path / "up-state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "up", "--no-tui", "--workers", "2", "--port", str(port),
         "--model", str(tiny_model), "--state-dir", str(state), "--heartbeat-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        def serving() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return any(line.startswith("serving ") for line in lines)

        wait_until(serving, timeout_s=120, what="anyway up to say it is serving", interval_s=0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        running = processes_mentioning(str(state))
        kinds = " ".join(" ".join(p.cmdline()) for p in running)
        # head, 2 workers, the engine and 2 RPC servers are all separate processes
        assert kinds.count("appliance head") == 1 and kinds.count("appliance worker") == 2
        assert kinds.count("appliance.engine") == 1 and kinds.count("appliance.worker.rpc_server") == 2
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        model_id = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    reader.join(timeout=10)
    out = "".join(lines)
    assert f"serving {tiny_model.stem} at http://127.0.0.1:{port}/v1" in out
    wait_until(lambda: processes_mentioning(str(state)) == [], timeout_s=10,
               what=f"no process left mentioning {state}", interval_s=0.2)
    assert processes_mentioning(str(state)) == []


def test_up_with_a_corrupt_model_fails_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    res = subprocess.run(
        [sys.executable, "-m", "appliance", "up", "--no-tui", "--model", str(bad), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and str(bad) in res.stderr
