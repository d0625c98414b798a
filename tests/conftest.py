"""Shared fixtures: one cache dir per session, CPU-only settings.

Two tiny Bloom asset sets, both made by ``ia3_dist.train.demo`` with the same tokenizer and shapes:
- ``tiny_*``: random weights, built in about a second: what the unit tier (``-m "not slow"``) uses;
- ``demo_*``: pretrained briefly (~45 s, once per cache), so IA3 visibly lowers the loss: the slow tier's runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two test workers on 2 cores run their launches side by side, each rank with its share of the cores, so OpenMP
# threads outnumber the cores whenever both workers train. libgomp's default lets an idle thread spin for a while
# before it sleeps, and spinning threads take the cores from the working ones: two one-process demo runs side by
# side took 72 s with it and 12.6 s with passive waits. Every process the tests start inherits this (read when
# libgomp loads, so set before torch is imported here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "alpaca_zh_demo.json"


# Files whose tests take longest run first, so that under `-n 2 --dist loadfile` (what `./dev.sh test` runs) the
# Slurm jobs, which mostly wait on the cluster, overlap the CPU-bound tests of the other worker instead of
# trailing at the end. Right after the first EARLY of them (no demo model either) come the files with no slow test
# (the unit tier, which never needs the demo model), so on a fresh test cache the other worker has work while the
# first test that needs the demo model builds it (the others wait on its lock). The rest of FIRST follows, then the
# other files in their usual order. (`.ci/run` builds the demo model before the tests, while Slurm starts.)
FIRST = ("test_slurm.py", "test_security_adapters.py", "test_model.py", "test_host_syncs.py", "test_faults.py",
         "test_preference.py", "test_resume.py", "test_parity.py", "test_benchmark_eval.py", "test_packing_train.py",
         "test_train.py", "test_plan.py", "test_security_checkpoints.py", "test_prepare.py", "test_trackers.py",
         "test_checkpoint_safety.py", "test_cli.py")
EARLY = 4  # test_host_syncs.py: slow, but on the random tiny model only


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow_files = {it.path.name for it in items if it.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(FIRST)}

    def key(it: pytest.Item) -> tuple[int, int]:
        name = it.path.name
        if rank.get(name, EARLY) < EARLY:
            return 0, rank[name]
        if name not in slow_files:
            return 1, 0
        return 2, rank.get(name, len(FIRST))

    items.sort(key=key)  # stable: each file keeps its own order


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    # Reuse a cache across sessions when the caller provides one; never the user's own. The workers of one
    # `-n 2` run share theirs (their base temp dirs are siblings): the demo model is built once, under its lock.
    if os.environ.get("IA3_DIST_TEST_CACHE"):
        d = Path(os.environ["IA3_DIST_TEST_CACHE"])
    elif _is_worker(request.config):
        d = tmp_path_factory.getbasetemp().parent / "ia3cache"
        d.mkdir(exist_ok=True)
    else:
        d = tmp_path_factory.mktemp("ia3cache")
    os.environ["IA3_DIST_CACHE"] = str(d)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return d


def _shm_segments() -> set[str]:
    return {str(p) for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


_SHM_BEFORE = pytest.StashKey[set]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[_SHM_BEFORE] = _shm_segments()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Ranks that the fault tests kill on purpose cannot unlink DeepSpeed's /dev/shm segments; remove what this
    run left behind so repeated runs do not fill the RAM-backed /dev/shm. Once, in the main process, after every
    worker is done (a worker finishing early must not unlink the segments of the other's running job)."""
    if _is_worker(session.config) or _SHM_BEFORE not in session.config.stash:
        return
    for name in _shm_segments() - session.config.stash[_SHM_BEFORE]:
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
