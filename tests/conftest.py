"""Shared fixtures: one cache dir per session, CPU-only settings.

Two tiny Bloom asset sets, both made by ``ia3_dist.train.demo`` with the same tokenizer and shapes:
- ``tiny_*``: random weights, built in about a second: what the unit tier (``-m "not slow"``) uses;
- ``demo_*``: pretrained briefly (~45 s, once per cache), so IA3 visibly lowers the loss: the slow tier's runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Reuse a cache across sessions when the caller provides one (CI sets it); never the user's own.
    d = Path(os.environ.get("IA3_DIST_TEST_CACHE") or tmp_path_factory.mktemp("ia3cache"))
    os.environ["IA3_DIST_CACHE"] = str(d)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return d


def _shm_segments() -> set[str]:
    return {str(p) for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.fixture(scope="session", autouse=True)
def sweep_shared_memory():
    """Ranks that the fault tests kill on purpose cannot unlink DeepSpeed's /dev/shm segments; remove what this
    session left behind so repeated runs do not fill the RAM-backed /dev/shm."""
    before = _shm_segments()
    yield
    for name in _shm_segments() - before:
        Path(name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_root(session_cache: Path) -> Path:
    from ia3_dist.train.demo import ensure_assets

    return ensure_assets(None, pretrained=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_root: Path) -> Path:
    return tiny_root / "model"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="session")
def family_models(session_cache: Path, tiny_model: Path) -> dict[str, Path]:
    """Tiny random Llama, Qwen2, Mistral and GPT-NeoX (a few hundred K parameters, the tiny tokenizer): see
    ``_families.py``."""
    from _families import ensure

    return ensure(session_cache, tiny_model)


@pytest.fixture(scope="session")
def demo_root(session_cache: Path) -> Path:
    from ia3_dist.train.demo import ensure_assets

    return ensure_assets(None)


@pytest.fixture(scope="session")
def demo_model(demo_root: Path) -> Path:
    return demo_root / "model"


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        if os.environ.get("CI"):  # under CI no shared-data test may skip: the checkout lacks ../shared
            pytest.fail(f"CI: {SHARED_DATA} not present")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
