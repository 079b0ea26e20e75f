"""Paths and data of the bundled digits models; no torch needed.

Why bundled: ``mpcompile demo`` and the accuracy tests must work on a fresh machine with no
download. The models and the exact train/calibration/test split they were trained on are
produced by ``scripts/make_bundled_models.py`` and shipped as package data, located through
``importlib.resources`` so an installed package finds them too.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mpcompile.errors import MpcompileError, UsageError

__all__ = [
    "BUNDLED_MODELS",
    "SPLITS",
    "check_bundled_name",
    "bundled_model_path",
    "bundled_weights_path",
    "bundled_info",
    "data_path",
    "load_digits_split",
    "write_split_npz",
    "evaluate_onnx_accuracy",
]

logger = logging.getLogger(__name__)

BUNDLED_MODELS = ("digits_cnn", "digits_vit", "digits_mlp")
SPLITS = ("train", "calib", "test")


def _data_file(name: str) -> Path:
    # Package data of a regular (non-zip) install is a real file; ONNX Runtime needs a path anyway.
    path = Path(str(resources.files("mpcompile").joinpath("data", name)))
    if not path.is_file():
        raise MpcompileError(f"bundled data file {path} is missing: reinstall mpcompile")
    return path


def check_bundled_name(name: str) -> None:
    """Raise a one-line error naming the valid models when ``name`` is not one of them."""
    if name not in BUNDLED_MODELS:
        raise UsageError(f"unknown bundled model {name!r}; choose one of: {', '.join(BUNDLED_MODELS)}")


def bundled_model_path(name: str) -> Path:
    """The ONNX file of a bundled model (``digits_cnn``, ``digits_vit`` or ``digits_mlp``)."""
    check_bundled_name(name)
    return _data_file(f"{name}.onnx")


def bundled_weights_path(name: str) -> Path:
    """The torch ``state_dict`` file the ONNX was exported from (for ``mpcompile.zoo.digits``)."""
    check_bundled_name(name)
    return _data_file(f"{name}.pt")


def bundled_info(name: str) -> dict[str, Any]:
    """The ``models.json`` record of one model: input name/shape, parameters, test accuracy, provenance."""
    check_bundled_name(name)
    return json.loads(_data_file("models.json").read_text())["models"][name]


def data_path() -> Path:
    """The .npz holding ``x_<split>`` (``[N,1,8,8]`` float32) and ``y_<split>`` (int64) arrays."""
    return _data_file("digits_data.npz")


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N,1,8,8]`` float32 in [0, 1] and int64 labels of one split (train/calib/test)."""
    if split not in SPLITS:
        raise UsageError(f"unknown digits split {split!r}; choose one of: {', '.join(SPLITS)}")
    with np.load(data_path()) as data:
        return data[f"x_{split}"], data[f"y_{split}"]


def _shaped_for(x: np.ndarray, rank: int) -> np.ndarray:
    """Images as the model wants them: ``[N,1,8,8]`` for conv/ViT inputs, ``[N,64]`` for the MLP."""
    if rank == x.ndim:
        return x
    if rank == 2:
        return x.reshape(len(x), -1)
    raise UsageError(f"model input has rank {rank}; digits images fit rank 4 ([N,1,8,8]) or 2 ([N,64])")


def write_split_npz(
    split: str, path: str | Path, input_name: str = "input", model: str | None = None
) -> Path:
    """A calibration/evaluation file in the format ``--calib``/``--eval`` expect.

    ``model`` (a bundled name) shapes the images for that model's input, e.g. ``[N,64]`` for
    ``digits_mlp``; without it images stay ``[N,1,8,8]``.
    """
    x, y = load_digits_split(split)
    if model is not None:
        x = _shaped_for(x, len(bundled_info(model)["input_shape"]))
    np.savez(path, **{input_name: x, "labels": y})
    return Path(path)


def evaluate_onnx_accuracy(model_path: str | Path, split: str = "test") -> float:
    """Top-1 accuracy of an ONNX digits classifier on one split, with ONNX Runtime on CPU.

    The images are reshaped to the rank of the model's first input so the same call serves
    the image models and the MLP (and any rewritten copy of them).
    """
    import onnxruntime as ort

    x, y = load_digits_split(split)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    logits = session.run(None, {model_input.name: _shaped_for(x, len(model_input.shape))})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    logger.debug("%s on %s split: accuracy %.4f over %d samples", model_path, split, accuracy, len(y))
    return accuracy
