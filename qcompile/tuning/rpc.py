"""Distributed measurement over TVM's RPC tracker (MetaSchedule's ``RPCRunner``).

Tuning builds candidates locally and measures them on the servers registered with a TVM RPC
tracker (``python -m tvm.exec.rpc_tracker``, ``python -m tvm.exec.rpc_server --tracker ... --key
...``). This module does not implement an RPC engine of its own; it wraps TVM's:

- :func:`parse_tracker` turns ``"HOST:PORT"`` into ``(host, port)`` or raises :class:`TuneError`.
- :func:`rpc_runner` checks that the tracker answers and that servers are registered under the key
  (the error names the tracker, the key, the keys it does have and how to start a server), then
  returns MetaSchedule's ``RPCRunner`` for it.
- :func:`measure_with_retries` runs a batch of candidates through any MetaSchedule runner and
  re-runs the candidates whose RPC session was lost (a server killed or disconnected mid-run), at
  most ``retries`` times each, so a lost server costs time, never a record. A candidate whose
  kernel really fails (a compile, load or runtime error; a session that ran past its timeout) is
  not re-run, and a kernel that crashes its server is re-run at most ``retries`` times.
- :class:`LocalCluster` starts a tracker and N servers on loopback (tests, README example) and
  stops exactly the processes it started.

Guarantees: :func:`measure_with_retries` returns one result per input, in input order; a result
either has ``run_secs`` or the ``error_msg`` of its last attempt. It raises :class:`TuneError`
rather than waiting forever when no server is registered under the key any more.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvm import rpc
from tvm.s_tir import meta_schedule as ms

from qcompile.errors import TuneError

logger = logging.getLogger(__name__)

__all__ = [
    "LocalCluster",
    "TrackerStatus",
    "is_lost_session",
    "measure_with_retries",
    "parse_tracker",
    "rpc_runner",
    "tracker_status",
]

START_SERVER_HINT = "start one with: python -m tvm.exec.rpc_server --tracker {tracker} --key {key}"

# Substrings of a RunnerResult.error_msg that mean the RPC session (not the kernel) went away.
# Measured with TVM 0.27 by SIGKILLing a server mid-session (tests/tune/test_rpc.py):
# the client's pending call fails with "Check failed: (code == RPCCode::kReturn) is false:
# code=kShutdown"; a socket torn down under a send/recv gives the OS errors; a tracker that hands out
# a server that died before the tracker noticed gives "Cannot request KEY after N retry".
LOST_SESSION_MARKERS: tuple[str, ...] = (
    "code=kShutdown",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "Socket closed",
    "socket closed",
    "Cannot request ",
)
# A session the *server* ended because it ran past session_timeout is the kernel's fault (too slow
# or hung): re-running it would only time out again.
NOT_LOST_MARKERS: tuple[str, ...] = ("RPCSessionTimeoutError", "RPCRunner: Timeout")


def parse_tracker(text: str) -> tuple[str, int]:
    """Parse ``"HOST:PORT"`` (an IPv6 host in brackets: ``"[::1]:9190"``) into ``(host, port)``.

    Raises :class:`TuneError` naming the input and the expected form when the port is missing,
    not an integer or outside 1..65535, or the host is empty.
    """
    value = text.strip()
    form = "expected HOST:PORT, e.g. 127.0.0.1:9190"
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise TuneError(f"RPC tracker address {text!r} has no port; {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise TuneError(f"RPC tracker address {text!r} has an empty host; {form}")
    try:
        port = int(port_text)
    except ValueError:
        raise TuneError(f"RPC tracker address {text!r}: port {port_text!r} is not an integer; {form}") from None
    if not 1 <= port <= 65535:
        raise TuneError(f"RPC tracker address {text!r}: port {port} is outside 1..65535; {form}")
    return host, port


@dataclass(frozen=True)
class TrackerStatus:
    """What a tracker reports: servers registered per key and how many of them are free now."""

    registered: dict[str, int]
    free: dict[str, int]


def tracker_status(tracker: str, timeout_s: float = 10.0) -> TrackerStatus:
    """Ask the tracker at ``"HOST:PORT"`` which servers are registered under which keys.

    Raises :class:`TuneError` (naming the address and how to start a tracker) when nothing answers
    there within ``timeout_s`` or what answers is not a TVM RPC tracker. Does not wait the 60 s
    TVM's own client spends retrying a refused connection.
    """
    host, port = parse_tracker(tracker)
    hint = f"start one with: python -m tvm.exec.rpc_tracker --host {host} --port {port}"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise TuneError(f"no RPC tracker answers at {tracker} ({err}); {hint}") from None
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            session = rpc.connect_tracker(host, port)
            try:
                box["summary"] = session.summary()
            finally:
                session.close()
        except Exception as err:  # noqa: BLE001 - reported below with the address
            box["error"] = err

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "summary" not in box:
        why = box.get("error", f"no answer within {timeout_s:g} s")
        raise TuneError(f"{tracker} does not answer as a TVM RPC tracker ({why}); {hint}")
    summary = box["summary"]
    registered: dict[str, int] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", "")).removeprefix("server:")
        registered[key] = registered.get(key, 0) + 1
    free = {str(k): int(v.get("free", 0)) for k, v in summary.get("queue_info", {}).items()}
    return TrackerStatus(registered=registered, free=free)


def rpc_runner(
    tracker: str,
    key: str,
    evaluator: ms.runner.EvaluatorConfig,
    session_timeout_s: float = 60.0,
    max_workers: int | None = None,
) -> ms.runner.RPCRunner:
    """MetaSchedule's ``RPCRunner`` measuring on the servers registered under ``key`` at ``tracker``.

    ``tracker`` is ``"HOST:PORT"``. Before building the runner this checks that the tracker answers
    and that at least one server is registered under ``key``; otherwise it raises
    :class:`TuneError` naming the tracker, the key, the keys the tracker does have and the command
    that starts a server. ``session_timeout_s`` bounds one measurement session (the server kills a
    session that runs longer). ``max_workers`` (parallel measurement sessions) defaults to the
    number of servers registered under the key.
    """
    if session_timeout_s <= 0:
        raise TuneError(f"session_timeout_s must be > 0, got {session_timeout_s}")
    if max_workers is not None and max_workers < 1:
        raise TuneError(f"max_workers must be >= 1, got {max_workers}")
    host, port = parse_tracker(tracker)
    status = tracker_status(tracker)
    count = status.registered.get(key, 0)
    if count == 0:
        others = ", ".join(f"{k!r} ({n})" for k, n in sorted(status.registered.items())) or "none"
        raise TuneError(
            f"RPC tracker {tracker} has no server registered under key {key!r} "
            f"(keys it has, with server counts: {others}); " + START_SERVER_HINT.format(tracker=tracker, key=key)
        )
    config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=key,
        session_timeout_sec=session_timeout_s,
    )
    workers = max_workers if max_workers is not None else count
    logger.info("RPC runner: tracker %s, key %r, %d server(s), %d worker(s)", tracker, key, count, workers)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=workers)


def is_lost_session(result: ms.runner.RunnerResult) -> bool:
    """Whether ``result`` failed because its RPC session or connection was lost, not its kernel.

    True for the errors TVM 0.27 reports when a server dies or disconnects mid-session
    (:data:`LOST_SESSION_MARKERS`); False for a result with ``run_secs``, for a session the server
    ended on timeout, and for every other error (build, load, runtime failure of the kernel).
    """
    message = result.error_msg
    if not message:
        return False
    text = str(message)
    if any(marker in text for marker in NOT_LOST_MARKERS):
        return False
    return any(marker in text for marker in LOST_SESSION_MARKERS)


def _rpc_key(runner: Any) -> tuple[str, str] | None:
    """``("HOST:PORT", key)`` of an ``RPCRunner``; None for other runners."""
    if not isinstance(runner, ms.runner.RPCRunner):
        return None
    config = runner.rpc_config
    return f"{config.tracker_host}:{config.tracker_port}", str(config.tracker_key)


def _abandon(runner: Any, futures: Sequence[ms.runner.RunnerFuture]) -> None:
    """Stop an RPCRunner whose workers wait in the tracker's queue for a server that may never come.

    TVM's ``PopenPoolExecutor.shutdown`` deadlocks while a worker thread is blocked reading from its
    worker process, so the worker processes are killed first (their readers then see EOF and the
    futures complete with an error), and the pool is shut down after that.
    """
    pool = runner.pool
    for worker in list(getattr(pool, "_worker_map", {}).values()):
        proc = getattr(worker, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10.0
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        time.sleep(0.05)
    pool.shutdown(wait=False)


def _wait(
    runner: Any, futures: Sequence[ms.runner.RunnerFuture], no_server_timeout_s: float
) -> list[ms.runner.RunnerResult]:
    """Wait for ``futures``; raise TuneError if the tracker has had no server for the key that long."""
    rpc_addr = _rpc_key(runner)
    last_seen = time.monotonic()
    next_check = last_seen + 1.0
    while not all(f.done() for f in futures):
        time.sleep(0.05)
        now = time.monotonic()
        if rpc_addr is None or now < next_check:
            continue
        next_check = now + 1.0
        tracker, key = rpc_addr
        try:
            alive = tracker_status(tracker).registered.get(key, 0)
        except TuneError:
            alive = 0
        if alive:
            last_seen = now
        elif now - last_seen > no_server_timeout_s:
            _abandon(runner, futures)
            raise TuneError(
                f"no RPC server has been registered under key {key!r} at tracker {tracker} for "
                f"{no_server_timeout_s:g} s while measurements were pending (all servers lost?); "
                + START_SERVER_HINT.format(tracker=tracker, key=key)
            )
    return [f.result() for f in futures]


def measure_with_retries(
    runner: ms.runner.Runner,
    inputs: Sequence[ms.runner.RunnerInput],
    retries: int = 3,
    *,
    no_server_timeout_s: float = 60.0,
) -> list[ms.runner.RunnerResult]:
    """Measure ``inputs`` with ``runner``; re-run those whose RPC session was lost.

    Returns one ``RunnerResult`` per input, in input order. An input whose result says its session
    or connection was lost (:func:`is_lost_session`: a server killed or disconnected mid-run) is
    run again, together with the other lost ones, up to ``retries`` more times; the tracker hands
    the re-runs to the servers still registered. Every other result (timings, or a real kernel
    error) is kept as first measured, so a failing kernel is never re-run and a kernel that crashes
    its server is re-run at most ``retries`` times. Works with any MetaSchedule runner (a
    ``LocalRunner`` never reports lost sessions, so it runs once). For an ``RPCRunner`` it raises
    :class:`TuneError` when no server has been registered under its key for
    ``no_server_timeout_s`` while measurements are pending (TVM's runner itself would wait for a
    server forever); the runner's worker pool is shut down then and the runner cannot be reused.
    """
    if retries < 0:
        raise TuneError(f"retries must be >= 0, got {retries}")
    results: list[ms.runner.RunnerResult | None] = [None] * len(inputs)
    pending = list(range(len(inputs)))
    for attempt in range(retries + 1):
        if not pending:
            break
        futures = runner.run([inputs[i] for i in pending])
        batch = _wait(runner, futures, no_server_timeout_s)
        lost: list[int] = []
        for index, result in zip(pending, batch):
            results[index] = result
            if is_lost_session(result):
                lost.append(index)
        if lost and attempt < retries:
            logger.warning(
                "RPC session lost for %d of %d candidate(s); re-running them (retry %d of %d)",
                len(lost),
                len(pending),
                attempt + 1,
                retries,
            )
        pending = lost
    return [r for r in results if r is not None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no stderr)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty stderr)"


class LocalCluster:
    """A TVM RPC tracker and ``servers`` RPC servers on loopback, as child processes.

    Each process is ``sys.executable -m tvm.exec.rpc_tracker`` / ``... rpc_server`` with this
    process's environment (so it imports the same TVM), in a process group of its own so that
    :meth:`kill_server` and exit stop the whole server (TVM forks a worker per server and a child
    per session) and nothing else. Entering waits until all servers are registered under ``key``
    (:class:`TuneError` with the processes' stderr tails after ``start_timeout_s``).

    Usage::

        with LocalCluster(servers=2) as cluster:
            runner = rpc_runner(cluster.tracker, cluster.key, ms.runner.EvaluatorConfig())
    """

    def __init__(self, servers: int = 2, key: str = "qcompile-local", start_timeout_s: float = 120.0) -> None:
        if servers < 1:
            raise TuneError(f"LocalCluster needs at least one server, got {servers}")
        self.key = key
        self.servers = servers
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._dir: Path | None = None
        self._tracker_proc: subprocess.Popen[bytes] | None = None
        self._server_procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []

    @property
    def tracker(self) -> str:
        """The tracker's address, ``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalCluster:
        self._dir = Path(tempfile.mkdtemp(prefix="qcompile-rpc-"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        assert self._dir is not None
        log = self._dir / f"{name}.stderr"
        self._logs.append(log)
        with open(log, "wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=os.environ.copy(),
                start_new_session=True,
            )

    def _failure(self, what: str) -> TuneError:
        tails = "\n".join(f"--- {log.name} ---\n{_tail(log)}" for log in self._logs)
        return TuneError(f"LocalCluster: {what}\n{tails}")

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        self.port = _free_port()
        self._tracker_proc = self._spawn(
            "tracker",
            ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port), "--port-end", str(self.port + 1)],
        )
        # servers retry a refused tracker only every 5 s: start them once the tracker accepts
        while True:
            if self._tracker_proc.poll() is not None:
                raise self._failure(f"the tracker exited with code {self._tracker_proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._failure(f"the tracker did not listen on {self.tracker} within {self.start_timeout_s:g} s")
            time.sleep(0.1)
        for i in range(self.servers):
            port = _free_port()
            self._server_procs.append(
                self._spawn(
                    f"server{i}",
                    [
                        "tvm.exec.rpc_server",
                        "--tracker",
                        self.tracker,
                        "--key",
                        self.key,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--port-end",
                        str(port + 1),
                    ],
                )
            )
        while True:
            for i, proc in enumerate(self._server_procs):
                if proc.poll() is not None:
                    raise self._failure(f"server {i} exited with code {proc.returncode}")
            registered = tracker_status(self.tracker).registered.get(self.key, 0)
            if registered >= self.servers:
                return
            if time.monotonic() > deadline:
                raise self._failure(
                    f"{registered} of {self.servers} servers registered under key {self.key!r} at "
                    f"{self.tracker} within {self.start_timeout_s:g} s"
                )
            time.sleep(0.2)

    def alive(self) -> int:
        """How many of the started servers are still running."""
        return sum(proc.poll() is None for proc in self._server_procs)

    def serving(self, i: int) -> bool:
        """Whether server ``i`` is serving a session now (TVM forks one process per session).

        TVM 0.27's ``rpc_server`` runs its listen loop in one child process and forks a grandchild
        per session, so a server holds a session when its process tree has two or more descendants.
        """
        import psutil

        proc = self._server_procs[i]
        try:
            return len(psutil.Process(proc.pid).children(recursive=True)) >= 2
        except psutil.NoSuchProcess:
            return False

    def kill_server(self, i: int) -> None:
        """SIGKILL server ``i`` and every process it started (its process group)."""
        proc = self._server_procs[i]
        if proc.poll() is None:  # not reaped yet, so the group id cannot name anyone else's processes
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """Stop every process this cluster started (SIGTERM, SIGKILL after 5 s); idempotent."""
        import psutil

        procs = [p for p in [*self._server_procs, self._tracker_proc] if p is not None]
        started: list[psutil.Process] = []
        for proc in procs:
            if proc.poll() is not None:
                continue
            try:
                leader = psutil.Process(proc.pid)
                started += [leader, *leader.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            os.killpg(proc.pid, signal.SIGTERM)  # leader not reaped yet: the group is ours
        _, survivors = psutil.wait_procs(started, timeout=5.0)
        for survivor in survivors:  # psutil checks identity (pid and start time) before signalling
            try:
                survivor.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            proc.wait()
        self._server_procs = []
        self._tracker_proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
