"""Generation with a KV cache: the same logits and tokens as recomputing the whole context, for every
method (the cache lives in the attention layer that every method's blocks call), past max_seq_len too;
and ``lrpretrain generate``'s options."""

from __future__ import annotations

import pytest
import torch
from test_errors import one_line

from lrpretrain.methods import available_methods, get_method
from lrpretrain.model import build_model, generate
from lrpretrain.model.llama import Attention, KVCache
from lrpretrain.train import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def built(method: str, max_seq_len: int = 16):
    rank = ["method.rank=8"] if "rank" in get_method(method).Config.__dataclass_fields__ else []
    cfg, _ = load_config(["model=llama_tiny", f"method={method}", f"model.max_seq_len={max_seq_len}",
                          f"data.seq_len={max_seq_len}", *rank])
    torch.manual_seed(0)
    model = get_method(method)(cfg.method, cfg.model).prepare_model(build_model(cfg.model)).eval()
    with torch.no_grad():  # every factor non-trivial (LoRA's B starts at zero)
        for p in model.parameters():
            if 0 not in p.stride():  # Q-GaLore's gradient handles: one value broadcast, not a weight
                p.add_(torch.randn_like(p), alpha=0.02)
    return model


def test_decode_steps_give_the_logits_of_the_full_forward():
    model = built("full", max_seq_len=32)
    ids = torch.randint(0, 8192, (2, 20))
    full = model(ids)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    try:
        for a in attns:
            a.kv_cache = KVCache(32)
        with torch.no_grad():
            steps = [model(ids[:, :7])]  # prefill
            steps.append(model(ids[:, 7:12], start_pos=7))  # a chunk of 5 at positions 7..11
            steps += [model(ids[:, t:t + 1], start_pos=t) for t in range(12, 20)]  # one token at a time
    finally:
        for a in attns:
            a.kv_cache = None
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert all(a.kv_cache is None for a in attns)


@pytest.mark.parametrize("method", available_methods())
def test_greedy_with_the_cache_equals_recomputing_the_context(method):
    """10-token prompt + 24 new tokens with max_seq_len 16: the window slides for the last 18 steps."""
    model = built(method)
    ids = torch.randint(0, 8192, (2, 10))
    cached = generate(model, ids, 24, temperature=0)
    assert torch.equal(cached, generate(model, ids, 24, temperature=0, use_cache=False))
    assert cached.shape == (2, 34)
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, Attention))


def test_rows_that_reached_eos_continue_with_eos_only():
    model = built("full", max_seq_len=64)
    ids = torch.randint(0, 8192, (3, 5))
    free = generate(model, ids, 12, temperature=0)
    eos = int(free[0, 7])  # row 0 produces this at its 3rd step
    out = generate(model, ids, 12, temperature=0, eos_id=eos)
    first = int((free[0, 5:] == eos).nonzero()[0])
    assert (out[0, 5 + first:] == eos).all() and torch.equal(out[0, :5 + first], free[0, :5 + first])


def test_cli_options(cli, tiny_runs, tmp_path):
    run = tiny_runs["full"]
    greedy = ["max_new_tokens=16", "temperature=0"]
    on = cli("generate", f"run.dir={run}", "prompt=ROMEO.", *greedy)
    off = cli("generate", f"run.dir={run}", "prompt=ROMEO.", *greedy, "cache=false")
    assert on.code == 0 and off.code == 0, on.err + off.err
    assert on.out == off.out and on.out.startswith("ROMEO.")
    assert "KV cache on" in on.err and "KV cache off" in off.err

    (tmp_path / "prompt.txt").write_text("ROMEO.")
    from_file = cli("generate", f"run.dir={run}", f"prompt_file={tmp_path / 'prompt.txt'}", *greedy)
    assert from_file.out == on.out

    three = cli("generate", f"run.dir={run}", "prompt=JULIET.", "num_samples=3", "seed=7", "max_new_tokens=12",
                "checkpoint=step_2")
    assert three.code == 0, three.err
    samples = three.out.split("=== sample ")[1:]
    assert len(samples) == 3 and all(s.split("\n", 1)[1].startswith("JULIET.") for s in samples)
    assert len(set(samples)) > 1  # sampled at temperature 0.8
    again = cli("generate", f"run.dir={run}", "prompt=JULIET.", "num_samples=3", "seed=7", "max_new_tokens=12",
                "checkpoint=step_2")
    assert again.out == three.out

    for args, message in [
        (["prompt=x", f"prompt_file={tmp_path / 'prompt.txt'}"], "give prompt= or prompt_file=, not both"),
        ([f"prompt_file={tmp_path / 'none.txt'}"], "is not a file"),
        (["num_samples=0"], "num_samples=0 is invalid"),
        (["checkpoint=step_3"], "checkpoint=step_3 is not a checkpoint directory"),
    ]:
        one_line(cli("generate", f"run.dir={run}", *args), message)
