#!/usr/bin/env bash
# The GPU suite on a bare machine (torch and triton, none of lrpretrain's other dependencies, no network):
#
#   benchmarks/gpu_suite.sh --out gpu-results --deadline 450 [--rows PATTERN] [--cpu]
#
# Needs .gpu-wheels/ (from `make gpu-wheels` on a machine with the package registries) next to the
# checkout, or GPU_WHEELS=DIR. Installs the wheels with pip (--no-index --no-deps --target) into
# $GPU_WHEELS/work/site once, puts lrpretrain on PYTHONPATH from this checkout (a folder of links
# that maps conf/, kernels/ and data_recipes/ into the package as an install does), reads the prepared
# embedded corpus from $GPU_WHEELS/cache, sets the Hugging Face libraries offline and runs
# benchmarks/gpu_suite.py with the arguments given. PYTHON=... picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$(cd "${GPU_WHEELS:-$ROOT/.gpu-wheels}" 2>/dev/null && pwd)" || {
    echo "gpu_suite.sh: no wheels folder ${GPU_WHEELS:-$ROOT/.gpu-wheels}: run 'make gpu-wheels' where PyPI" \
        "can be reached and copy .gpu-wheels/ next to the checkout (or set GPU_WHEELS)" >&2
    exit 2
}
PY="${PYTHON:-python3}"
WORK="$WHEELS/work"
SITE="$WORK/site"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
# (re)install when the set of wheels differs from the one installed last
want="$( ((${#wheels[@]})) && printf '%s\n' "${wheels[@]##*/}" | sort || true)"
if [[ ! -f "$SITE/.installed" || "$(cat "$SITE/.installed")" != "$want" ]]; then
    rm -rf "$SITE"
    mkdir -p "$SITE"
    if ((${#wheels[@]})); then
        echo "gpu_suite.sh: installing ${#wheels[@]} wheels into $SITE"
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "${wheels[@]}"
    fi
    printf '%s' "$want" >"$SITE/.installed"
fi

# lrpretrain from the checkout, laid out as installed (pyproject.toml [tool.setuptools] package-dir)
PKG="$WORK/pkg/lrpretrain"
rm -rf "$WORK/pkg"
mkdir -p "$PKG"
for entry in "$ROOT"/lrpretrain/*; do
    [[ "$(basename "$entry")" == __pycache__ ]] || ln -s "$entry" "$PKG/"
done
ln -s "$ROOT/conf" "$PKG/conf"
ln -s "$ROOT/kernels" "$PKG/kernels"
ln -s "$ROOT/data_recipes" "$PKG/data_recipes"

export PYTHONPATH="$WORK/pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d "$WHEELS/cache/embedded" ]]; then
    export LRPRETRAIN_CACHE="$WHEELS/cache"
else
    echo "gpu_suite.sh: warning: no prepared corpus in $WHEELS/cache (make gpu-wheels puts it there):" \
        "the rows will try to prepare it and fail offline" >&2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

# what is still missing shows here in one line; the suite runs anyway (each row records its own failure)
"$PY" -c "import hydra, omegaconf, datasets, lrpretrain.cli.main, lrpretrain.conf, lrpretrain.kernels" 2>&1 \
    | tail -1 | sed 's/^/gpu_suite.sh: warning: lrpretrain cannot be imported: /' >&2 || true

exec "$PY" "$ROOT/benchmarks/gpu_suite.py" "$@"
