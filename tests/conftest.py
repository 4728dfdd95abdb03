"""Shared fixtures: the demo model, a small derived model, real local clusters, references."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from appliance.common.config import cache_dir  # noqa: E402
from appliance.common.modelfile import fetch_demo  # noqa: E402
from appliance.cli.up import LocalCluster  # noqa: E402
from helpers import derive_model  # noqa: E402

os.environ.setdefault("ANYWAY_LOG_LEVEL", "info")
TEST_HEARTBEAT_S = 0.2  # suspect after 0.8 s, dead after 2 s
N_CTX = 2048  # the references below use the same context size


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return fetch_demo(quiet=True)


@pytest.fixture(scope="session")
def tiny_model(demo_model: Path) -> Path:
    """The demo model cut to 8 layers: same tokenizer and template, faster to load."""
    dst = cache_dir() / "models" / "test-smollm2-8layers.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    return derive_model(demo_model, dst, n_layers=8)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    clusters: list[LocalCluster] = []

    def make(
        model: Path,
        *,
        workers: int = 2,
        memory: str = "",
        heartbeat: float = TEST_HEARTBEAT_S,
        head_args: list[str] | None = None,
        start: bool = True,
        **kw: Any,
    ) -> LocalCluster:
        c = LocalCluster(
            model=model, state_dir=tmp_path / f"cluster{len(clusters)}", heartbeat_interval=heartbeat, n_ctx=N_CTX, **kw
        )
        clusters.append(c)
        if start:
            c.start_head(head_args)
            for i in range(1, workers + 1):
                c.start_worker(f"w{i}", memory=memory)
        return c

    yield make
    for c in clusters:
        c.stop()
    failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    if failed:
        for c in clusters:
            for name, path in c.logs.items():
                lines = path.read_text(errors="replace").splitlines()[-25:]
                print(f"----- {name} ({path}) -----\n" + "\n".join(lines))


class Reference:
    """Greedy output of the same model in one plain llama-cpp-python process."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}

    def _llm(self, model: Path) -> Any:
        from llama_cpp import Llama

        key = str(model)
        if key not in self._models:
            self._models[key] = Llama(key, n_ctx=N_CTX, verbose=False)
        return self._models[key]

    def complete(self, model: Path, prompt: str, max_tokens: int) -> tuple[str, int]:
        out = self._llm(model).create_completion(prompt, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def chat(self, model: Path, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
        out = self._llm(model).create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=0, repeat_penalty=1.0
        )
        return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()
