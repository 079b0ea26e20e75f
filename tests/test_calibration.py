"""The weight-fed ONNX Runtime runner and the one-pass statistics capture."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mpcompile.io.calibration import ModelRunner, run_model
from mpcompile.io.capture import capture_layer_stats, layer_rows
from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.passes.sparsify_24 import write_matrix
from mpcompile.zoo.bundled import bundled_info, bundled_model_path


def _inputs(name: str, samples: int = 12) -> dict[str, np.ndarray]:
    shape = bundled_info(name)["input_shape"]
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((samples, *shape[1:])).astype(np.float32)}


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit"])
def test_fed_weights_give_the_outputs_of_a_session_with_baked_weights(name: str) -> None:
    batch = _inputs(name)
    baked = ort.InferenceSession(str(bundled_model_path(name)), providers=["CPUExecutionProvider"])
    expected = baked.run(None, batch)[0]
    model = load_model(bundled_model_path(name)).model
    runner = ModelRunner(model)
    assert runner.run(batch)[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_runner_leaves_the_model_as_it_was_and_sees_rewritten_weights() -> None:
    model = load_model(bundled_model_path("digits_mlp")).model
    before = [(v.name, v.const_value.numpy().copy()) for v in model.graph.initializers.values()]
    inputs = [v.name for v in model.graph.inputs]
    runner = ModelRunner(model)
    after = [(v.name, v.const_value.numpy()) for v in model.graph.initializers.values()]
    assert [n for n, _ in after] == [n for n, _ in before]  # same initializers, same order
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(before, after))
    assert [v.name for v in model.graph.inputs] == inputs
    onnx.checker.check_model(onnx.load_from_string(
        __import__("onnx_ir").to_proto(model).SerializeToString()))

    batch = _inputs("digits_mlp")
    dense = runner.run(batch)[0]
    layer = discover_gemms(model)[0]
    write_matrix(layer, np.zeros((layer.out_features, layer.reduction), np.float32))
    zeroed = runner.run(batch)[0]  # the same session, the rewritten weight
    assert not np.allclose(dense, zeroed)
    assert zeroed == pytest.approx(ModelRunner(model).run(batch)[0], abs=1e-6)


def test_capture_in_one_pass_equals_the_gram_of_the_exposed_inputs() -> None:
    model = load_model(bundled_model_path("digits_vit")).model
    layers = [layer for layer in discover_gemms(model) if layer.eligible]
    from mpcompile.io.calibration import CalibrationData

    data = CalibrationData(inputs=_inputs("digits_vit", samples=10), source="test")
    # A tiny output budget forces one-sample batches after the probe; the statistics must not depend on it.
    outputs: list[np.ndarray] = []
    small = capture_layer_stats(model, layers, data, output_budget_bytes=1, graph_outputs=outputs)
    assert outputs[0] == pytest.approx(run_model(model, data)[0], rel=1e-5, abs=1e-5)  # the pass run_model saves
    large = capture_layer_stats(model, layers, data, batch_size=10)
    runner = ModelRunner(model, [layers[0].node.inputs[0]])
    x = runner.run(data.inputs, [layers[0].node.inputs[0].name])[0]
    rows = layer_rows(layers[0], x, np.random.default_rng(0), 10**9)
    expected = rows.T.astype(np.float64) @ rows / rows.shape[0]
    for stats in (small, large):
        got = stats[layers[0].name]
        assert got.rows == rows.shape[0]
        assert got.gram == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert set(small) == {layer.name for layer in layers}


def test_run_model_concatenates_batches() -> None:
    from mpcompile.io.calibration import CalibrationData

    model = load_model(bundled_model_path("digits_cnn")).model
    data = CalibrationData(inputs=_inputs("digits_cnn", samples=11), source="test")
    whole = run_model(model, data, batch_size=64)[0]
    assert run_model(model, data, batch_size=4)[0] == pytest.approx(whole, abs=1e-5)
    assert whole.shape[0] == 11


def test_mask_pass_reuses_a_held_result_only_for_the_weight_it_was_computed_from() -> None:
    from mpcompile.numerics.masks import apply_method
    from mpcompile.passes.sparsify_24 import Apply24SparsityPass

    def fresh():
        model = load_model(bundled_model_path("digits_mlp")).model
        return model, [layer for layer in discover_gemms(model) if layer.eligible][:2]

    model, (a, b) = fresh()
    wa, wb = a.matrix(), b.matrix()
    # A legal but different result for a (its magnitude mask, negated): must be used as held.
    held_a = apply_method("magnitude", wa, None)
    held_a.weight = -held_a.weight
    # A result held for a weight b no longer has (rows swapped since): must be recomputed.
    held_b = apply_method("magnitude", wb[::-1].copy(), None)
    precomputed = {a.name: held_a.packed(wa), b.name: held_b.packed(wb[::-1].copy())}
    Apply24SparsityPass([a, b], method="magnitude", precomputed=precomputed)(model)
    assert np.array_equal(a.matrix(), held_a.weight)
    assert np.array_equal(b.matrix(), apply_method("magnitude", wb, None).weight)
    assert precomputed == {}  # both taken off the list

    packed = held_a.packed(wa)
    back = packed.unpack()
    assert np.array_equal(back.mask, held_a.mask) and np.array_equal(back.weight, held_a.weight)
    assert packed.values.nbytes + packed.mask_bits.nbytes < 0.6 * held_a.weight.nbytes


def test_masked_weights_are_stored_contiguous_and_shared_with_the_mask_record() -> None:
    from mpcompile.passes.sparsify_24 import Apply24SparsityPass

    model = load_model(bundled_model_path("digits_vit")).model
    layers = [layer for layer in discover_gemms(model) if layer.eligible and layer.op_type != "Conv"]
    sparsify = Apply24SparsityPass(layers, method="magnitude")
    sparsify(model)
    for layer, mask in zip(layers, sparsify.results):
        stored = layer.weight.root.const_value.numpy()
        assert stored.flags.c_contiguous  # fed to ONNX Runtime as is, no per-run copy
        assert np.shares_memory(stored, mask.sparse)  # one copy of the weight
        assert np.array_equal(layer.matrix(), mask.sparse)
