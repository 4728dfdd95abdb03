"""Shared fixtures: the demo model, a small derived model, real local clusters, references."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

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


class ClusterPool:
    """The one way tests start real clusters (`LocalCluster`: a head and workers as separate
    processes on loopback): each under its own directory below `base`, all stopped by `close()`.

    While a pool is open, a test that fails (in setup or call) gets the last lines of every
    log of its clusters in its report, as a "cluster logs" section.
    """

    open_pools: ClassVar[list[ClusterPool]] = []
    LOG_LINES = 25

    def __init__(self, base: Path) -> None:
        self.base = base
        self.clusters: list[LocalCluster] = []
        ClusterPool.open_pools.append(self)

    def start(
        self,
        model: Path,
        *,
        workers: int = 2,
        memory: str = "",
        heartbeat: float = TEST_HEARTBEAT_S,
        head_args: list[str] | None = None,
        start: bool = True,
        **kw: Any,
    ) -> LocalCluster:
        """A cluster for `model` with `workers` workers named w1..wN (`memory` caps each);
        `start=False` only prepares it (keys, ports). Extra keywords go to LocalCluster."""
        c = LocalCluster(
            model=model, state_dir=self.base / f"cluster{len(self.clusters)}", heartbeat_interval=heartbeat,
            n_ctx=N_CTX, **kw,
        )
        self.clusters.append(c)
        if start:
            c.start_head(head_args)
            for i in range(1, workers + 1):
                c.start_worker(f"w{i}", memory=memory)
        return c

    def log_tails(self) -> str:
        out = []
        for c in self.clusters:
            for name, path in c.logs.items():
                try:
                    lines = path.read_text(errors="replace").splitlines()[-self.LOG_LINES :]
                except OSError as exc:
                    lines = [f"(unreadable: {exc})"]
                out.append(f"----- {name} ({path}) -----\n" + "\n".join(lines))
        return "\n".join(out)

    def close(self) -> None:
        if self in ClusterPool.open_pools:
            ClusterPool.open_pools.remove(self)
        for c in self.clusters:
            c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        tails = "\n".join(t for t in (pool.log_tails() for pool in ClusterPool.open_pools) if t)
        if tails:
            rep.sections.append((f"cluster logs (last {ClusterPool.LOG_LINES} lines each)", tails))


ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Start clusters for one test: `make_cluster(model, workers=2, ...)` (ClusterPool.start)."""
    pool = ClusterPool(tmp_path)
    try:
        yield pool.start
    finally:
        pool.close()


@pytest.fixture(scope="module")
def make_module_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """Like make_cluster, for module-scoped fixtures: the clusters live until the module's last test."""
    pool = ClusterPool(tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}-clusters"))
    try:
        yield pool.start
    finally:
        pool.close()


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
