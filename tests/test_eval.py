"""``lrpretrain eval``: lm-evaluation-harness on the exported run, offline, with a multiple-choice task of
our own (a local JSONL file); its accuracy equals the one computed here from our model's
log-likelihoods, the results land in the run directory and in ``lrpretrain report``."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_errors import one_line

from lrpretrain.train.trained import load_trained

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # imports lm-eval and transformers (~10 s) and indexes lm-eval's tasks

WORDS = ["king", "queen", "sword", "night", "love", "death", "crown", "ghost", "storm", "honour", "Verona"]
CHOICES = ["Good night, sweet prince.", "The sky is blue today.", "My lord, I come!", "forty-two apples"]


def write_task(folder, n: int = 16):
    rnd = random.Random(0)
    docs = [{"question": f"ROMEO. What says the {a} of the {b}?", "choices": rnd.sample(CHOICES, 4), "answer": i % 4}
            for i, (a, b) in enumerate(rnd.sample([(a, b) for a in WORDS for b in WORDS if a != b], n))]
    (folder / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "toy.yaml").write_text(f"""task: lrp_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'toy.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return docs


def our_accuracy(run, docs) -> tuple[float, float]:
    """acc and acc_norm from our model: the log-likelihood of " " + choice after the question (the
    harness's target delimiter and context/continuation split), per character for acc_norm."""
    tok = run.tokenizer.tokenizer
    right = right_norm = 0
    for d in docs:
        ctx = tok.encode(d["question"], add_special_tokens=False).ids
        lls = []
        for choice in d["choices"]:
            cont = tok.encode(d["question"] + " " + choice, add_special_tokens=False).ids[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(run.model(ids[:, :-1]).float(), -1)[0, -len(cont):]
            lls.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        right += max(range(4), key=lambda i: lls[i]) == d["answer"]
        right_norm += max(range(4), key=lambda i: lls[i] / len(d["choices"][i])) == d["answer"]
    return right / len(docs), right_norm / len(docs)


def test_eval_a_local_task_and_report_it(cli, tiny_runs, tmp_path):
    docs = write_task(tmp_path)
    run_dir = tmp_path / "full"  # a copy: eval writes into the run directory
    shutil.copytree(tiny_runs["full"], run_dir)
    r = cli("eval", f"run.dir={run_dir}", "tasks=[lrp_toy_mc]", f"include_path={tmp_path}", "device=cpu")
    assert r.code == 0, r.err
    rec = [json.loads(x) for x in (run_dir / "eval_results.jsonl").read_text().splitlines()][-1]
    assert rec["task"] == "lrp_toy_mc" and rec["step"] == 4 and rec["n_samples"] == len(docs)
    acc, acc_norm = our_accuracy(load_trained(run_dir), docs)
    assert rec["metrics"]["acc"] == pytest.approx(acc) and rec["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert rec["metrics"]["acc_stderr"] > 0
    assert f"lrp_toy_mc (step 4, 0-shot, {len(docs)} docs): acc {acc:.4f}" in r.out
    assert len(list((run_dir / "eval").glob("step_4-*.json"))) == 1

    r = cli("report", str(run_dir), "--out", str(tmp_path / "rep"))
    assert r.code == 0, r.err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| full | full | lrp_toy_mc | acc | {acc:.4f} ± {rec['metrics']['acc_stderr']:.4f} | 0 | 4 |" in md

    one_line(cli("eval", f"run.dir={run_dir}", "tasks=[no_such_task_xyz]", f"include_path={tmp_path}"),
             "unknown lm-eval task(s) no_such_task_xyz")


def test_eval_refusals(cli, tiny_runs, tmp_path):
    one_line(cli("eval", f"run.dir={tiny_runs['full']}"), "tasks=[] is invalid")
    one_line(cli("eval", f"run.dir={tiny_runs['full']}", "tasks=[x]", "batch_size=0"), "batch_size=0 is invalid")
    one_line(cli("eval", f"run.dir={tiny_runs['full']}", "tasks=[x]", f"include_path={tmp_path / 'no'}"),
             "is not a directory")
