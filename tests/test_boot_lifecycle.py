"""`berth boot`'s phases as a container runs them: real processes, signals and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import psutil
import pytest

from bootstrap.warmup import WarmupError, load_file
from tests.apps.runner import Boot, http
from tests.harness.parts import free_port, wait_until


def test_ready_only_after_warmup_which_honours_repeat_and_concurrency(tmp_path):
    warmup = tmp_path / "warmup.jsonl"
    warmup.write_text(json.dumps({"path": "/warm", "repeat": 12, "concurrency": 4}) + "\n")
    boot = Boot(tmp_path, "--warmup", str(warmup), app_args=("--start-delay", "1"))
    try:
        seen_states = set()

        def ready() -> bool:
            code = boot.ready_status()
            if code == 503:
                seen_states.add(boot.status()["state"])
            return code == 200

        wait_until(ready, 20, "READY")
        # At the first 200 from /ready, the warmup had already run whole.
        counters = json.loads(http("GET", boot.proxy + "/counters")[2])
        assert counters["warm"] == 12 and counters["warm_peak"] == 4
        assert seen_states & {"LAUNCHING", "STARTING", "PREPARING"}
        status = boot.status()
        assert status["warmup"][0]["repeat"] == 12 and status["warmup"][0]["seconds"] >= 0.15  # 3 rounds of 50 ms
        assert set(status["phases"]) >= {"prepare", "launch", "warmup", "startup"}
        assert status["phases"]["launch"] >= 1.0
        assert status["child_pid"] and psutil.pid_exists(status["child_pid"])
    finally:
        boot.close()


def test_failed_warmup_fails_the_boot_unless_ignored(tmp_path):
    warmup = tmp_path / "warmup.jsonl"
    warmup.write_text('{"path": "/no-such-page"}\n')
    boot = Boot(tmp_path, "--warmup", str(warmup))
    try:
        assert boot.wait() == 1
        status = boot.file_status()
        assert status["state"] == "FAILED" and status["exit_code"] == 1
        assert "GET /no-such-page: status 404, expected 2xx" in status["last_error"]
    finally:
        boot.close()
    boot = Boot(tmp_path, "--warmup", str(warmup), "--warmup-policy", "ignore")
    try:
        boot.wait_ready()
    finally:
        boot.close()


def test_eas_sdk_serialized_warmup_files_are_refused_clearly(tmp_path):
    sdk_file = tmp_path / "warmup.bin"
    sdk_file.write_bytes(b"\x0a\x12\x08\x01\x10\x02binaryprotobuf")
    with pytest.raises(WarmupError, match="SDK-serialized warmup files .* are not read"):
        load_file(sdk_file)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"path": "/a"}\n{"path": "/b", "repeat": 0}\n')
    with pytest.raises(WarmupError, match=r"bad.jsonl:2: 'repeat' must be a whole number"):
        load_file(bad_line)


@pytest.mark.parametrize("phase", ["PREPARING", "LAUNCHING", "WARMING"])
def test_sigterm_in_an_early_phase_ends_the_boot_within_2_s(tmp_path, phase):
    flags, app_args, silent = [], (), None
    if phase == "PREPARING":
        silent = socket.create_server(("127.0.0.1", 0))  # accepts and never answers: pip waits on it
        requirements = tmp_path / "requirements.txt"
        requirements.write_text(f"--index-url http://127.0.0.1:{silent.getsockname()[1]}/simple\nberth-no-such-package\n")
        spec = {"metadata": {"name": "svc"}, "containers": [{"image": "img", "prepare": {"pythonRequirementsPath": str(requirements)}}]}
        flags = ["--spec", str(tmp_path / "spec.json")]
        (tmp_path / "spec.json").write_text(json.dumps(spec))
    elif phase == "LAUNCHING":
        app_args = ("--start-delay", "30")
    else:
        warmup = tmp_path / "warmup.jsonl"
        warmup.write_text('{"path": "/slow?s=30"}\n')
        flags = ["--warmup", str(warmup)]
    boot = Boot(tmp_path, *flags, app_args=app_args)
    try:
        wait_until(lambda: boot.ready_status() == 503 and boot.status()["state"] == phase, 20, f"state {phase}")
        time.sleep(0.3)
        sent = time.monotonic()
        boot.signal(signal.SIGTERM)
        code = boot.wait(5)
        assert time.monotonic() - sent < 2.0, boot.output()
        assert code == 0
        assert boot.file_status()["state"] == "STOPPED"
    finally:
        boot.close()
        if silent is not None:
            silent.close()


def test_child_dying_during_startup_ends_the_boot_with_its_code_and_last_lines(tmp_path):
    boot = Boot(tmp_path, app_args=("--start-exit", "7"))
    try:
        assert boot.wait() == 7
        status = boot.file_status()
        assert status["state"] == "FAILED" and status["exit_code"] == 7
        assert "exited with code 7 during LAUNCHING" in status["last_error"]
        assert "weights.bin is missing" in status["last_error"]
        assert "slowapp: cannot load the model: weights.bin is missing" in boot.output()  # passed through
    finally:
        boot.close()


def test_a_child_on_the_spec_port_instead_of_its_port_fails_the_start_at_once(tmp_path):
    """A second instance (given its own port as PORT) whose command hard-codes the spec's port:
    it would never pass its startup check, and it holds the port the first instance needs."""
    own_port, spec_port = free_port(), free_port()
    spec = {"metadata": {"name": "svc"},
            "containers": [{"image": "img", "port": spec_port, "command": f"{sys.executable} -m tests.apps.slowapp --port {spec_port}"}]}
    boot = Boot(tmp_path, command=[], env={"BERTH_SPEC": json.dumps(spec)}, app_port=own_port)
    try:
        assert boot.wait() == 1  # at once: well inside the 600 s startup timeout
        error = boot.file_status()["last_error"]
        assert f"listens on port {spec_port}, not on its PORT {own_port}" in error, error
        assert "given to the command as PORT" in error
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", spec_port))  # the child was stopped: the spec's port is free again
    finally:
        boot.close()


def test_child_crash_when_ready_exits_with_its_code(tmp_path):
    boot = Boot(tmp_path)
    try:
        boot.wait_ready()
        http("GET", boot.proxy + "/crash?code=5")
        assert boot.wait() == 5
        assert boot.file_status()["state"] == "FAILED"
    finally:
        boot.close()


def test_child_killed_by_a_signal_berth_did_not_send_exits_128_plus_n(tmp_path):
    boot = Boot(tmp_path)
    try:
        boot.wait_ready()
        os.kill(boot.status()["child_pid"], signal.SIGKILL)
        assert boot.wait() == 128 + signal.SIGKILL
        assert "killed by SIGKILL during READY" in boot.file_status()["last_error"]
    finally:
        boot.close()


@pytest.mark.parametrize("on_term, expected", [("die", 0), ("exit", 0), ("ignore", 128 + signal.SIGKILL)])
def test_exit_code_after_sigterm(tmp_path, on_term, expected):
    """0 when the child ended on our SIGTERM (by dying or exiting); SIGKILL after --stop-timeout otherwise."""
    boot = Boot(tmp_path, "--drain-delay", "0", "--stop-timeout", "0.5", app_args=("--on-term", on_term))
    try:
        boot.wait_ready()
        boot.signal(signal.SIGTERM)
        assert boot.wait() == expected
        assert boot.file_status()["exit_code"] == expected
    finally:
        boot.close()


def test_the_whole_group_gets_its_stop_timeout_when_the_leader_dies_first(tmp_path):
    """`sh -c 'app; ...'` dies on SIGTERM at once; the app it started must still finish its handler."""
    app, marker, port = tmp_path / "app.py", tmp_path / "cleaned-up", free_port()
    app.write_text(
        "import http.server, os, signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(0.5)\n"
        "    open(sys.argv[2], 'w').write('cleaned up')\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    command = ["sh", "-c", f"{sys.executable} {app} {port} {marker}; echo the shell outlived its app"]
    boot = Boot(tmp_path, "--port", str(port), "--drain-delay", "0", "--stop-timeout", "5", command=command)
    try:
        boot.wait_ready()
        boot.signal(signal.SIGTERM)
        assert boot.wait() == 0
        assert marker.read_text() == "cleaned up"
    finally:
        boot.close()


def test_orphans_are_reaped(tmp_path):
    boot = Boot(tmp_path)
    try:
        boot.wait_ready()
        orphan = int(http("GET", boot.proxy + "/orphan")[2])
        # Re-parented to berth (a child-subreaper), not to the init of the machine.
        assert psutil.Process(orphan).ppid() == boot.process.pid
        wait_until(lambda: not psutil.pid_exists(orphan), 5, "the orphan reaped")
        assert boot.process.poll() is None
    finally:
        boot.close()


def test_sighup_and_sigusr1_are_forwarded_to_the_child(tmp_path):
    boot = Boot(tmp_path)
    try:
        boot.wait_ready()
        boot.signal(signal.SIGHUP)
        boot.signal(signal.SIGUSR1)
        wait_until(lambda: "slowapp got SIGHUP" in boot.output() and "slowapp got SIGUSR1" in boot.output(), 5, "signals forwarded")
        assert boot.process.poll() is None and boot.ready_status() == 200
    finally:
        boot.close()


def test_settings_come_from_flags_then_env_then_spec(tmp_path):
    app_port, spec_port = free_port(), free_port()
    from_spec, from_env = tmp_path / "spec-warmup.jsonl", tmp_path / "env-warmup.jsonl"
    from_spec.write_text('{"path": "/warm", "repeat": 5}\n')
    from_env.write_text('{"path": "/warm", "repeat": 3}\n')
    spec = {
        "metadata": {"name": "svc", "from_the_future": 1},
        "containers": [{"image": "img", "port": spec_port, "command": f"{sys.executable} -m tests.apps.slowapp --port {app_port}"}],
        "warm_up_data_path": str(from_spec),
    }
    env = {"BERTH_SPEC": json.dumps(spec), "BERTH_WARMUP": str(from_env), "BERTH_PORT": str(spec_port)}
    # The command comes from the spec; --port beats BERTH_PORT and the spec; BERTH_WARMUP beats the spec.
    boot = Boot(tmp_path, "--port", str(app_port), command=[], env=env)
    try:
        boot.wait_ready()
        assert json.loads(http("GET", boot.proxy + "/counters")[2])["warm"] == 3
        assert "metadata.from_the_future: ignored: unknown to this version of berth" in boot.output()
    finally:
        boot.close()


def test_invalid_spec_exits_3_and_says_why(tmp_path):
    env = {"BERTH_SPEC": json.dumps({"metadata": {"name": "svc"}, "containers": [{"image": "img", "port": 8080}]})}
    boot = Boot(tmp_path, env=env)
    try:
        assert boot.wait() == 3
        status = boot.file_status()
        assert status["state"] == "FAILED" and status["exit_code"] == 3
        assert "containers[0].port: 8080 is reserved" in status["last_error"]
    finally:
        boot.close()


def test_spec_checks_run_inside_and_gate_ready_and_live(tmp_path):
    app_port = free_port()
    flag = tmp_path / "alive"
    flag.touch()
    spec = {
        "metadata": {"name": "svc"},
        "containers": [{
            "image": "img", "port": app_port, "command": f"{sys.executable} -m tests.apps.slowapp --port {app_port} --start-delay 0.5",
            "startup_check": {"tcp_socket": {}, "period_seconds": 1, "failure_threshold": 30},
            "readiness_check": {"http_get": {"path": "/counters"}, "period_seconds": 0.2, "failure_threshold": 1},
            "liveness_check": {"exec": {"command": ["test", "-e", str(flag)]}, "period_seconds": 0.2, "failure_threshold": 2},
        }],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    boot = Boot(tmp_path, "--spec", str(tmp_path / "spec.json"), "--port", str(app_port), command=[])
    try:
        boot.wait_ready()
        assert http("GET", boot.admin + "/live")[0] == 200
        flag.unlink()  # the liveness command now fails: /live turns 503 for the agent to act on
        wait_until(lambda: http("GET", boot.admin + "/live")[0] == 503, 5, "/live turning 503")
        assert boot.ready_status() == 200
    finally:
        boot.close()
