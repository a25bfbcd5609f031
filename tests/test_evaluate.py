"""Evaluation: the token-weighted loss, and GaLore's routine reproduced with its quirks."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from lrpretrain.config import EvalConfig
from lrpretrain.train.evaluate import evaluate

from conftest import TINY, read_metrics

PAD = 0


class _Rows:
    """A ValidationSet stand-in: right-padded rows, labels = ids with padding -> -100."""

    def __init__(self, n_rows: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, vocab, (n_rows, seq_len), generator=g)
        lengths = torch.randint(2, seq_len + 1, (n_rows,), generator=g)
        for i, n in enumerate(lengths):
            self.input_ids[i, n:] = PAD
        self.labels = self.input_ids.masked_fill(self.input_ids == PAD, -100)

    def batches(self, batch_size):
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size], self.labels[i : i + batch_size]


def _forward(vocab: int):
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(7))
    return lambda ids: table[ids]  # (B, T) -> (B, T, vocab)


def _galore_reference(rows: _Rows, forward, batch_size: int, target: int, world: int = 1) -> float:
    """GaLore's evaluate_model loop, restated independently (one rank)."""
    evaluated, total, batches = 0, 0.0, 1
    for i in range(0, rows.input_ids.shape[0], batch_size):
        if evaluated > target:
            break
        batches += 1
        ids = rows.input_ids[i : i + batch_size]
        labels = ids.clone()
        labels[labels == PAD] = -100
        logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)  # HF's mean over the shifted targets
        total += float(loss)
        evaluated += int((ids != PAD).sum()) * world
    return total / batches


@pytest.mark.parametrize("target", [50, 300, 10**9])
def test_galore_protocol_matches_the_reference_routine(target):
    vocab = 11
    rows, fwd = _Rows(37, 16, vocab), _forward(vocab)
    out = evaluate(fwd, rows, 4, EvalConfig(protocol="galore", galore_tokens=target), torch.device("cpu"),
                   nullcontext)
    assert out["galore_val_loss"] == pytest.approx(_galore_reference(rows, fwd, 4, target), rel=1e-6)  # fp32 batch means
    n = out["galore_val_batches"]
    assert out["galore_val_loss"] == pytest.approx(out["galore_val_loss_unbiased"] * n / (n + 1), rel=1e-12)
    assert out["galore_val_complete"] == (target < 10**9)
    # the token-weighted loss covers every row, whatever the GaLore budget
    logits = fwd(rows.input_ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), rows.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out["val_loss"] == pytest.approx(float(expected), rel=1e-6)


def test_world_size_scales_the_token_estimate(monkeypatch):
    """Four ranks holding identical rows: each counts its tokens x4, so stops ~4x earlier, and the
    ranks' values are averaged (simulated by an all-reduce that sums four equal copies)."""
    import lrpretrain.train.evaluate as ev

    monkeypatch.setattr(ev, "all_reduce_sum", lambda t: t * 4)
    vocab = 11
    rows, fwd = _Rows(40, 16, vocab), _forward(vocab)
    cfg = EvalConfig(protocol="galore", galore_tokens=200)
    four = evaluate(fwd, rows, 4, cfg, torch.device("cpu"), nullcontext, world_size=4)
    one = _galore_reference(rows, fwd, 4, 200, world=1)
    assert four["galore_val_loss"] == pytest.approx(_galore_reference(rows, fwd, 4, 200, world=4), rel=1e-6)
    assert four["galore_val_loss"] != pytest.approx(one, rel=1e-6)
    assert four["galore_val_tokens"] > 200


def test_default_protocol_reports_only_the_token_weighted_loss():
    rows, fwd = _Rows(8, 16, 11), _forward(11)
    out = evaluate(fwd, rows, 4, EvalConfig(), torch.device("cpu"), nullcontext)
    assert set(out) == {"val_loss", "val_ppl", "val_tokens"}


def test_cli_logs_both_metrics(cli, tmp_path):
    run = tmp_path / "run"
    r = cli("train", *TINY, f"run.dir={run}", "trainer.max_steps=2", "data.mode=truncate", "eval.protocol=galore",
            "eval.galore_tokens=1000", "trainer.eval_batch_size=2")
    assert r.code == 0, r.err
    ev = [x for x in read_metrics(run) if "val_loss" in x][-1]
    assert ev["galore_val_tokens"] > 1000 and ev["galore_val_complete"] is True
    assert math.isclose(ev["galore_val_ppl"], math.exp(ev["galore_val_loss"]))
    assert ev["galore_val_loss"] < ev["galore_val_loss_unbiased"]
    assert "galore protocol: val_ppl" in r.err


def test_bad_protocol_is_one_error_line(cli, tmp_path):
    r = cli("train", *TINY, f"run.dir={tmp_path / 'r'}", "eval.protocol=paper")
    assert r.code == 2
    assert r.error_lines == ["lrpretrain: error: eval.protocol='paper' is invalid: allowed: tokens, galore"]
