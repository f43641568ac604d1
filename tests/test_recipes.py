"""The recipe scripts and taro_vllm agree on where the cache is (taro_vllm.assets.cache_dir() is the one source of
truth): with XDG_CACHE_HOME set, the SmolLM2 recipe writes its run where `taro-vllm demo` looks for the trained
router, and the Qwen recipe looks for its models where `taro-vllm assets qwen-coder` builds them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "router_training" / "recipes"


def recipe_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TARO_VLLM_CACHE", "RUN", "XDG_CACHE_HOME")}
    return {**env, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


@pytest.mark.parametrize("recipe", ["qwen_w2s_cpu.sh", "qwen_w2s_tawp_cpu.sh"])
def test_the_qwen_recipes_look_for_their_models_in_taro_vllms_cache(tmp_path, recipe):
    r = subprocess.run(["bash", str(RECIPES / recipe)], env=recipe_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    models = tmp_path / "xdg" / "taro_vllm" / "models"
    assert r.returncode == 2 and f"missing {models}/qwen2.5-coder-0.5b-instruct" in r.stderr, r.stderr


def test_the_smollm2_recipe_writes_its_run_where_the_demo_finds_it(tmp_path):
    from taro_vllm import assets

    env = recipe_env(tmp_path)
    cache = tmp_path / "xdg" / "taro_vllm"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m-instruct").symlink_to(assets.build_smollm2())  # built: the recipe reuses it
    run = cache / "runs" / "smollm2"
    for done in ("data/manifest.json", "reward/model.safetensors", "router/model.safetensors"):  # every stage done
        (run / done).parent.mkdir(parents=True, exist_ok=True)
        (run / done).touch()
    r = subprocess.run(["bash", str(RECIPES / "smollm2_cpu.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and f"run dir: {run}\n" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "home" / ".cache").exists()
    demo_router = subprocess.run([sys.executable, "-c", "from taro_vllm import assets; print(assets.cache_dir())"],
                                 env=env, capture_output=True, text=True).stdout.strip()
    assert Path(demo_router) / "runs" / "smollm2" / "router" == run / "router"  # what demo.demo_router() serves
