"""Tokens per second of the training token stream alone (no model): on the fly vs pre-tokenized shards.

    python benchmarks/data_rate.py --name data_rate_cpu

Rows, each in its own process (tokenizer thread pools are per process), measured by the GPU suite's
data row (``gpu_suite.child_data``: the trainer's own :class:`~lrpretrain.data.TokenStream` with its
prefetch thread, vocabulary check and collate, ``micro_batch_size x seq_len`` rows, after one untimed
batch):

- ``embedded`` / ``jsonl`` on the fly, ``pack`` and ``truncate``, the tokenizer on one thread
  (``TOKENIZERS_PARALLELISM=false``) and on every core (its own batch parallelism: what the stream
  gets without extra processes);
- ``shards`` of the same texts (``prepare-data pretokenize``), both modes; and a large synthetic
  shard set (random ids, C4-like document lengths, written straight into the format, default 200M
  tokens = 400 MB) so that the rate is not that of a corpus sitting in the CPU cache.

Also: ``prepare-data pretokenize`` itself (tokens/s, 1 and 2 processes), and the time from
``load_state_dict`` to the first batch when resuming deep in a shard (on the fly re-reads the shard
up to the position; shards seek). Writes ``benchmarks/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import gpu_suite  # benchmarks/ is this script's directory
import numpy as np
import train_throughput

RESULTS = Path(__file__).parent / "results"
WORDS = ("the of and to in is was for on that with as by at from his her they this which be or an had are not but "
         "were one all their there been has have who more when will would into its no some what out up about than "
         "them can only other new some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long get "
         "here between both life being under never day same another know while last might us great old year off "
         "come since against go came right used take three").split()


def machine() -> dict:
    return {**train_throughput.machine(), "platform": platform.platform(), "load_average": os.getloadavg()}


def run_child(overrides: list[str], seconds: float, threads: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if threads else "false", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, __file__, "--child", "--json", str(res), "--seconds", str(seconds), "--",
                        *overrides], env=env, check=True)
        return json.loads(res.read_text())


# ---------------------------------------------------------------------------------------------- inputs
def write_synthetic_jsonl(root: Path, files: int, docs: int, seed: int = 0) -> list[str]:
    """C4-schema gzipped JSONL of random words, document lengths log-normal around C4's (~400 words)."""
    rng = random.Random(seed)
    out = []
    for i in range(files):
        path = root / f"synthetic-{i:05d}-of-{files:05d}.json.gz"
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
            for j in range(docs):
                n = max(1, int(rng.lognormvariate(5.6, 0.8)))
                f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=n)), "timestamp": "2019-04-25T12:57:54Z",
                                    "url": f"https://example.com/{i}/{j}"}) + "\n")
        out.append(str(path))
    return out


def write_synthetic_shards(like: Path, out: Path, tokens: int, shards: int, seed: int = 0) -> None:
    """A shard set of random ids (C4-like document lengths, ~480 tokens) in the format of ``like``
    (its tokenizer and validation split), written directly: reading speed at a size beyond caches."""
    import shutil

    from lrpretrain.data.shards import canonical_json, shard_files

    m = json.loads((like / "manifest.json").read_text())
    out.mkdir(parents=True)
    shutil.copy(like / "tokenizer.json", out / "tokenizer.json")
    shutil.copytree(like / "validation", out / "validation")
    (out / "train").mkdir()
    rng = np.random.default_rng(seed)
    limit = m["tokenizer"]["id_limit"]
    recs = []
    for i in range(shards):
        lens = np.maximum(1, rng.lognormal(5.9, 0.8, size=int(tokens / shards / 480 * 1.1)).astype(np.int64))
        lens = lens[: int(np.searchsorted(np.cumsum(lens), tokens // shards)) + 1]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype("<i8")
        ids = rng.integers(2, limit, size=int(offsets[-1]), dtype=np.uint16)
        tpath, opath, rpath = shard_files(out, "train", i)
        ids.tofile(tpath)
        offsets.tofile(opath)
        rec = {"index": i, "source": "synthetic", "docs": len(lens), "nonempty_docs": len(lens), "tokens": int(offsets[-1]),
               "max_id": int(ids.max()), "complete": True,
               "crc32": {"tokens": zlib.crc32(ids.tobytes()), "offsets": zlib.crc32(offsets.tobytes())}}
        rpath.write_text(canonical_json(rec))
        recs.append(rec)
    m["splits"]["train"] = {"shards": recs, "docs": sum(r["docs"] for r in recs), "tokens": sum(r["tokens"] for r in recs),
                            "source_shards": shards, "whole": True}
    (out / "manifest.json").write_text(canonical_json(m))


def pretokenize_timed(overrides: list[str], out: Path, num_proc: int) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lrpretrain.cli.main", "prepare-data", "pretokenize", *overrides, f"out={out}",
                    f"num_proc={num_proc}", "progress=none"], env=env, check=True, capture_output=True)
    dt = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.suffix in (".tokens", ".offsets"))
    return {"num_proc": num_proc, "seconds_with_startup": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
            "shard_bytes": size, "bytes_per_token": size / tokens}


