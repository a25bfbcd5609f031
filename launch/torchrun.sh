#!/usr/bin/env bash
# lrpretrain under torchrun, on one node or several: one training process per GPU.
#
#   launch/torchrun.sh train experiment=galore_c4_60m                     one node, every GPU
#   NPROC_PER_NODE=2 launch/torchrun.sh train ...                         one node, 2 processes (CPU: gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 launch/torchrun.sh train ...  run on each of 2 nodes (NODE_RANK=1 on the other)
#   srun --ntasks-per-node=1 launch/torchrun.sh train ...                 under SLURM: everything from SLURM's variables
#
# Several nodes rendezvous with c10d at MASTER_ADDR:MASTER_PORT. Under SLURM the defaults are
# NNODES=$SLURM_NNODES, NODE_RANK=$SLURM_NODEID, MASTER_ADDR = the first host of $SLURM_JOB_NODELIST,
# MASTER_PORT = 20000 + job id mod 20000 (jobs sharing a node get different ports), RDZV_ID=$SLURM_JOB_ID.
# NPROC_PER_NODE defaults to $SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1.
#
# Signals: torchrun passes SIGTERM, SIGINT, SIGHUP, SIGQUIT and the pre-emption notices SIGUSR1/SIGUSR2 on
# to the training processes (PET_SIGNALS_TO_HANDLE; torch versions whose torchrun has --signals-to-handle)
# and gives them SHUTDOWN_TIMEOUT seconds (default 600) to write their checkpoint before killing them.
# LRP_DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail

# No pipelines in this script: under `set -o pipefail` a reader that stops early (head, grep -q/-m)
# can kill the writer with SIGPIPE (exit 141), and `set -e` then ends the script without a word.
gpu_count() {
    local n=0 out line
    if command -v nvidia-smi >/dev/null 2>&1; then
        out=$(nvidia-smi -L 2>/dev/null || true)  # no driver / no GPU: whatever it listed (nothing)
        while IFS= read -r line; do
            if [[ $line == GPU* ]]; then n=$(( n + 1 )); fi  # not ((n++)): that returns 1 when n was 0
        done <<< "$out"
    fi
    echo $(( n > 0 ? n : 1 ))
}

nnodes=${NNODES:-${SLURM_NNODES:-1}}
# torchrun takes N or MIN:MAX (elastic); anything else is one clear line, not an arithmetic error
if [[ ! $nnodes =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    echo "torchrun.sh: NNODES=$nnodes is invalid: a node count N or a range MIN:MAX (e.g. 2 or 2:4)" >&2
    exit 2
fi
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(gpu_count)}}
master_port=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-9500} % 20000 ))}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-lrpretrain}}

cmd=("${TORCHRUN:-torchrun}" --nnodes="$nnodes" --nproc-per-node="$nproc" --max-restarts=0)
if [[ $nnodes == 1 || $nnodes == 1:1 ]]; then
    cmd+=(--standalone)
else
    master_addr=${MASTER_ADDR:-}
    if [[ -z $master_addr && -n ${SLURM_JOB_NODELIST:-} ]]; then
        # The whole list, then its first line: `scontrol ... | head -n 1` under pipefail dies of SIGPIPE
        # (exit 141, no message) whenever head exits before scontrol has written everything.
        if ! hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST"); then
            echo "torchrun.sh: 'scontrol show hostnames $SLURM_JOB_NODELIST' failed; cannot find the master host (set MASTER_ADDR)" >&2
            exit 1
        fi
        master_addr=${hosts%%$'\n'*}
    fi
    if [[ -z $master_addr ]]; then
        echo "torchrun.sh: NNODES=$nnodes needs MASTER_ADDR (the host of node rank 0) or a SLURM allocation" >&2
        exit 2
    fi
    cmd+=(--node-rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="$rdzv_id")
fi
cmd+=(-m lrpretrain.cli.main "$@")

export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
export PET_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}
echo "torchrun.sh: ${cmd[*]}" >&2
if [[ ${LRP_DRY_RUN:-0} == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
