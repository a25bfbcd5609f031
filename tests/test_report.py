"""``lrpretrain report``: the table's numbers are those of the runs' metrics.jsonl (recomputed here from
the raw records), runs and sweep directories mix, the plots are PNG images, bad paths are one line."""

from __future__ import annotations

import json
import shutil

import pytest
from test_errors import one_line

from lrpretrain.train.trained import load_trained

from conftest import read_metrics

pytest.importorskip("matplotlib")


def expected_row(run_dir) -> dict:
    recs = read_metrics(run_dir)
    train = [r for r in recs if "loss" in r]
    vals = [r["val_ppl"] for r in recs if "val_ppl" in r]
    timed = [r for r in train if r["step"] > 1]
    seconds = sum(r["step_time"] for r in timed)
    return {"tokens": train[-1]["tokens"], "final": vals[-1], "best": min(vals),
            "tokens_per_s": sum(r["tokens_per_s"] * r["step_time"] for r in timed) / seconds,
            "step_time": seconds / len(timed), "peak": max(r["peak_mem_mb"] for r in train)}


def cells(md: str, run: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {run} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_of_a_run_and_a_sweep(cli, tiny_runs, tmp_path):
    import matplotlib.image

    # a sweep directory holding the LoRA run as its one job
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_runs["lora"], sweep / "method=lora")
    (sweep / "method=lora" / "sweep_job.json").write_text(json.dumps({"num": 0, "status": "complete", "step": 4}))
    out = tmp_path / "rep"
    r = cli("report", str(tiny_runs["full"]), str(sweep), "--out", str(out))
    assert r.code == 0, r.err
    md = (out / "report.md").read_text()
    assert md.count("| full | full | llama_tiny |") == 1 and md.count("| method=lora | lora | llama_tiny |") == 1

    for name, run_dir, method in [("full", tiny_runs["full"], "full"), ("method=lora", sweep / "method=lora", "lora")]:
        run = load_trained(run_dir)  # parameters counted on the built model
        params = f"{sum(p.numel() for p in run.model.parameters()) / 1e6:,.2f}"
        trainable = f"{run.method.trainable_parameters(run.model) / 1e6:,.2f}"
        row, want = cells(md, name), expected_row(run_dir)
        assert row == [name, method, "llama_tiny", params, trainable, f"{want['tokens']:,}", f"{want['final']:,.2f}",
                       f"{want['best']:,.2f}", f"{want['tokens_per_s']:,.0f}", f"{want['step_time']:,.3f}",
                       f"{want['peak']:,.0f}", row[11], "complete"], row
        assert float(row[11].replace(",", "")) > 0  # the estimate beside the measurement
    data = {r["name"]: r for r in json.loads((out / "report.json").read_text())}
    assert data["full"]["final_val_ppl"] == expected_row(tiny_runs["full"])["final"]
    assert [v for _, v in data["full"]["val"]] == [r["val_ppl"] for r in read_metrics(tiny_runs["full"]) if "val_ppl" in r]

    for png in ("val_ppl.png", "train_loss.png", "throughput.png", "memory.png"):
        assert f"]({png})" in md
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 800
        assert img[..., :3].std() > 0.05  # not blank

    # the one sweep's report goes beside its summary by default
    r = cli("report", str(sweep))
    assert r.code == 0 and (sweep / "report.md").exists() and (sweep / "memory.png").exists()


def test_report_refuses_what_holds_no_run(cli, tmp_path):
    one_line(cli("report", str(tmp_path)), "holds no run")
    one_line(cli("report", str(tmp_path / "missing")), "is not a directory")
    one_line(cli("report"), "takes one or more run or sweep directories")
    one_line(cli("report", str(tmp_path), "--outdir", "x"), "unknown option '--outdir'")
