"""``lrpretrain`` command line: subcommands taking Hydra-style overrides.

    lrpretrain train [overrides]            train (or resume) a model; see README for the keys
    lrpretrain train -m [overrides]         a sweep (Hydra multirun): key=a,b runs one job per value
                                            (--dry-run: list the jobs and the sbatch script, run nothing)
    lrpretrain sweep-summary SWEEP_DIR      write a sweep's summary.jsonl, summary.md and report again
    lrpretrain generate run.dir=PATH [...]  sample text from a run's latest checkpoint (KV cache)
    lrpretrain export run.dir=PATH out=DIR  write the run as a Hugging Face LlamaForCausalLM directory
    lrpretrain eval run.dir=PATH tasks=[..] lm-evaluation-harness tasks on the exported model
    lrpretrain report PATH... [--out DIR]   report.md and plots comparing runs and sweeps
    lrpretrain prepare-data [embedded]      prepare the embedded corpus and tokenizer now
    lrpretrain prepare-data pretokenize [data overrides] out=DIR [num_proc=N] [max_tokens=N]
                                            [val_max_tokens=N] [progress=auto|bar|lines|none]
                                            token shards of a source, for data=shards data.path=DIR
    lrpretrain prepare-data verify DIR      check every token shard in DIR (sizes, CRC-32)
    lrpretrain bench [overrides] [--steps N] measure step time, tokens/s, MFU and peak memory
    lrpretrain estimate [overrides] [--budget 24GB]  parameters, FLOPs and peak memory, analytically

Mistakes in the input print one line on stderr and exit with status 2 (traceback with
``LRPRETRAIN_DEBUG=1``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from lrpretrain import bench, estimate, evaluation, export, report
from lrpretrain.data.pretokenize import Options, pretokenize
from lrpretrain.data.shards import verify_directory
from lrpretrain.data_recipes import embedded
from lrpretrain.errors import UserError
from lrpretrain.generate import generate_from_run
from lrpretrain.sweep import markdown_table, run_sweep, write_summary
from lrpretrain.train import load_config, train

USAGE = __doc__.split("\n\n")[1]


def cmd_train(args: list[str]) -> int:
    if "-m" in args or "--multirun" in args:
        return run_sweep([a for a in args if a not in ("-m", "--multirun", "--dry-run")], "--dry-run" in args)
    cfg, resolved = load_config(args)
    result = train(cfg, resolved)
    return 0 if result.get("status") in ("complete", "preempted") else 1


def cmd_generate(args: list[str]) -> int:
    texts = generate_from_run(args)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"{'' if i == 0 else chr(10)}=== sample {i + 1} of {len(texts)} ===")
        print(text)
    return 0


def cmd_export(args: list[str]) -> int:
    return export.main(args)


def cmd_eval(args: list[str]) -> int:
    return evaluation.main(args)


def cmd_report(args: list[str]) -> int:
    return report.main(args)


def cmd_sweep_summary(args: list[str]) -> int:
    if len(args) != 1 or not Path(args[0]).is_dir():
        raise UserError(f"sweep-summary takes one existing sweep directory, got {args}")
    print(markdown_table(write_summary(Path(args[0]))))
    return 0


PRETOKENIZE_KEYS = {"out": "DIR", "num_proc": "N", "max_tokens": "N", "val_max_tokens": "N", "progress": "auto|bar|lines|none"}


def _whole_number(key: str, value: str) -> int:
    """1310720000, 1_310_720_000 or 1.31072e9."""
    try:
        x = float(value.replace("_", ""))
        if x.is_integer():
            return int(x)
    except ValueError:
        pass
    raise UserError(f"{key}={value} is invalid: expected a whole number (e.g. 1310720000 or 1.31072e9)")


def cmd_pretokenize(args: list[str]) -> int:
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in PRETOKENIZE_KEYS and "=" in a}
    overrides = [a for a in args if a.split("=", 1)[0] not in PRETOKENIZE_KEYS]
    if "out" not in opts or not opts["out"]:
        raise UserError("prepare-data pretokenize needs out=DIR, the directory to write the token shards into "
                        f"(options: {', '.join(f'{k}={v}' for k, v in PRETOKENIZE_KEYS.items())})")
    progress = opts.get("progress", "auto")
    if progress not in ("auto", "bar", "lines", "none"):
        raise UserError(f"progress={progress} is invalid: allowed: auto, bar, lines, none")
    num = {k: _whole_number(k, opts[k]) for k in ("num_proc", "max_tokens", "val_max_tokens") if k in opts}
    cfg, _ = load_config(overrides)
    pretokenize(cfg.data, Options(out=Path(opts["out"]), num_proc=num.get("num_proc", 0), max_tokens=num.get("max_tokens"),
                                  val_max_tokens=num.get("val_max_tokens"), progress=progress))
    return 0


def cmd_prepare_data(args: list[str]) -> int:
    what = args[0] if args else "embedded"
    if what == "pretokenize":
        return cmd_pretokenize(args[1:])
    if what == "verify":
        if len(args) != 2:
            raise UserError(f"prepare-data verify takes one token-shard directory, got {args[1:]}")
        verify_directory(args[1], log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"{args[1]}: every shard checks out", file=sys.stderr)
        return 0
    if what != "embedded":
        raise UserError(f"unknown dataset '{what}' for prepare-data; allowed: embedded, pretokenize, verify")
    embedded.main(args[1:])
    return 0


def cmd_bench(args: list[str]) -> int:
    return bench.main(args)


def cmd_estimate(args: list[str]) -> int:
    return estimate.main(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "generate": cmd_generate,
    "export": cmd_export,
    "eval": cmd_eval,
    "prepare-data": cmd_prepare_data,
    "sweep-summary": cmd_sweep_summary,
    "report": cmd_report,
    "bench": cmd_bench,
    "estimate": cmd_estimate,
}


def strip_local_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N`` to every process's arguments; the rank also
    comes in the environment (LOCAL_RANK), so the argument is dropped (after filling the environment
    if a launcher left it out)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage:\n" + USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lrpretrain: error: unknown command '{command}'; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](args)
    except UserError as e:
        if os.environ.get("LRPRETRAIN_DEBUG") == "1":
            raise
        print(f"lrpretrain: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrpretrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
