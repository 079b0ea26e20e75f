"""Graph passes of mpcompile, importable as ``mpcompile.passes`` (one pass per module).

Every pass is an ``onnx_ir.passes.InPlacePass``: it returns ``PassResult(model, modified)``
and checks its preconditions in ``requires``. GEMM discovery is shared analysis, not a pass.
"""

from __future__ import annotations

from mpcompile.passes.fp16 import ConvertToFloat16Pass
from mpcompile.passes.gemm_discovery import GemmLayer, WeightSource, discover_gemms
from mpcompile.passes.im2col_lowering import LowerConvToIm2colPass
from mpcompile.passes.permute_channels import PermuteChannelsPass, apply_fold, insert_gather, plan_fold
from mpcompile.passes.sparsify_24 import Apply24SparsityPass
from mpcompile.passes.spectral_analysis import AnnotateSpectralPass
from mpcompile.passes.unstructured_prune import ApplyUnstructuredPruningPass

__all__ = [
    "AnnotateSpectralPass",
    "Apply24SparsityPass",
    "ApplyUnstructuredPruningPass",
    "ConvertToFloat16Pass",
    "GemmLayer",
    "LowerConvToIm2colPass",
    "PermuteChannelsPass",
    "WeightSource",
    "apply_fold",
    "discover_gemms",
    "insert_gather",
    "plan_fold",
]
