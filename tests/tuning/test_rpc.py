"""Distributed measurement over TVM RPC: a real tracker and two real servers on loopback.

The RPC tests build one small matmul in-process (``tvm.compile`` + ``export_library(tar)``, what
MetaSchedule's LocalBuilder workers do; the LocalBuilder itself spends ~40 s per worker importing
``tvm.s_tir.tensor_intrin``) and measure it through :func:`rpc_runner`, then SIGKILL one server in
the middle of a batch and check that :func:`measure_with_retries` still returns timings for every
candidate. The retry logic is also tested without processes, on a scripted runner.
"""

from __future__ import annotations

import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms
from tvm.support.tar import tar

from qcompile.errors import QCompileError, TuneError
from qcompile.tuning.rpc import (
    LocalCluster,
    is_lost_session,
    measure_with_retries,
    parse_tracker,
    rpc_runner,
    tracker_status,
)

# What TVM 0.27's RPCRunner reported when a server was SIGKILLed in the middle of a session
# (captured with LocalCluster; the traceback frames are cut).
KILLED_SERVER_ERROR = (
    "RPCRunner: An exception occurred\nTraceback (most recent call last):\n"
    '  File ".../tvm/s_tir/meta_schedule/runner/rpc_runner.py", line 393, in _worker_func\n'
    "tvm.error.InternalError: Check failed: (code == RPCCode::kReturn) is false: code=kShutdown\n\n"
    "During handling of the above exception, another exception occurred:\n\n"
    "tvm.error.InternalError: Check failed: (code == RPCCode::kReturn) is false: code=1\n"
)
KERNEL_ERROR = (
    "RPCRunner: An exception occurred\nTraceback (most recent call last):\n"
    '  File ".../tvm_ffi/cython/device.pxi", line 144, in tvm_ffi.core.Device.__init__\n'
    "ValueError: Unknown device: llvm\n"
)
SESSION_TIMEOUT_ERROR = (
    "RPCRunner: An exception occurred\nRPCSessionTimeoutError: Your 60.0s session has expired, "
    'try to increase the "session_timeout" value.'
)


# --- parse_tracker ------------------------------------------------------------------------------


def test_parse_tracker_accepts_host_port():
    assert parse_tracker("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert parse_tracker(" gpu-box.local:65535 ") == ("gpu-box.local", 65535)
    assert parse_tracker("[::1]:9190") == ("::1", 9190)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("localhost", "no port"),
        ("", "no port"),
        (":9190", "empty host"),
        ("[]:9190", "empty host"),
        ("localhost:", "not an integer"),
        ("localhost:http", "not an integer"),
        ("localhost:0", "outside 1..65535"),
        ("localhost:65536", "outside 1..65535"),
        ("localhost:-5", "outside 1..65535"),
    ],
)
def test_parse_tracker_rejects(text, why):
    with pytest.raises(TuneError, match=why) as info:
        parse_tracker(text)
    assert repr(text) in str(info.value) and "HOST:PORT" in str(info.value)
    assert isinstance(info.value, QCompileError)


# --- lost-session matcher and retries, without processes ------------------------------------------


def test_lost_session_matcher():
    assert is_lost_session(ms.runner.RunnerResult(None, KILLED_SERVER_ERROR))
    assert is_lost_session(ms.runner.RunnerResult(None, "RPCRunner: An exception occurred\nConnection reset by peer"))
    assert not is_lost_session(ms.runner.RunnerResult(None, KERNEL_ERROR))
    assert not is_lost_session(ms.runner.RunnerResult(None, SESSION_TIMEOUT_ERROR))
    assert not is_lost_session(ms.runner.RunnerResult([1e-3], None))


class _Done:
    def __init__(self, result: ms.runner.RunnerResult) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> ms.runner.RunnerResult:
        return self._result


