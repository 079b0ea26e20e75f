"""Train the bundled digits models and export them to ONNX (run once; the outputs are committed).

    python scripts/make_bundled_models.py

Why a script and not a download: the demo and the accuracy tests need small *real* trained
models with a held-out split, on machines with no network. This rebuilds all of them from
scikit-learn's digits in well under two minutes on two CPU cores.

Deterministic: fixed seeds, a fixed stratified 60/20/20 split, single-threaded torch with
deterministic algorithms, zip members written with a fixed timestamp. Writes into
mpcompile/data/: {digits_cnn,digits_vit,digits_mlp}.onnx (legacy TorchScript exporter,
opset 17, input ``input`` with dynamic batch ``N``, output ``logits``), their ``.pt``
state dicts, ``digits_data.npz`` (the split) and ``models.json`` (accuracies measured on the
exported ONNX files with ONNX Runtime).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mpcompile.zoo.digits import MODEL_CLASSES  # noqa: E402

logger = logging.getLogger("make_bundled_models")

OUT = ROOT / "mpcompile" / "data"
SEED = 0
OPSET = 17
COMMAND = "python scripts/make_bundled_models.py"
# (epochs, learning rate) per model: enough to clear the accuracy floors with margin.
RECIPES = {"digits_cnn": (40, 3e-3), "digits_vit": (80, 2e-3), "digits_mlp": (60, 3e-3)}
BATCH = 64
# The MLP reads flattened pixels; the others read images.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits_cnn": (1, 8, 8), "digits_vit": (1, 8, 8), "digits_mlp": (64,),
}


def split_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 60 % train / 20 % calibration / 20 % test, images ``[N,1,8,8]`` scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=SEED)
    x_calib, x_test, y_calib, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SEED
    )
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "test": (x_test, y_test)}


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with a fixed zip timestamp, so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def shaped(name: str, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), *INPUT_SHAPES[name])


def train(name: str, x_train: np.ndarray, y_train: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = MODEL_CLASSES[name]()
    epochs, lr = RECIPES[name]
    x, y = torch.from_numpy(shaped(name, x_train)), torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(BATCH):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def export(name: str, model: torch.nn.Module, path: Path) -> None:
    """Legacy TorchScript exporter: deterministic, Gemm/MatMul with initializer weights.

    In eval mode it folds each BatchNorm into the preceding Conv (its default); the ONNX
    files therefore hold no BatchNormalization node.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *INPUT_SHAPES[name]),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default mpcompile/data)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    data = split_data()
    save_npz_deterministic(
        out / "digits_data.npz",
        {f"{k}_{split}": a for split, (x, y) in data.items() for k, a in (("x", x), ("y", y))},
    )
    info: dict = {"models": {}, "split": {s: len(y) for s, (_, y) in data.items()}, "seed": SEED,
                  "torch": torch.__version__, "command": COMMAND}
    x_test, y_test = data["test"]
    for name in MODEL_CLASSES:
        start = time.perf_counter()
        model = train(name, *data["train"])
        path = out / f"{name}.onnx"
        export(name, model, path)
        torch.save(model.state_dict(), out / f"{name}.pt")

        x = shaped(name, x_test)
        logits = onnx_logits(path, x)
        with torch.no_grad():
            drift = float(np.abs(model(torch.from_numpy(x)).numpy() - logits).max())
        accuracy = float(np.mean(logits.argmax(axis=1) == y_test))
        params = sum(p.numel() for p in model.parameters())
        epochs, lr = RECIPES[name]
        info["models"][name] = {
            "file": path.name,
            "weights": f"{name}.pt",
            "class": f"mpcompile.zoo.digits.{type(model).__name__}",
            "input": "input",
            "input_shape": ["N", *INPUT_SHAPES[name]],
            "output": "logits",
            "parameters": params,
            "test_accuracy": accuracy,
            "opset": OPSET,
            "exporter": "torch.onnx.export(dynamo=False), BatchNorm folded into Conv",
            "training": {
                "optimizer": "Adam", "lr": lr, "schedule": "cosine", "epochs": epochs, "batch": BATCH,
            },
            "torch": torch.__version__,
            "seed": SEED,
            "command": COMMAND,
        }
        logger.info("%s: %d parameters, test accuracy %.4f (ONNX Runtime), |torch-onnx| %.1e, %.1f s",
                    name, params, accuracy, drift, time.perf_counter() - start)
    (out / "models.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
