"""taro_vllm: token-level adaptive routing (TARo) between a base and a reward LM, served by vLLM.

Import map (one way): assets -> router/mix -> checkpoint -> serving (the only package that imports vllm).
"""

__version__ = "0.1.0"
