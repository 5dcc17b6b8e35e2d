"""The rollout-server launcher leaves no process behind: on stop(), on SIGTERM / Ctrl-C of the launching
process (its handlers and atexit), and when it is SIGKILLed (PR_SET_PDEATHSIG). A server that dies while
starting is named with the end of its log. The servers here are small stdlib HTTP processes (each with a child
of its own, to show that whole process groups stop); `archon serve` itself runs in tests/test_rl_disagg.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import archon.rl.servers as servers_module
import pytest
from archon.rl.servers import ServerDiedError, ServerGroup, ServerSpec, free_port

FAKE = textwrap.dedent("""
    import http.server, subprocess, sys
    if sys.argv[2] == "die":
        print("fake server: cannot load the model", flush=True)
        sys.exit(7)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("child", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health_generate" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

DRIVER = textwrap.dedent("""
    import importlib.util, signal, sys, time
    # Ctrl-C as in a terminal: a job started in the background by a non-interactive shell inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = importlib.util.spec_from_file_location("servers", sys.argv[1])  # no torch import: a quick launcher
    servers = sys.modules["servers"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(servers)
    ServerGroup, ServerSpec = servers.ServerGroup, servers.ServerSpec
    script, log_dir, ports = sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]]
    specs = [ServerSpec(f"server {i}", [sys.executable, script, str(p), "ok"], "127.0.0.1", p)
             for i, p in enumerate(ports)]
    group = ServerGroup(specs, log_dir).start()
    group.wait_healthy(60)
    print(" ".join(map(str, group.pids)), flush=True)
    try:
        time.sleep(600)
    finally:
        group.stop()
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _children(log_dir, n: int) -> list[int]:
    pids = []
    for i in range(n):
        with open(os.path.join(log_dir, f"server{i}.log")) as f:
            pids += [int(line.split()[1]) for line in f if line.startswith("child")]
    return pids


def _wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_server.py"
    path.write_text(FAKE)
    return str(path)


def test_stop_ends_every_server_and_its_children(fake, tmp_path):
    ports = [free_port(), free_port()]
    specs = [ServerSpec(f"server {i}", [sys.executable, fake, str(p), "ok"], "127.0.0.1", p) for i, p in
             enumerate(ports)]
    with ServerGroup(specs, str(tmp_path / "logs")) as group:
        group.wait_healthy(60)
        pids = group.pids + _children(tmp_path / "logs", 2)
        assert len(pids) == 4 and all(_alive(p) for p in pids)
    assert _wait_gone(pids) == []


def test_a_server_that_dies_while_starting_is_named(fake, tmp_path):
    port = free_port()
    specs = [ServerSpec(f"server 0 (127.0.0.1:{port})", [sys.executable, fake, str(port), "die"], "127.0.0.1", port)]
    with ServerGroup(specs, str(tmp_path / "logs")) as group:
        with pytest.raises(ServerDiedError, match=r"server 0 \(127.0.0.1:\d+\) exited \(code 7\)(.|\n)*cannot load"):
            group.wait_healthy(60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "ctrl-c", "kill"])
def test_no_server_outlives_the_launching_process(fake, tmp_path, sig):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    logs = str(tmp_path / "logs")
    proc = subprocess.Popen([sys.executable, str(driver), servers_module.__file__, fake, logs, str(free_port()), str(free_port())],
                            stdout=subprocess.PIPE, text=True)
    try:
        servers = [int(p) for p in proc.stdout.readline().split()]
        assert len(servers) == 2 and all(_alive(p) for p in servers)
        children = _children(logs, 2)
        proc.send_signal(sig)
        proc.wait(30)
        assert _wait_gone(servers) == []
        if sig != signal.SIGKILL:  # a SIGKILLed launcher runs no code: only its direct children get PDEATHSIG
            assert _wait_gone(children) == []
        else:
            for pid in children:  # stop the grandchildren this test caused to be orphaned
                os.kill(pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
