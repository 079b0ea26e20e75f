"""Conformance on real architectures (fast CI subset of ``benchmarks/conformance.py``).

Each model is exported here with random weights by both torch exporters; for each export:
discovery finds every constant-weight GEMM/Conv that an independent protobuf count finds,
``mpcompile`` compile exits 0 with no traceback, ``mpcompile check`` passes and permutations
folded into every foldable layer are exact before pruning. The full list (ResNet-50, ViT,
Swin, ...) runs in ``python -m benchmarks``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks/` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.conformance import FOLD_TOLERANCE, count_constant_gemms, run_case  # noqa: E402
from benchmarks.conformance_models import CASES  # noqa: E402

QUICK = [case for case in CASES if case.quick]


def _param(case, dynamo: bool):
    return pytest.param(case, dynamo, id=f"{case.name}-{'dynamo' if dynamo else 'legacy'}")


@pytest.mark.parametrize(("case", "dynamo"), [_param(c, d) for c in QUICK for d in (False, True)
                                                  if ("dynamo" if d else "legacy") in c.quick])
def test_model_compiles_and_checks(case, dynamo, tmp_path, single_torch_thread):
    result = run_case(case, dynamo, tmp_path)
    if result.status.startswith("exporter failed"):
        pytest.skip(result.status)  # the exporter's own limit, recorded by the benchmark
    assert result.expected_layers > 0
    assert result.found_layers == result.expected_layers, result.problems
    assert result.compile_exit == 0 and result.check_exit == 0, result.problems
    assert not result.traceback, result.problems
    assert result.fold_error <= FOLD_TOLERANCE, result.problems  # (some exports have nothing foldable)
    assert result.status == "ok"


def test_independent_counter_sees_constants_through_reshape_and_subgraphs():
    """The counter is stricter than discovery: Reshape-of-constant weights and If branches count."""
    w = numpy_helper.from_array(__import__("numpy").ones((8, 8), "float32"), "w")
    shape = numpy_helper.from_array(__import__("numpy").array([8, 8], "int64"), "s")
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y_b"])], "b", [],
                               [helper.make_tensor_value_info("y_b", TensorProto.FLOAT, [2, 8])])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["w", "s"], ["w2"]),
         helper.make_node("MatMul", ["x", "w2"], ["h"]),
         helper.make_node("MatMul", ["h", "h"], ["hh"]),  # not a constant weight
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, shape],
    )
    counts = count_constant_gemms(helper.make_model(graph))
    assert counts == {"main": 1, "main/If.then_branch": 1, "main/If.else_branch": 1}
