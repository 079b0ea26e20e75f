"""TensorRT build & audit (DESIGN §1 stage 5), plus what can stand in for it without a GPU.

Why a subpackage of small modules: only ``builder``, ``timing`` (through Polygraphy's TensorRT
backend) and ``torch_audit`` need a GPU stack, and they import ``tensorrt`` / ``polygraphy`` /
``torch`` lazily inside functions. The Polygraphy loaders for a build (``build_plan``), the GPU
probe (``gpu_probe``), parsing the builder log (``log_parse``) and the engine inspector's JSON
(``inspector``), mapping TensorRT layers back to ONNX nodes (``layer_map``), the per-node
verdict table (``sparsity``) and the roofline/Amdahl model (``model``) run and are tested on any
machine. Importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["build_plan", "builder", "gpu_probe", "inspector", "layer_map", "log_parse", "model",
           "sparsity", "stats", "timing", "torch_audit"]
