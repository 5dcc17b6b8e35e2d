"""Rollout servers started by `archon rl`: placement on one host, launch, health checks, and a stop that
always happens.

`plan_placement` gives the inference part the first GPUs and the trainer ranks the rest (on CPU every
process runs on the host's cores; on a single GPU servers and trainer share it). `ServerGroup` starts one
process per server in its own process group (`archon serve`, or SGLang's `launch_server`), waits for
`/health_generate`, and stops every process group on `stop()`, at interpreter exit, on SIGTERM and SIGHUP
(turned into `SystemExit` so the run's `finally` blocks run) and, through ``PR_SET_PDEATHSIG``, when the
launching process dies without cleaning up.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module imports nothing heavy (tests run it in a bare interpreter)
    from archon.rl.rollout_config import RolloutPlan, RolloutSection

log = logging.getLogger("archon")

__all__ = ["Placement", "plan_placement", "ServerSpec", "ServerGroup", "server_specs", "ServerDiedError", "healthy"]


class ServerDiedError(RuntimeError):
    """A rollout server exited, stopped answering or never came up; the message names it (and shows the end of
    its log when the run started it). A run-time stop: `archon` prints one error line and exits 1."""

    archon_runtime_error = True

    def __init__(self, message: str, names: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.names = list(names)


@dataclass(frozen=True)
class Placement:
    """Which GPU each server uses and where the trainer's ranks start (indices into the visible GPUs)."""

    device: str  # "cpu" or "cuda"
    server_gpus: tuple[tuple[int, ...], ...]
    trainer_first_gpu: int
    shared: bool = False  # one GPU shared by the servers and the trainer

    def trainer_device(self, local_rank: int) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.trainer_first_gpu + local_rank}"


def plan_placement(plan: RolloutPlan, trainer_world: int, device: str, num_gpus: int) -> Placement:
    """Inference first, then the trainer: servers 0..N-1 take GPUs [i*g, (i+1)*g), trainer rank r takes
    GPU N*g + r. One visible GPU is shared by every process (one server, one trainer rank)."""
    if device == "cpu":
        return Placement("cpu", tuple(() for _ in range(plan.num_servers)), 0)
    g = plan.gpus_per_server
    need = plan.num_servers * g + trainer_world
    if num_gpus >= need:
        gpus = tuple(tuple(range(i * g, (i + 1) * g)) for i in range(plan.num_servers))
        return Placement("cuda", gpus, plan.num_servers * g)
    if num_gpus == 1 and plan.num_servers == 1 and g == 1 and trainer_world == 1:
        return Placement("cuda", ((0,),), 0, shared=True)
    raise ValueError(f"rule placement-gpus: {plan.num_servers} rollout server(s) x {g} GPU(s) + {trainer_world} "
                     f"trainer rank(s) need {need} GPUs on this host but {num_gpus} are visible; shrink the "
                     "allocation (or run 1 server + 1 trainer rank sharing one GPU)")


