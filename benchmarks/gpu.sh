#!/usr/bin/env bash
# On a CUDA machine: check a family's Pallas GPU kernel against the reference, then time it against
# the XLA path, cuDNN attention and (when fla-core 0.6 imports) flash-linear-attention: chunk_gla
# (the default, against fla's chunk_gla), --family delta (chunk_delta_rule, Gated DeltaNet, against
# chunk_gated_delta_rule), --family kda (per-key gates, against chunk_kda) or --family dplr
# (chunk_dplr on RWKV-7 inputs, against chunk_dplr_delta_rule); stopped after 8 minutes. fla-core is
# pure Python: where the machine has no network, bring its wheel and point FLA_WHEEL at it.
# Usage: bash benchmarks/gpu.sh [--family gla|delta|kda|dplr] [--lengths 2048 4096 ...] [--value-heads-per-key 2]
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ -n "${FLA_WHEEL:-}" ]] && ! python -c "import fla" 2>/dev/null; then
  python -m pip install --quiet --no-deps --target "${TMPDIR:-/tmp}/fla-site" "$FLA_WHEEL"
  export PYTHONPATH="${TMPDIR:-/tmp}/fla-site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 480 python benchmarks/gpu.py "$@"
