"""taro_vllm: token-level adaptive routing (TARo) between a base and a reward LM, served by vLLM.

Import map (one way, checked by tests/test_layering.py): assets, model_files, mix_triton -> features -> router, mix
(mix never imports router) -> checkpoint -> pairing, demo, hf_generate -> serving (the only package that imports
vllm) -> cli. Nothing here imports router_training.
"""

__version__ = "0.1.0"