@dataclass
class ServerSpec:
    """One server to start: its command, address and environment additions."""

    name: str
    command: list[str]
    host: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _physical_gpus(indices: Sequence[int]) -> str:
    """Visible-GPU indices -> the CUDA_VISIBLE_DEVICES entries they stand for."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else None
    return ",".join(ids[i] if ids else str(i) for i in indices)


def server_specs(plan: RolloutPlan, rollout: RolloutSection, placement: Placement, model_dir: str,
                 dtype: str) -> list[ServerSpec]:
    """Commands for the plan's servers (launch=archon: `archon serve`; launch=sglang: SGLang's launcher)."""
    specs = []
    for i, gpus in enumerate(placement.server_gpus):
        port = free_port(rollout.host)
        env = {"CUDA_VISIBLE_DEVICES": _physical_gpus(gpus)} if gpus else {"CUDA_VISIBLE_DEVICES": ""}
        if plan.launch == "archon":
            dev = rollout.server_device if rollout.server_device != "auto" else placement.device
            cmd = [sys.executable, "-m", "archon", "serve", model_dir, "--host", rollout.host, "--port", str(port),
                   "--device", dev, "--max-batch", str(rollout.max_batch), "--dtype", dtype]
            if dev == "cpu":
                env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        else:
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--host", rollout.host,
                   "--port", str(port), "--skip-tokenizer-init", "--dtype", dtype, "--tp-size", str(plan.tp)]
            if plan.pp > 1:
                cmd += ["--pp-size", str(plan.pp)]
            if plan.ep > 1:
                cmd += ["--ep-size", str(plan.ep)]
            if placement.shared:
                cmd += ["--mem-fraction-static", "0.4"]  # the trainer needs the rest of the GPU
        specs.append(ServerSpec(f"server {i} ({rollout.host}:{port})", cmd, rollout.host, port, env))
    return specs


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: atexit / signal handlers still stop the servers
        pass


_LIVE: set[ServerGroup] = set()
_LOCK = threading.Lock()
_PREV_HANDLERS: dict[int, int | None] = {}  # SIG_DFL or None (not set from Python)


def _stop_all() -> None:
    for group in list(_LIVE):
        group.stop()


def _on_signal(signum, frame) -> None:  # noqa: ARG001
    _stop_all()
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread() or _PREV_HANDLERS:
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        prev = signal.getsignal(sig)
        if prev in (signal.SIG_DFL, None):  # someone else's handler stays theirs; atexit still covers us
            _PREV_HANDLERS[sig] = prev
            signal.signal(sig, _on_signal)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_PREV_HANDLERS.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)
        del _PREV_HANDLERS[sig]


atexit.register(_stop_all)


class ServerGroup:
    """Processes of the rollout servers; ``with ServerGroup(specs, log_dir) as g:`` starts and always stops them."""

    def __init__(self, specs: Sequence[ServerSpec], log_dir: str, *, stop_grace_s: float = 10.0) -> None:
        self.specs = list(specs)
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self.procs: list[subprocess.Popen] = []
        self.log_paths: list[str] = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.specs]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> ServerGroup:
        os.makedirs(self.log_dir, exist_ok=True)
        with _LOCK:
            _LIVE.add(self)
        _install_handlers()
        for i, spec in enumerate(self.specs):
            path = os.path.join(self.log_dir, f"server{i}.log")
            with open(path, "ab") as out:
                env = {**os.environ, **spec.env}
                proc = subprocess.Popen(spec.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, preexec_fn=_die_with_parent)
            self.procs.append(proc)
            self.log_paths.append(path)
            log.info("rollout %s started (pid %d, log %s)", spec.name, proc.pid, path)
        return self

    def log_tail(self, i: int, lines: int = 15) -> str:
        try:
            with open(self.log_paths[i], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def dead(self) -> list[int]:
        """Indices of servers whose process has exited."""
        return [i for i, p in enumerate(self.procs) if p.poll() is not None]

    def died_error(self, indices: Sequence[int]) -> ServerDiedError:
        parts = []
        for i in indices:
            code = self.procs[i].poll()
            parts.append(f"rollout {self.specs[i].name} exited (code {code}); end of {self.log_paths[i]}:\n"
                         f"{self.log_tail(i)}")
        return ServerDiedError("\n".join(parts), [self.specs[i].name for i in indices])

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until every server answers GET /health_generate with 200; raise naming a server that died or
        did not come up within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self.specs)))
        while pending:
            if dead := sorted(self.dead()):
                raise self.died_error(dead)
            for i in sorted(pending):
                if healthy(self.specs[i].address):
                    pending.discard(i)
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(self.specs[i].name for i in sorted(pending))
                raise ServerDiedError(f"rollout {names} not healthy after {timeout_s:.0f}s (rollout.startup_timeout_s); "
                                      f"see {self.log_dir}", [self.specs[i].name for i in sorted(pending)])
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM each server's process group, SIGKILL what is left after the grace period. Idempotent."""
        with _LOCK:
            _LIVE.discard(self)
        for p in self.procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)  # also reaps children the server left in its group
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
                log.warning("rollout server pid %d did not exit after SIGKILL", p.pid)
        if not _LIVE:
            _restore_handlers()

    def __enter__(self) -> ServerGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
    except (ProcessLookupError, PermissionError):
        pass


def healthy(address: str, path: str = "/health_generate") -> bool:
    """GET ``address + path`` answers 200 (``/health_generate``: ready to generate; ``/health``: the process is up)."""
    try:
        with urllib.request.urlopen(f"{address}{path}", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
