"""The README's main job (`bash scripts/quickstart`) keeps working: its core, scripts/quickstart.py,
run as a user runs it (a real moto server, a real `berth agent` with the process runtime,
examples/hello.json deployed, GET /hello), and its clean-up, on success and on Ctrl-C.

The shell wrapper only installs (apt, the two virtualenvs); here the suite's venv has berth and
moto already.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness.parts import port_open

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MOUNT_PATH = Path("/mnt/data")  # examples/hello.json's mount path, linked on the host by the process runtime


def quickstart() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "quickstart.py")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def assert_cleaned_up(output: str) -> None:
    workdir = re.search(r"log (/\S+)/agent\.log", output).group(1)
    s3_port = int(re.search(r"http://127\.0\.0\.1:(\d+) \(moto\)", output).group(1))
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if workdir in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"processes of the run left behind: {left}"
    assert not port_open("127.0.0.1", s3_port), "the S3 server was left running"
    assert not Path(workdir).exists() and not MOUNT_PATH.is_symlink()


def test_quickstart_answers_hello_world_then_cleans_up():
    run = quickstart()
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    lines = output.splitlines()
    assert "Hello World" in lines, output
    for phase in ("image_pull", "prepare", "download", "pip", "engine_start", "warmup", "ready"):
        assert re.search(rf"^    {phase} +\d+\.\d\d$", output, re.M), f"no time for {phase}:\n{output}"
    assert "cold start: pull " in output  # `berth get`'s line
    assert "removed the service hello" in output and re.search(r"quickstart finished in [\d.]+ s$", lines[-1])
    assert_cleaned_up(output)


def test_ctrl_c_stops_everything_the_run_started():
    run = quickstart()
    output = ""
    deadline = time.monotonic() + 120
    while "hello-0: Starting" not in output and time.monotonic() < deadline:  # interrupted while it waits
        line = run.stdout.readline()
        assert line, f"the run ended early:\n{output}"
        output += line
    run.send_signal(signal.SIGINT)
    rest, _ = run.communicate(timeout=90)
    output += rest
    assert run.returncode == 130, output
    assert "interrupted: everything this run started was stopped" in output
    assert_cleaned_up(output)
