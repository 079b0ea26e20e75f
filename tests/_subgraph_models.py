"""Small control-flow models built with onnx.helper for the subgraph tests (no download)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D = 32
OPSET = 17


def _init(name: str, rng: np.random.Generator, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32), name)


def _const(output: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=numpy_helper.from_array(array, output + "_t"))


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_gemm_model(seed: int = 0) -> onnx.ModelProto:
    """Top MatMul P → If(mean(h0) > 0): both branches read h0 (captured) with the SAME outer
    initializer ``w_shared``; then: Gemm(transB=1) on outer ``w_then``; else: MatMul on a
    Constant local to the branch. A top-level MatMul Q also reads h0, so folding Q's
    permutation into P would reach into the branches (the only other readers of h0).
    The branch is chosen per batch by mean(x) > 0."""
    rng = np.random.default_rng(seed)
    inits = [_init(n, rng, (D, D)) for n in ("w0", "wq", "w_shared", "w_then")]
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h0", "w_shared"], ["t1"], name="then_mm"),
         helper.make_node("Gemm", ["t1", "w_then"], ["t_out"], name="then_gemm", transB=1)],
        "then_body", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    els = helper.make_graph(
        [helper.make_node("MatMul", ["h0", "w_shared"], ["e1"], name="else_mm"),
         _const("w_else", (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)),
         helper.make_node("MatMul", ["e1", "w_else"], ["e_out"], name="else_mm2")],
        "else_body", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="P"),
        helper.make_node("MatMul", ["h0", "wq"], ["q"], name="Q"),
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("Greater", ["m", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=els),
        helper.make_node("Add", ["q", "branch"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "if_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])], inits)
    return _model(graph)


def if_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv stem → If: each branch a Conv with its own outer copy of the same weights."""
    rng = np.random.default_rng(seed)
    c = 16
    w = _init("wc_then", rng, (c, c, 3, 3))
    w2 = numpy_helper.from_array(numpy_helper.to_array(w).copy(), "wc_else")
    stem = _init("w_stem", rng, (c, 4, 3, 3))
    branches = []
    for tag, weight in (("then", "wc_then"), ("else", "wc_else")):
        branches.append(helper.make_graph(
            [helper.make_node("Conv", ["s", weight], [f"{tag}_out"], name=f"{tag}_conv", pads=[1, 1, 1, 1])],
            f"{tag}_body", [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, None)]))
    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["s0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s0"], ["s"]),
        helper.make_node("ReduceMean", ["s"], ["m"], keepdims=0),
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("Greater", ["m", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1]),
    ]
    graph = helper.make_graph(nodes, "if_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 8, 8])], [stem, w, w2])
    return _model(graph)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """Loop (3 trips) carrying h: body MatMul on the captured graph input x (outer weight
    ``w_x``) plus MatMul on the loop-carried h (outer weight ``w_h``)."""
    rng = np.random.default_rng(seed)
    inits = [_init("w_x", rng, (D, D)), _init("w_h", rng, (D, D)),
             numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "keep_going")]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_x"], ["bx"], name="body_mm_x"),
         helper.make_node("MatMul", ["h_in", "w_h"], ["bh"], name="body_mm_h"),
         helper.make_node("Add", ["bx", "bh"], ["bs"]),
         helper.make_node("Tanh", ["bs"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", D])])
    nodes = [helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body)]
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])], inits)
    return _model(graph)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """Scan over axis 1 of x[batch, 4, D]: an RNN cell s' = tanh(x_t W_x + s W_s)."""
    rng = np.random.default_rng(seed)
    inits = [_init("w_sx", rng, (D, D)), _init("w_ss", rng, (D, D))]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w_sx"], ["a"], name="cell_x"),
         helper.make_node("MatMul", ["s_in", "w_ss"], ["b"], name="cell_s"),
         helper.make_node("Add", ["a", "b"], ["c"]),
         helper.make_node("Tanh", ["c"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "scan_body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["batch", D]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["batch", D]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["batch", D])])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["s0"], axes=[1], keepdims=0),
        helper.make_node("Scan", ["s0", "x"], ["s_last", "ys"], body=body, num_scan_inputs=1,
                         scan_input_axes=[1], scan_output_axes=[1]),
    ]
    graph = helper.make_graph(nodes, "scan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, D])],
                              [helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["batch", 4, D])], inits)
    return _model(graph)


def protobuf_gemm_count(model: onnx.ModelProto) -> int:
    """MatMul/Gemm/Conv nodes whose input 1 is a constant, counted from the protobuf alone:
    every GraphProto attribute is walked recursively, and an initializer of any enclosing
    scope or a Constant of the same or an enclosing scope counts as constant."""

    def walk(graph: onnx.GraphProto, constants: set[str]) -> int:
        scope = constants | {t.name for t in graph.initializer}
        scope |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        count = 0
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in scope:
                count += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    count += walk(attr.g, scope)
                for sub in attr.graphs:
                    count += walk(sub, scope)
        return count

    return walk(model.graph, set())
