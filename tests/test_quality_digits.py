"""One-shot 2:4 accuracy on the bundled digits models, with their held-out test split.

Numbers (test accuracy, 360 images) at the time of writing, all eligible layers 2:4 with
permutation search: CNN 98.06 % dense → magnitude 81.1 %, CAST 89.4 %, cast-obs 98.3 %;
ViT 95.8 % dense → magnitude 90.3 %, cast-obs 95.6 %.
"""

from __future__ import annotations

import pytest

from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.zoo.bundled import bundled_model_path, write_split_npz

MAX_DROP_DEFAULT = 0.02  # the stated bound for the default calibrated method


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return {
        name: (write_split_npz("calib", folder / f"{name}_calib.npz", model=name),
               write_split_npz("test", folder / f"{name}_test.npz", model=name))
        for name in ("digits_cnn", "digits_vit")
    }


def _accuracy(name, method, data, tmp_path, **kw):
    calib, test = data[name]
    result = compile_model(
        bundled_model_path(name),
        CompileOptions(method=method, calib=str(calib), eval_data=str(test), output=str(tmp_path / f"{name}.{method}.onnx"), **kw),
    )
    assert result.check_ok
    v = result.validation
    return v.dense_accuracy, v.sparse_accuracy


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit"])
def test_default_calibrated_method_beats_magnitude_and_stays_within_stated_drop(name, data, tmp_path):
    dense, magnitude = _accuracy(name, "magnitude", data, tmp_path)
    _, default = _accuracy(name, None, data, tmp_path)  # cast-obs with calibration data
    assert dense - default < dense - magnitude
    assert dense - default <= MAX_DROP_DEFAULT


def test_cast_with_permutation_loses_less_than_magnitude_on_the_cnn(data, tmp_path):
    dense, magnitude = _accuracy("digits_cnn", "magnitude", data, tmp_path)
    # Under the dense protocol only: plain CAST (a pattern choice, no weight update) fitted
    # sequentially on this CNN drops to 59 % (the OBS-updating methods do not; quality.md).
    _, cast = _accuracy("digits_cnn", "cast", data, tmp_path, calibration="dense")
    assert dense - cast < dense - magnitude
