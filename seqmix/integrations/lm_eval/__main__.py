"""`python -m seqmix.integrations.lm_eval ARGS`: lm-eval's own command line (`lm-eval ARGS`) with
model type `seqmix` registered, e.g.

    python -m seqmix.integrations.lm_eval --model seqmix --model_args pretrained=runs/shakespeare \
        --tasks my_task --include_path my_tasks/
"""

import seqmix.integrations.lm_eval  # noqa: F401  (registers model type "seqmix")
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
