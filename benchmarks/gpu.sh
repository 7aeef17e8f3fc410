#!/usr/bin/env bash
# On a CUDA machine: check a family's Pallas GPU kernel against the reference, then time it against
# the XLA path, cuDNN attention and (when fla-core 0.6 imports) flash-linear-attention: chunk_gla
# (the default, against fla's chunk_gla), --family delta (chunk_delta_rule, Gated DeltaNet, against
# chunk_gated_delta_rule), --family kda (per-key gates, against chunk_kda) or --family dplr
# (chunk_dplr on RWKV-7 inputs, against chunk_dplr_delta_rule); without --family all four in turn,
# each stopped after --seconds-per-family (120), the whole run after 9.5 minutes. fla-core is pure
# Python: where the machine has no network, bring its wheel and point FLA_WHEEL at it.
# `python3`: on the CUDA machines it is the venv that holds jax and torch.
# Usage: bash benchmarks/gpu.sh [--family gla|delta|kda|dplr] [--lengths 2048 4096 ...] [--value-heads-per-key 2]
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ -n "${FLA_WHEEL:-}" ]] && ! python3 -c "import fla" 2>/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target "${TMPDIR:-/tmp}/fla-site" "$FLA_WHEEL"
  export PYTHONPATH="${TMPDIR:-/tmp}/fla-site${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 timeout 570 python3 benchmarks/gpu.py "$@"
