"""The proof that a rendered pod boots: the Deployment's pod template, turned into a `docker run`
on the real engine (command, env from the ConfigMap and Secrets, the cache and shm volumes, the
token file), bridge network, ports on free 127.0.0.1 ports. It turns /ready, serves through the
proxy with the token, and on SIGTERM drains an in-flight request and exits 0 within the grace period.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from agent.k8s.model import Options
from agent.k8s.render import render_files
from bootstrap import units
from tests.harness.parts import free_port, wait_until

pytestmark = pytest.mark.docker

APP = (
    "import http.server, os, time\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        if self.path == '/slow':\n"
    "            time.sleep(2)\n"
    "        body = os.environ.get('GREETING', '?').encode() + b' ' + os.environ.get('API_KEY', '?').encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', 8000), H).serve_forever()\n"
)
TOKEN = "pod-token-from-a-secret"
GRACE_S = 20


def docker_run_args(objects: dict, tmp_path: Path) -> dict:
    """The pod template as docker SDK `containers.run` arguments, the way a kubelet would start it."""
    deployment = next(o for o in objects.values() if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects.values()}
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = by_name[("ConfigMap", ref["name"])]["data"][ref["key"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = by_name[("Secret", ref["name"])]["stringData"][ref["key"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    binds, shm_size = {}, None
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            binds[volume["hostPath"]["path"]] = {"bind": mount["mountPath"], "mode": "ro" if mount.get("readOnly") else "rw"}
        elif "secret" in volume:
            directory = tmp_path / f"secret-{mount['name']}"
            directory.mkdir()
            secret = by_name[("Secret", volume["secret"]["secretName"])]["stringData"]
            for item in volume["secret"]["items"]:
                (directory / item["path"]).write_text(secret[item["key"]])
            binds[str(directory)] = {"bind": mount["mountPath"], "mode": "ro"}
        elif mount["mountPath"] == "/dev/shm":
            shm_size = units.parse_quantity(volume["emptyDir"]["sizeLimit"])
        else:
            raise AssertionError(f"volume {volume} has no docker form in this test")
    ports = {}
    for port in container["ports"]:
        ports[f"{port['containerPort']}/tcp"] = ("127.0.0.1", free_port())
    limits = container["resources"]["limits"]
    return {
        "image": container["image"], "entrypoint": container["command"][:1], "command": container["command"][1:],
        "environment": env, "volumes": binds, "ports": ports, "shm_size": shm_size, "network": "bridge",
        "mem_limit": units.parse_quantity(limits["memory"]), "nano_cpus": int(units.parse_quantity(limits["cpu"].rstrip("m")) * 10**6),
        "stop_signal": "SIGTERM", "detach": True,
    }


def test_rendered_pod_boots_serves_and_drains_on_sigterm(tmp_path, docker_client, python_inference_image):
    name = f"render-{uuid.uuid4().hex[:6]}"
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(APP)
    node_cache = tmp_path / "cache"
    spec = {
        "metadata": {"name": name, "cpu": 1, "memory": 512, "shm_size": 0.125, "eas": {"termination_grace_period": GRACE_S}},
        "containers": [{"image": python_inference_image, "command": "python /mnt/app/app.py", "port": 8000,
                        "env": [{"name": "GREETING", "value": "hello"}, {"name": "API_KEY", "value": "from-secret"}]}],
        "storage": [{"mount_path": "/mnt/app", "local": {"path": str(app_dir)}}],
        "token": TOKEN,
    }
    path = tmp_path / "svc.json"
    path.write_text(json.dumps(spec))
    rendered = render_files([str(path)], [], Options(node_cache=node_cache))
    objects = {(m.kind, m.name): m.obj for m in rendered.manifests}
    deployment = objects[("Deployment", name)]
    for directory in ("weights/services", "weights/shared", "pip", "compile"):
        (node_cache / directory).mkdir(parents=True, exist_ok=True)  # what hostPath DirectoryOrCreate does
    (node_cache / f"weights/services/{name}").mkdir(exist_ok=True)
    (node_cache / "weights/.fill.lock").touch()  # FileOrCreate
    args = docker_run_args(objects, tmp_path)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    container = docker_client.containers.run(**args, name=f"berth-test-{name}", labels={"berth-test": name})
    try:
        proxy_port = args["ports"]["8080/tcp"][1]
        admin_port = args["ports"]["9090/tcp"][1]
        ready = f"http://127.0.0.1:{admin_port}/ready"

        def is_ready() -> bool:
            try:
                return requests.get(ready, timeout=1).status_code == 200
            except requests.RequestException:
                container.reload()
                assert container.status in ("created", "running"), container.logs().decode()[-3000:]
                return False

        wait_until(is_ready, 120, "the rendered pod's /ready")
        url = f"http://127.0.0.1:{proxy_port}/"
        assert requests.get(url, timeout=5).status_code == 401  # the token from the Secret file is checked
        answer = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert answer.status_code == 200 and answer.text == "hello from-secret"  # env from the pod, the secret via secretKeyRef

        slow: dict = {}
        in_flight = threading.Thread(target=lambda: slow.update(
            response=requests.get(url + "slow", headers={"Authorization": TOKEN}, timeout=30)))
        in_flight.start()
        time.sleep(0.5)  # the request is in the app
        started = time.monotonic()
        container.kill(signal="SIGTERM")  # what the kubelet sends first
        wait_until(lambda: requests.get(ready, timeout=1).status_code == 503, 5, "/ready 503 after SIGTERM")
        result = container.wait(timeout=grace + 5)
        took = time.monotonic() - started
        in_flight.join(timeout=10)
        assert result["StatusCode"] == 0, container.logs().decode()[-3000:]
        assert took < grace, f"stopped after {took:.1f} s, past the {grace} s grace period"
        assert slow["response"].status_code == 200  # drained, not cut
    finally:
        container.remove(force=True)
