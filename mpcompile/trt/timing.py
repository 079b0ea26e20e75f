"""Time a built TensorRT engine with Polygraphy's ``TrtRunner``.

Why the runner: it loads the engine, sets input shapes against the engine's profile and
manages output memory on every TensorRT version Polygraphy supports, with its own CUDA wrapper
(no torch or cuda-python needed). Inputs are copied to the GPU once, before timing, and outputs
stay there, so each sample is one ``infer()`` — ``execute_async_v3`` plus the stream
synchronisation — timed on the host, as ``polygraphy run --trt`` reports it. For a very small
engine that includes a few microseconds of host overhead; it is the same for the dense and the
sparse engine, so it narrows their ratio, never widens it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mpcompile.errors import MpcompileError, UsageError
from mpcompile.trt.stats import LatencyStats, latency_stats

__all__ = ["time_engine"]


def time_engine(
    engine_path: str | Path,
    inputs: Mapping[str, np.ndarray],
    warmup: int = 20,
    iters: int = 200,
) -> LatencyStats:
    """Median / p10 / p90 latency of one inference of the engine at ``engine_path``.

    UsageError for missing inputs or shapes outside the engine's profile, MpcompileError when
    TensorRT cannot load or run the engine.
    """
    if warmup < 0 or iters < 1:
        raise UsageError("time_engine needs warmup >= 0 and iters >= 1")
    from mpcompile.trt.builder import capture_polygraphy_log, import_polygraphy_trt, import_tensorrt

    import_tensorrt()
    poly = import_polygraphy_trt()
    from polygraphy import cuda
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.exception import PolygraphyException

    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise UsageError(f"engine {engine_path} does not exist")
    buffers: list = []
    with capture_polygraphy_log() as lines:
        try:
            with poly.TrtRunner(poly.EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
                meta = runner.get_input_metadata(use_numpy_dtypes=False)
                missing = [name for name in meta if name not in inputs]
                if missing:
                    raise UsageError(f"engine inputs {missing} were not given (have {sorted(inputs)})")
                feed = {}
                for name, info in meta.items():
                    array = np.ascontiguousarray(np.asarray(inputs[name]).astype(info.dtype.numpy(), copy=False))
                    buffers.append(cuda.DeviceArray(shape=array.shape, dtype=info.dtype).copy_from(array))
                    feed[name] = buffers[-1]
                for _ in range(warmup):
                    runner.infer(feed, copy_outputs_to_host=False)
                samples = []
                for _ in range(iters):
                    runner.infer(feed, copy_outputs_to_host=False)
                    samples.append(runner.last_inference_time() * 1e3)
        except PolygraphyException as exc:
            detail = " ".join(str(exc).split())
            if "set shape" in detail or "incompatible shape" in detail:  # TrtRunner / check_inputs
                raise UsageError(f"{engine_path.name}: {detail} (outside the engine's profile?)") from None
            errors = [" ".join(line.split()) for line in lines if line.lstrip().startswith("[E]")][-2:]
            raise MpcompileError(f"TensorRT could not run {engine_path.name}: "
                                 + "; ".join([detail, *errors])) from None
        finally:
            for buffer in buffers:
                buffer.free()
    return latency_stats(samples)