def resume_latency(overrides: list[str], docs_into_shard: int, repeats: int = 3) -> float:
    """Seconds from load_state_dict (at a block ``docs_into_shard`` documents into shard 0) to the first batch."""
    from lrpretrain.data import TokenStream, load_tokenizer
    from lrpretrain.train import load_config

    cfg, _ = load_config(overrides)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token, cfg.data.pad_token)
    best = float("inf")
    for _ in range(repeats):
        s = TokenStream(cfg.data, tok, cfg.trainer.micro_batch_size, prefetch=0)
        state = {**s.state_dict(), "block": docs_into_shard // cfg.data.shuffle_block}
        t0 = time.perf_counter()
        s.load_state_dict(state)
        next(s)
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="data_rate_cpu")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--synthetic-docs", type=int, default=10000, help="documents per synthetic JSONL file (2 files)")
    ap.add_argument("--synthetic-tokens", type=float, default=200e6, help="tokens of the large synthetic shard set")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return gpu_suite.child_data(args.json, args.seconds, args.overrides)  # the GPU suite's data row, exactly

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from lrpretrain.data_recipes import embedded

    corpus = embedded.prepare()
    result: dict = {"name": args.name, "command": "python benchmarks/data_rate.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "machine_before": machine(),
                    "micro_batch_size": args.micro_batch, "seq_len": args.seq_len, "rows": [], "pretokenize": {}}
    common = [f"trainer.micro_batch_size={args.micro_batch}", f"trainer.batch_size={args.micro_batch}",
              f"data.seq_len={args.seq_len}", "model.max_seq_len=4096"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # inputs
        emb = ["data=embedded"]
        syn_files = write_synthetic_jsonl(work, 2, args.synthetic_docs)
        syn = ["data=jsonl", f"data.files=[{','.join(syn_files)}]", f"data.tokenizer={corpus / 'tokenizer.json'}",
               "data.shuffle_block=1024"]
        result["pretokenize"]["embedded"] = [pretokenize_timed(emb, work / f"emb{n}", n) for n in (1, 2)]
        result["pretokenize"]["synthetic_jsonl"] = [pretokenize_timed(syn, work / "syn", 1)]
        write_synthetic_shards(work / "emb1", work / "big", int(args.synthetic_tokens), 8)
        emb_shards = ["data=shards", f"data.path={work / 'emb1'}"]
        syn_shards = ["data=shards", f"data.path={work / 'syn'}"]
        big_shards = ["data=shards", f"data.path={work / 'big'}", "data.shuffle_block=1024"]
        rows = [("embedded", "on the fly", emb, False), ("embedded", "on the fly, tokenizer threads", emb, True),
                ("synthetic C4-schema jsonl", "on the fly", syn, False),
                ("synthetic C4-schema jsonl", "on the fly, tokenizer threads", syn, True),
                ("embedded", "shards", emb_shards, False), ("synthetic C4-schema jsonl", "shards", syn_shards, False),
                (f"synthetic {args.synthetic_tokens / 1e6:.0f}M tokens", "shards", big_shards, False)]
        for source, how, overrides, threads in rows:
            for mode in ("pack", "truncate"):
                r = run_child([*overrides, *common, f"data.mode={mode}"], args.seconds, threads)
                r.update(source=source, how=how, mode=mode)
                result["rows"].append(r)
                print(f"{source:34s} {how:32s} {mode:8s} {r['tokens_per_s'] / 1e6:8.3f}M tok/s "
                      f"{r['positions_per_s'] / 1e6:8.3f}M positions/s", flush=True)
        # resume deep in a shard: on the fly re-reads the shard up to the position, shards seek
        deep = args.synthetic_docs - 1024
        result["resume"] = {"documents_into_shard": deep,
                            "on_the_fly_s": resume_latency([*syn, *common, "data.mode=pack"], deep),
                            "shards_s": resume_latency([*syn_shards, *common, "data.mode=pack"], deep)}
        print(f"resume {deep} documents into a shard: on the fly {result['resume']['on_the_fly_s']:.3f} s, "
              f"shards {result['resume']['shards_s'] * 1e3:.1f} ms", flush=True)
    result["machine_after"] = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Data rate: {r['name']} ({r['date']})", "", f"Command: `{r['command']}`", "",
             f"Machine: {r['machine_before']['cpu']}, {r['machine_before']['cores']} cores, Python "
             f"{r['machine_before']['python']}; load average {r['machine_before']['load_average'][0]:.1f} before, "
             f"{r['machine_after']['load_average'][0]:.1f} after (other jobs share this machine).", "",
             f"Training stream alone, {r['micro_batch_size']} x {r['seq_len']} rows per batch. tokens/s counts non-pad "
             "tokens (what a run's `tokens` counts); positions/s counts batch entries, padding included.", "",
             "| source | read | mode | tokens/s | positions/s |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['source']} | {x['how']} | {x['mode']} | {x['tokens_per_s'] / 1e6:.3f}M | "
                     f"{x['positions_per_s'] / 1e6:.3f}M |")
    lines += ["", "Pre-tokenizing (`lrpretrain prepare-data pretokenize`, process start-up included):", "",
              "| source | num_proc | tokens | seconds | tokens/s | shard bytes/token |", "|---|---|---|---|---|---|"]
    for source, runs in r["pretokenize"].items():
        for p in runs:
            lines.append(f"| {source} | {p['num_proc']} | {p['tokens']:,} | {p['seconds_with_startup']:.1f} | "
                         f"{p['tokens_per_s'] / 1e3:.0f}k | {p['bytes_per_token']:.3f} |")
    res = r["resume"]
    lines += ["", f"Resume {res['documents_into_shard']:,} documents into a shard, `load_state_dict` to first batch: "
              f"on the fly {res['on_the_fly_s']:.3f} s, shards {res['shards_s'] * 1e3:.1f} ms.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
