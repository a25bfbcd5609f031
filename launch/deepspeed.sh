#!/usr/bin/env bash
# Train with the DeepSpeed launcher: every argument is an `lrpretrain train` override.
#
#   NPROC=8 launch/deepspeed.sh distributed.zero_stage=2 model=llama_1b method=full
#   HOSTFILE=hosts NPROC=8 launch/deepspeed.sh distributed.zero_stage=3 ...   # several nodes
#
# NPROC: processes per node (default: the node's GPUs, or 1 on a CPU-only machine); HOSTFILE:
# DeepSpeed's hostfile ("<host> slots=<N>" per line; the launcher reaches the hosts over pdsh/ssh);
# MASTER_ADDR / MASTER_PORT: rendezvous (defaults: DeepSpeed's, 127.0.0.1:29500 on one node);
# DS_ARGS: further launcher options, e.g. DS_ARGS="--bind_cores_to_rank"; DRY_RUN=1 prints the command.
# The launcher appends --local_rank=N to each process's arguments; `lrpretrain` accepts and drops it
# (the rank comes from the environment). Re-running the same command resumes (trainer.resume=auto).
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
fi
cmd=(deepspeed --num_gpus "$NPROC")
[[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && cmd+=(--master_port "$MASTER_PORT")
# shellcheck disable=SC2206  # DS_ARGS is a list of launcher options
[[ -n "${DS_ARGS:-}" ]] && cmd+=($DS_ARGS)
cmd+=(--module lrpretrain.cli.main train distributed=deepspeed "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
