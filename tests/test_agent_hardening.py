"""The agent's boundaries against hostile and careless input (issue 16), with a real `berth agent`
on the process runtime: request sizes, what a spec's env may set, where an instance listens,
which app ports and host paths a spec may use, and how the agent itself listens."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import psutil
import pytest
import requests

from tests.harness.agent import BERTH, Agent, unique, wait_state
from tests.harness.parts import free_port, wait_until

MAX_SPEC_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    allowed = root / "allowed"
    (allowed / "code").mkdir(parents=True)
    (allowed / "code" / "app.txt").write_text("from the allowed root\n")
    (allowed / "escape").symlink_to("/etc")
    running = Agent(root, runtime="process", max_spec_bytes=MAX_SPEC_BYTES, allow_host_paths=[str(allowed)],
                    env={"BERTH_DRAIN_DELAY": "0", "OSS_ENDPOINT": "http://operator-endpoint"}).start()
    yield running
    for svc in running.api("GET", "/v1/services").json():
        running.api("DELETE", f"/v1/services/{svc['name']}")
    wait_until(lambda: not running.api("GET", "/v1/services").json(), 60, "services removed")
    running.stop()


def process_spec(name: str, port: int, before: str = "", **container) -> dict:
    command = f"{before}exec python3 -m http.server {port} --bind 127.0.0.1"
    return {"metadata": {"name": name, "eas": {"termination_grace_period": 5}},
            "containers": [{"image": "ignored", "command": command, "port": port, **container}]}


def names(agent: Agent) -> set[str]:
    return {svc["name"] for svc in agent.api("GET", "/v1/services").json()}


def test_the_api_refuses_oversized_and_invalid_specs_and_stores_nothing(agent):
    name = unique("big")
    spec = process_spec(name, free_port())
    spec["containers"][0]["env"] = [{"name": f"FILLER_{i}", "value": "x" * 100} for i in range(6000)]
    body = json.dumps(spec).encode()
    assert len(body) > MAX_SPEC_BYTES
    refused = agent.api("POST", "/v1/services", data=body)
    assert refused.status_code == 413 and "--max-spec-bytes" in refused.json()["detail"]
    # Chunked, without a length: counted as it arrives.
    chunked = agent.api("POST", "/v1/services", data=(body[i:i + 65536] for i in range(0, len(body), 65536)))
    assert chunked.status_code == 413

    hostile = json.dumps(process_spec(unique("inf"), free_port())).replace('"metadata": {', '"metadata": {"cpu": 1e999, ')
    answer = agent.api("POST", "/v1/services", data=hostile.encode())
    assert answer.status_code == 422, answer.text  # was 201: deployed with an infinite CPU count
    assert answer.json()["detail"][0]["path"] == "metadata.cpu"
    assert agent.api("POST", "/v1/services", data=("[" * 100_000).encode()).status_code == 422
    utf16 = json.dumps(process_spec(unique("utf16"), free_port())).encode("utf-16")
    assert agent.api("POST", "/v1/services", data=utf16).json()["detail"][0]["message"].startswith("not UTF-8")
    assert names(agent) == set()


def test_a_spec_cannot_set_berth_variables_nor_use_the_agents_port(agent):
    for env in ({"name": "BERTH_SERVICE_TOKEN", "value": "mine"}, {"name": "BERTH_MAX_BODY", "value": "bogus"}):
        result = agent.deploy(process_spec(unique("berthenv"), free_port(), env=[env]))
        assert result.returncode == 2 and f"{env['name']}: BERTH_* variables are berth's own settings" in result.stderr
    result = agent.deploy(process_spec(unique("republish"), agent.port))
    assert result.returncode == 2, result.stderr
    assert f"containers[0].port: app port {agent.port} is the berth agent's API on this host" in result.stderr
    assert names(agent) == set()


def test_operator_env_wins_is_scoped_per_service_and_large_specs_launch_from_a_file(agent, tmp_path):
    scoped, plain = unique("scoped"), unique("plain")
    config = json.loads(agent.config_path.read_text())
    config["env_for"] = {scoped: {"SCOPED_ACCESS_KEY": "only-for-scoped"}}
    agent.config_path.write_text(json.dumps(config))
    agent.stop()
    agent.start()
    dumps = {}
    for name in (scoped, plain):
        dumps[name] = tmp_path / f"{name}.env.json"
        dump = f"python3 -c 'import json, os, sys; open(sys.argv[1], \"w\").write(json.dumps(dict(os.environ)))' {dumps[name]} && "
        spec = process_spec(name, free_port(), dump, env=[{"name": "OSS_ENDPOINT", "value": "http://elsewhere"}])
        if name == scoped:  # past 128 KiB, which one environment string cannot hold
            spec["containers"][0]["env"] += [{"name": f"FILLER_{i}", "value": "x" * 100} for i in range(1500)]
            assert len(json.dumps(spec)) > 128 * 1024
        result = agent.deploy(spec, "--wait")
        assert result.returncode == 0, result.stderr
    seen = {name: json.loads(path.read_text()) for name, path in dumps.items()}
    assert seen[scoped]["OSS_ENDPOINT"] == seen[plain]["OSS_ENDPOINT"] == "http://operator-endpoint"
    assert seen[scoped]["SCOPED_ACCESS_KEY"] == "only-for-scoped" and "SCOPED_ACCESS_KEY" not in seen[plain]
    spec_file = seen[scoped]["BERTH_SPEC"]
    assert spec_file.startswith(str(agent.state_dir)) and json.loads(open(spec_file).read())["metadata"]["name"] == scoped
    assert json.loads(seen[plain]["BERTH_SPEC"])["metadata"]["name"] == plain  # small specs stay in the variable

    # The instance's proxy and admin ports bind the agent's host IP, not every interface.
    instance = agent.service(plain)["instances"][0]
    record = json.loads(next((agent.state_dir / "processes").glob(f"berth-{plain}-0-*[!s].json")).read_text())
    listening = {conn.laddr for conn in psutil.net_connections("tcp") if conn.status == psutil.CONN_LISTEN
                 and conn.laddr.port in (record["admin_port"], record["proxy_port"])}
    assert {addr.ip for addr in listening} == {"127.0.0.1"} and len(listening) == 2, listening
    assert requests.get(instance["endpoint"] + "/", timeout=5).status_code == 200
    log = agent.state_dir / "logs" / f"{record['id']}.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600

    for name in (scoped, plain):
        assert agent.cli("rm", name).returncode == 0
    assert not (agent.state_dir / "secrets" / record["id"]).exists()


def test_process_runtime_storage_stays_in_berths_directory_and_rm_undoes_it(agent, tmp_path):
    name = unique("store")
    own = agent.state_dir.resolve() / "mounts" / name
    outside = tmp_path / "host-dir"
    outside.mkdir()
    (outside / "precious").write_text("kept")
    spec = process_spec(name, free_port())
    spec["storage"] = [{"mount_path": str(outside), "empty_dir": {"medium": "Memory"}}]
    result = agent.deploy(spec)
    assert result.returncode == 2 and f"mount under {own}/" in result.stderr, result.stderr
    assert (outside / "precious").read_text() == "kept" and not os.path.ismount(outside)

    allowed = agent.root / "allowed"
    spec["storage"] = [{"mount_path": f"{own}/code", "local": {"path": str(allowed / "escape")}}]
    result = agent.deploy(spec)
    assert result.returncode == 2 and "once symlinks are resolved" in result.stderr, result.stderr  # /etc through a link

    spec["storage"] = [{"mount_path": f"{own}/scratch", "empty_dir": {"medium": "Memory", "size_limit": "16Mi"}},
                       {"mount_path": f"{own}/code", "local": {"path": str(allowed / "code")}}]
    spec["containers"][0]["command"] = f"cat {own}/code/app.txt > {own}/scratch/copy && " + spec["containers"][0]["command"]
    result = agent.deploy(spec, "--wait")
    assert result.returncode == 0, result.stderr
    assert (own / "scratch" / "copy").read_text() == "from the allowed root\n"
    if os.geteuid() == 0:  # berth boot mounts the tmpfs only with CAP_SYS_ADMIN
        assert os.path.ismount(own / "scratch")
    assert agent.cli("rm", name).returncode == 0
    assert not own.exists() and not os.path.ismount(own / "scratch")
    assert (allowed / "code" / "app.txt").exists()  # the link went, not what it pointed at


def test_agent_listens_off_loopback_only_with_tls_or_consent(tmp_path):
    refused = subprocess.run([*BERTH, "agent", "--listen", f"0.0.0.0:{free_port()}", "--state-dir", str(tmp_path / "s"),
                              "--runtime", "process"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "off loopback without TLS" in refused.stderr and "--insecure-listen" in refused.stderr


def test_unix_socket_is_private_and_removed_and_a_loose_state_dir_is_tightened(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    sock = tmp_path / "agent.sock"
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen([*BERTH, "agent", "--listen", f"unix:{sock}", "--state-dir", str(state), "--cache-dir",
                                str(tmp_path / "cache"), "--runtime", "process", "--gateway", "off"], stdout=log, stderr=log,
                               start_new_session=True)
    try:
        wait_until(lambda: sock.exists() or process.poll() is not None, 30, "the agent's socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # uvicorn's own socket is 0666
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        listed = subprocess.run([*BERTH, "ls", "--agent", f"unix:{sock}", "--state-dir", str(state)], capture_output=True,
                                text=True, timeout=60)
        assert listed.returncode == 0 and "no services" in listed.stdout, listed.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert not sock.exists()
    assert "was mode 755, readable by other users; set to 700" in (tmp_path / "agent.log").read_text()


def test_tls_listener_serves_the_client_with_the_operators_ca(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    log = open(tmp_path / "agent.log", "wb")
    state = tmp_path / "state"
    process = subprocess.Popen([*BERTH, "agent", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key",
                                str(key), "--state-dir", str(state), "--cache-dir", str(tmp_path / "cache"), "--runtime",
                                "process", "--gateway", "off"], stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until(lambda: (tmp_path / "agent.log").read_text().count("(TLS)") or process.poll() is not None, 30, "start")
        env = {**os.environ, "BERTH_AGENT_URL": f"https://127.0.0.1:{port}", "BERTH_AGENT_CA": str(cert),
               "BERTH_STATE_DIR": str(state)}
        env.pop("BERTH_TOKEN", None)
        wait_until(lambda: subprocess.run([*BERTH, "ls"], env=env, capture_output=True, timeout=60).returncode == 0, 30, "TLS")
        untrusted = subprocess.run([*BERTH, "ls"], env={**env, "BERTH_AGENT_CA": ""}, capture_output=True, text=True, timeout=60)
        assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
