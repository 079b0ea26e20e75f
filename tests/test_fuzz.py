"""A fast, deterministic sample of the fuzz campaign (``benchmarks/fuzz.py``), and its fixes.

One mutated file per mutation class goes through ``analyze`` and ``check`` in-process, and the
classes that used to break compile go through compile too: every run must end in exit 0 or a
documented code with one ``mpcompile: error:`` line, and leave the input folder untouched.
The long campaign (>= 1,000 files, subprocesses with timeouts and RLIMIT_AS) runs in
``python -m benchmarks``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fuzz  # noqa: E402
from benchmarks.fuzz_mutators import MUTATIONS, FuzzCase, folder_digest, make_case, plan_cases  # noqa: E402
from mpcompile.cli import main  # noqa: E402
from mpcompile.errors import EXIT_BAD_INPUT  # noqa: E402
from mpcompile.numerics.mp_law import matrix_eigenvalues  # noqa: E402
from mpcompile.numerics.permutation import search_permutation  # noqa: E402

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}
# Classes whose files used to crash compile (issue 15); compile is slow enough to sample only these.
COMPILE_CLASSES = ("wrong_init_dims", "dtype_swap", "raw_data_length", "zero_size", "nan_inf",
                   "wrong_value_info", "ext_truncated_nolength", "byte_flip")


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_rules(code: int, err: list[str], what: str) -> None:
    assert code in DOCUMENTED, f"{what}: exit {code}: {err}"
    if code not in (0, 1):
        errors = [line for line in err if line.startswith("mpcompile: error:")]
        assert len(errors) == 1, f"{what}: expected one error line, got {err}"
    assert not any("Traceback" in line for line in err), what


def test_mutations_are_deterministic(tmp_path):
    for case in plan_cases(len(MUTATIONS), seed=3):
        a = make_case(case, tmp_path / "a")
        b = make_case(case, tmp_path / "b")
        assert a.read_bytes() == b.read_bytes(), case.name
        assert folder_digest(a.parent) == folder_digest(b.parent) or case.mutation == "ext_symlink"
    # a different seed changes the bytes of a random mutation
    x = make_case(FuzzCase(0, "digits_mlp", "byte_flip", 1), tmp_path / "x")
    y = make_case(FuzzCase(0, "digits_mlp", "byte_flip", 2), tmp_path / "y")
    assert x.read_bytes() != y.read_bytes()


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_one_file_per_class_keeps_the_rules(tmp_path, capsys, mutation):
    case = FuzzCase(0, "digits_mlp", mutation, seed=11)
    model = make_case(case, tmp_path)
    before = folder_digest(model.parent)
    commands = [["-q", "analyze", str(model), "--json"], ["-q", "check", str(model)]]
    if mutation in COMPILE_CLASSES:
        commands.append(["-q", "compile", str(model), "-o", str(tmp_path / "out.onnx"), "--no-permute"])
    for argv in commands:
        code, err = _run(argv, capsys)
        _assert_rules(code, err, f"{mutation} {argv[1]}")
        assert folder_digest(model.parent) == before, f"{mutation} {argv[1]} modified the input"


def _mlp_with(tmp_path: Path, edit) -> Path:
    proto = onnx.load(str(ROOT / "mpcompile" / "data" / "digits_mlp.onnx"))
    edit(proto)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    return path


def test_nan_weight_is_refused_naming_the_tensor(tmp_path, capsys):
    def edit(proto):
        t = proto.graph.initializer[2]  # net.2.weight
        a = numpy_helper.to_array(t).copy()
        a[3, 5] = np.nan
        a[0, 0] = np.inf
        t.CopyFrom(numpy_helper.from_array(a, t.name))

    path = _mlp_with(tmp_path, edit)
    for command in ("analyze", "compile"):
        code, err = _run(["-q", command, str(path), "-o", str(tmp_path / f"{command}.out")], capsys)
        assert code == EXIT_BAD_INPUT, err
        assert len(err) == 1 and "'net.2.weight'" in err[0] and "1 NaN, 1 ±Inf" in err[0], err


def test_nan_calibration_data_is_refused_naming_the_input(tmp_path, capsys):
    model = ROOT / "mpcompile" / "data" / "digits_mlp.onnx"
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    x[4, 7] = np.nan
    np.savez(tmp_path / "calib.npz", input=x)
    code, err = _run(["-q", "compile", str(model), "-o", str(tmp_path / "o.onnx"),
                      "--calib", str(tmp_path / "calib.npz")], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert len(err) == 1 and "calibration input 'input'" in err[0] and "1 NaN" in err[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_dense_model_producing_nan_is_refused(tmp_path, capsys):
    def edit(proto):  # a NaN bias: the GEMM weights are fine, the outputs are not
        t = proto.graph.initializer[5]  # net.4.bias
        a = numpy_helper.to_array(t).copy()
        a[:] = np.nan
        t.CopyFrom(numpy_helper.from_array(a, t.name))

    path = _mlp_with(tmp_path, edit)
    code, err = _run(["-q", "compile", str(path), "-o", str(tmp_path / "o.onnx"), "--no-permute"], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert "the input model's output" in err[0] and "non-finite" in err[0], err


def test_truncated_external_file_without_length_is_refused(tmp_path, capsys):
    case = FuzzCase(0, "digits_mlp", "ext_truncated_nolength", seed=5)
    model = make_case(case, tmp_path)
    for command in ("analyze", "check", "compile"):
        code, err = _run(["-q", command, str(model), "-o", str(tmp_path / "o.onnx")][: 3 if command == "check"
                                                                                     else 5], capsys)
        assert code == EXIT_BAD_INPUT, (command, err)
        assert "is truncated" in err[-1], (command, err)


def test_raw_data_length_mismatch_names_the_tensor(tmp_path, capsys):
    def edit(proto):
        t = proto.graph.initializer[4]  # net.4.weight, 10x64 float = 2560 bytes
        t.raw_data = t.raw_data[:2558]

    path = _mlp_with(tmp_path, edit)
    code, err = _run(["-q", "analyze", str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert "'net.4.weight': raw_data has 2558 bytes" in err[0] and "need 2560" in err[0], err


def test_huge_declared_dims_are_refused_before_allocating(tmp_path):
    """In a forked child limited to 1 GiB of address space: a 2^62-element weight must be
    refused from its declared size, not by a failed allocation."""
    case = FuzzCase(0, "digits_mlp", "huge_dims", seed=2)
    results = fuzz.run_case(case, tmp_path, ("analyze", "check"), memory_bytes=2**30, timeout_s=60)
    for r in results:
        assert r.exit_code == EXIT_BAD_INPUT and not r.violations, r
        assert "MemoryError" not in r.message


def test_exec_runner_real_subprocess(tmp_path):
    """One case through a real ``python -m mpcompile`` with preexec_fn limits."""
    case = FuzzCase(0, "digits_mlp", "ext_bad_offset", seed=0)
    (result,) = fuzz.run_case(case, tmp_path, ("analyze",), runner="exec", timeout_s=60)
    assert result.exit_code == EXIT_BAD_INPUT and not result.violations, result
    assert "external data" in result.message


def test_judge_flags_what_the_campaign_forbids():
    assert fuzz.judge("analyze", 70, "mpcompile: internal error: boom", False)[1] == ["internal error (exit 70)"]
    assert fuzz.judge("check", None, "", True)[1] == ["timeout"]
    assert "undocumented exit code 9" in fuzz.judge("check", 9, "mpcompile: error: x", False)[1]
    two = "mpcompile: error: a\nmpcompile: error: b\n"
    assert fuzz.judge("analyze", 3, two, False)[1] == ["2 'mpcompile: error:' lines (expected one)"]
    assert fuzz.judge("analyze", 3, "mpcompile: error: bad\n", False) == ("mpcompile: error: bad", [])


def test_gram_eigenvalues_survive_huge_entries():
    a = np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32)
    reference = matrix_eigenvalues(a)
    scaled = matrix_eigenvalues(a * np.float32(4e19))  # a float32 Gram would overflow to Inf
    assert np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled / (4e19) ** 2, reference, rtol=1e-5, atol=1e-6 * reference.max())


def test_small_layer_permutation_search_stops_before_its_budget():
    s = np.abs(np.random.default_rng(1).standard_normal((32, 32)))
    start = time.perf_counter()
    result = search_permutation(s, time_budget_s=5.0, seed=0)
    assert time.perf_counter() - start < 2.0  # the tabu walk stalls long before 5 s on 8 groups
    assert result.efficacy > 0.5 and result.kept_after > result.kept_before


def test_huge_declared_input_is_refused(tmp_path, capsys):
    def edit(proto):
        dim = proto.graph.input[0].type.tensor_type.shape.dim[-1]
        dim.ClearField("dim_param")
        dim.dim_value = 2**40

    path = _mlp_with(tmp_path, edit)
    code, err = _run(["-q", "analyze", str(path)], capsys)
    assert code == 4, err
    assert len(err) == 1 and "input 'input' declares" in err[0], err


def test_node_name_not_utf8_is_refused(tmp_path, capsys):
    """A flipped byte inside a name: protobuf hands the field back as bytes (campaign file 380)."""
    proto = onnx.load(str(ROOT / "mpcompile" / "data" / "digits_mlp.onnx"))
    proto.graph.node[1].name = "ZZZZ_marker"
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString().replace(b"ZZZZ_marker", b"\xff\xfeZZ_marker"))
    for command in ("analyze", "check"):
        code, err = _run(["-q", command, str(path)], capsys)
        assert code == EXIT_BAD_INPUT, err
        assert len(err) == 1 and "node[1]: field 'name' is not valid UTF-8" in err[0], err