class _ScriptedRunner:
    """Answers each input from a script: a list of error messages (None: success) per input."""

    def __init__(self, script: dict[str, list[str | None]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.batches: list[list[str]] = []

    def run(self, inputs):
        self.batches.append(list(inputs))
        out = []
        for name in inputs:
            error = self.script[name].pop(0) if len(self.script[name]) > 1 else self.script[name][0]
            out.append(_Done(ms.runner.RunnerResult(None, error) if error else ms.runner.RunnerResult([0.5], None)))
        return out


def test_retries_rerun_only_lost_sessions_and_keep_order():
    runner = _ScriptedRunner(
        {
            "ok": [None],
            "lost-once": [KILLED_SERVER_ERROR, None],
            "broken": [KERNEL_ERROR],
            "crashes-server": [KILLED_SERVER_ERROR],
        }
    )
    results = measure_with_retries(runner, ["ok", "lost-once", "broken", "crashes-server"], retries=2)
    assert [r.run_secs is not None for r in results] == [True, True, False, False]
    assert results[2].error_msg == KERNEL_ERROR
    assert is_lost_session(results[3])  # gave up after `retries` re-runs, last error kept
    # the kernel error is never re-run; the lost ones are, a bounded number of times
    assert runner.batches == [
        ["ok", "lost-once", "broken", "crashes-server"],
        ["lost-once", "crashes-server"],
        ["crashes-server"],
    ]
    no_retry = _ScriptedRunner({"a": [KILLED_SERVER_ERROR, None]})
    assert measure_with_retries(no_retry, ["a"], retries=0)[0].run_secs is None
    with pytest.raises(TuneError, match="retries"):
        measure_with_retries(no_retry, ["a"], retries=-1)


# --- real tracker and servers ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rpc_runner_refuses_dead_tracker():
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(TuneError, match="no RPC tracker answers") as info:
        rpc_runner(address, "any", ms.runner.EvaluatorConfig())
    assert address in str(info.value) and "tvm.exec.rpc_tracker" in str(info.value)
    assert time.monotonic() - start < 10  # not TVM's 60 s of retrying a refused connection


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(servers=2, key="qcompile-test") as c:
        yield c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[ms.runner.RunnerInput]:
    n = 128
    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    path = Path(tmp_path_factory.mktemp("rpc")) / "matmul.tar"
    tvm.compile(tvm.IRModule({"main": func}), target="llvm").export_library(str(path), fcompile=tar)
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    return [ms.runner.RunnerInput(str(path), "cpu", args) for _ in range(4)]


def _assert_timed(result: ms.runner.RunnerResult) -> None:
    assert result.error_msg is None, result.error_msg
    secs = [float(s) for s in result.run_secs]
    assert secs and all(math.isfinite(s) and 0 < s < 10 for s in secs), secs


def test_rpc_runner_refuses_unknown_key(cluster):
    with pytest.raises(TuneError) as info:
        rpc_runner(cluster.tracker, "no-such-key", ms.runner.EvaluatorConfig())
    message = str(info.value)
    assert cluster.tracker in message and "'no-such-key'" in message
    assert f"'{cluster.key}' (2)" in message  # the keys it does have
    assert f"tvm.exec.rpc_server --tracker {cluster.tracker} --key no-such-key" in message


@pytest.fixture(scope="module")
def runner(cluster):
    """One runner for the RPC tests below (each new one starts worker processes that import TVM).

    Sessions last > 1 s (upload, warm-up, one repeat of >= 1 s) so that a kill lands inside one.
    """
    status = tracker_status(cluster.tracker)
    assert status.registered == {cluster.key: 2} and status.free[cluster.key] == 2
    return rpc_runner(cluster.tracker, cluster.key, ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=1000))


def test_measure_through_rpc(runner, inputs):
    assert runner.pool._threadpool._max_workers == 2  # one worker per registered server
    results = measure_with_retries(runner, inputs[:2])
    assert len(results) == 2
    for result in results:
        _assert_timed(result)


class _Recording:
    """Passes batches to a runner and records their sizes (to see that a retry happened)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.batches: list[int] = []

    def run(self, inputs):
        self.batches.append(len(inputs))
        return self.runner.run(inputs)


def test_lost_server_mid_batch_loses_no_result(cluster, runner, inputs):
    recording = _Recording(runner)
    with ThreadPoolExecutor(1) as pool:
        batch = pool.submit(measure_with_retries, recording, inputs, 3)
        deadline = time.monotonic() + 60
        while not cluster.serving(0):
            assert not batch.done() and time.monotonic() < deadline, "server 0 never got a session"
            time.sleep(0.02)
        time.sleep(0.5)  # past the session's handshake (done before the fork): the kill interrupts a run
        cluster.kill_server(0)
        results = batch.result(timeout=120)
    assert cluster.alive() == 1
    batches = recording.batches
    assert batches[0] == 4 and len(batches) >= 2 and batches[1] >= 1, batches  # a retry happened
    assert len(results) == len(inputs)
    for result in results:
        _assert_timed(result)
    assert tracker_status(cluster.tracker).registered == {cluster.key: 1}


def test_no_server_left_is_an_error_not_a_hang(cluster, runner, inputs):
    cluster.kill_server(1)
    assert cluster.alive() == 0
    start = time.monotonic()
    with pytest.raises(TuneError, match="no RPC server has been registered under key 'qcompile-test'"):
        measure_with_retries(runner, inputs[:1], no_server_timeout_s=2.0)
    assert time.monotonic() - start < 30
