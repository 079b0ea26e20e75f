"""TensorRT build & audit (DESIGN §1 stage 5), plus what can stand in for it without a GPU.

Why a subpackage of small modules: only ``builder`` (and ``torch_audit``) need a GPU stack, and
they import ``tensorrt`` / ``torch`` lazily inside functions. Parsing the builder log
(``log_parse``), parsing the engine inspector's JSON and mapping TensorRT layers back to ONNX
nodes (``inspector``) and the roofline/Amdahl model (``model``) are plain Python that run and are
tested on any machine. Importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["builder", "inspector", "log_parse", "model", "stats", "torch_audit"]
