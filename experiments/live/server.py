"""A vLLM OpenAI-compatible server as a subprocess that is always shut down.

`LiveServer` starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 and a free
port in its own process group (vLLM spawns an engine-core and a worker process), waits
for `/health` with a timeout while watching the process, and on `stop()` (also on leaving
its `with` block, whatever the exception) terminates the whole group: SIGTERM, then
SIGKILL after a grace period, then any descendant that escaped the group. A server that
exits or never becomes healthy raises `ServerError` with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil

from sim.errors import InputError
from sim.paths import project_path


class ServerError(RuntimeError):
    """The live server failed to start, died, or misbehaved; `log_tail` holds its last log lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message + (f"\n--- last lines of the server log ---\n{log_tail}" if log_tail else ""))


@dataclass(frozen=True)
class ServerConfig:
    """How the live vLLM server is started; matches the engine the cost model was profiled on."""

    model_dir: str
    """Folder with a Hugging Face `config.json` (random weights: `--load-format dummy`)."""
    served_model_name: str = "slosim-live"
    """Model name the client sends in its requests."""
    dtype: str = "float32"
    """Weights / activations dtype."""
    max_num_seqs: int = 128
    """vLLM --max-num-seqs."""
    max_num_batched_tokens: int = 512
    """vLLM --max-num-batched-tokens (step token budget)."""
    max_model_len: int = 8192
    """vLLM --max-model-len."""
    block_size: int | None = None
    """KV block size in tokens; None = the engine's default (scraped from /metrics afterwards)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps."""
    enable_prefix_caching: bool = False
    """Prefix caching (off: the simulator models none)."""
    async_scheduling: bool = False
    """Overlap scheduling with the forward pass (off: the profile timed synchronous steps)."""
    enforce_eager: bool = False
    """Skip torch.compile (must match how the profile was measured)."""
    kv_cache_space_gib: int = 2
    """VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on the CPU backend."""
    gpu_memory_utilization: float = 0.3
    """Share of memory the engine may reserve (the CPU backend applies it to host memory)."""
    seed: int = 0
    """Engine seed."""
    python: str | None = None
    """Interpreter that has vLLM installed; None = the running one."""
    startup_timeout_s: float = 420.0
    """Give up if /health does not answer 200 within this long."""
    shutdown_timeout_s: float = 20.0
    """Grace period between SIGTERM and SIGKILL."""
    extra_args: tuple[str, ...] = ()
    """More command-line arguments for the server."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables for the server."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_space_gib"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError("must be a positive integer", field=f"server.{name}", value=v)
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise InputError("must be a positive integer or null", field="server.block_size", value=self.block_size)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError("must be in (0, 1]", field="server.gpu_memory_utilization",
                             value=self.gpu_memory_utilization)
        for name in ("startup_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError("must be > 0 seconds", field=f"server.{name}", value=getattr(self, name))
        if not (project_path(self.model_dir) / "config.json").is_file():
            raise InputError("model folder has no config.json", path=project_path(self.model_dir) / "config.json",
                             field="server.model_dir", value=self.model_dir)

    def command(self, port: int) -> list[str]:
        """The server's argv."""
        argv = [self.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(project_path(self.model_dir)), "--served-model-name", self.served_model_name,
                "--host", "127.0.0.1", "--port", str(port),
                "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", self.dtype,
                "--max-num-seqs", str(self.max_num_seqs), "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--max-model-len", str(self.max_model_len), "--seed", str(self.seed),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                "--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill",
                "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
                "--async-scheduling" if self.async_scheduling else "--no-async-scheduling",
                "--disable-uvicorn-access-log"]
        if self.block_size is not None:
            argv += ["--block-size", str(self.block_size)]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        return argv + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """Variables set for the server on top of ours."""
        return {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", **self.env}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback only)
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


class LiveServer:
    """One server subprocess. Invariant: after `stop()` no process of its group or tree is left."""

    def __init__(self, argv: Sequence[str], log_path: str | Path, *, env: dict[str, str] | None = None,
                 port: int, startup_timeout_s: float = 420.0, shutdown_timeout_s: float = 20.0,
                 name: str = "vLLM server") -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.name = name
        self.proc: psutil.Popen | None = None
        self.startup_s: float | None = None
        self._log = None
        self._tree: set[int] = set()

    @classmethod
    def from_config(cls, cfg: ServerConfig, log_path: str | Path) -> LiveServer:
        port = free_port()
        return cls(cfg.command(port), log_path, env=cfg.environment(), port=port,
                   startup_timeout_s=cfg.startup_timeout_s, shutdown_timeout_s=cfg.shutdown_timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def returncode(self) -> int | None:
        """Exit status if the server process has exited, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    # ------------------------------------------------------------------ life cycle
    def start(self) -> LiveServer:
        """Start the process and wait until `/health` answers 200 (ServerError otherwise, server stopped)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        t0 = time.perf_counter()
        try:
            self.proc = psutil.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.env}, start_new_session=True)
        except OSError as e:
            self._close_log()
            raise ServerError(f"cannot start the {self.name} ({self.argv[0]}): {e}") from None
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        while True:
            self._remember_tree()
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"the {self.name} exited with status {rc} during start-up, after "
                                  f"{time.perf_counter() - t0:.0f} s (log: {self.log_path})", self.log_tail())
            status, _ = http_get(self.base_url + "/health", timeout_s=2.0)
            if status == 200:
                return
            if time.perf_counter() > deadline:
                raise ServerError(f"the {self.name} did not become healthy within {self.startup_timeout_s:.0f} s "
                                  f"(log: {self.log_path})", self.log_tail())
            time.sleep(0.5)

    def _remember_tree(self) -> None:
        """Note the server's descendants (a child that leaves the process group can still be found)."""
        if self.proc is None:
            return
        try:
            self._tree.update(c.pid for c in self.proc.children(recursive=True))
        except psutil.Error:
            pass

    def check_alive(self) -> None:
        """ServerError if the server process has exited."""
        rc = self.returncode()
        if rc is not None:
            raise ServerError(f"the {self.name} exited with status {rc} (log: {self.log_path})", self.log_tail())

    def stop(self) -> int | None:
        """Terminate the process group and every remembered descendant; returns the exit status."""
        if self.proc is None:
            return None
        self._remember_tree()
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(self.shutdown_timeout_s)
        except psutil.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)
        leftovers = []
        for pid in self._tree:
            try:
                p = psutil.Process(pid)
                p.kill()
                leftovers.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        try:
            rc = self.proc.wait(5)
        except psutil.TimeoutExpired:
            rc = None
        self._close_log()
        return rc

    def survivors(self) -> list[int]:
        """Pids of the server and its remembered descendants still alive (empty after a clean `stop()`)."""
        pids = set(self._tree) | ({self.proc.pid} if self.proc is not None else set())
        out = []
        for pid in sorted(pids):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                pass
        return out

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LiveServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

