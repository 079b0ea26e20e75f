"""Fan the per-weight MP fits out over a Ray cluster (``--workers ray``, ``--ray-address``).

Why: the fit of one weight needs only that weight's matrix, so a model's fits are
independent tasks; on a cluster a 7B decoder's 224 fits run side by side instead of two at a
time. The driver still reads each weight (lazily, see :mod:`mpcompile.lazy_weights`) and
ships its matrix to the object store, a bounded number in flight, so its memory stays that
of a few layers; each task runs :func:`mpcompile.passes.spectral_analysis.fit_weight`, the
same function as a local run, single-threaded, so the numbers are the same bits.

Ray is optional (``pip install 'mpcompile[ray]'``); the local threads stay the default.
Every node of a cluster needs mpcompile installed (the same version as the driver).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from mpcompile.errors import OptionalDependencyError, UsageError

__all__ = ["ray_fit_all", "IN_FLIGHT_PER_CPU"]

logger = logging.getLogger(__name__)

IN_FLIGHT_PER_CPU = 2
"""Matrices queued per cluster CPU: enough to keep every CPU busy, few enough that the
driver's object store holds a few layers, not the model."""


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise OptionalDependencyError("ray", "ray", "--workers ray") from exc
    return ray


def _fit_task(matrix: np.ndarray, options: dict[str, Any]):
    from threadpoolctl import threadpool_limits

    from mpcompile.passes.spectral_analysis import fit_weight

    with threadpool_limits(limits=1):
        try:
            return fit_weight(matrix, **options)
        except (ValueError, np.linalg.LinAlgError) as exc:
            return f"MP fit failed ({exc})"


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` (or start a local Ray) unless already connected; True if we started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--ray-address {address or '(local)'}: cannot connect to Ray ({first})") from exc
    return True


def ray_fit_all(layers: list, matrix_of: Callable, options: dict[str, Any], address: str | None = None,
                progress: Callable[[str], None] | None = None) -> list:
    """The fits of ``layers`` (in order) computed by Ray tasks; None where a layer has no fit.

    ``matrix_of(layer)`` reads a layer's matrix (None: nothing to fit). A Ray already
    initialised by the caller (a test's ``ray.init(num_cpus=2)``) is used as it is and left
    running; one started here is shut down at the end.
    """
    ray = _ray()
    started = _connect(ray, address)
    try:
        task = ray.remote(num_cpus=1)(_fit_task)
        limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
        results: list = [None] * len(layers)
        pending: dict[Any, int] = {}

        def collect(ready) -> None:
            for ref in ready:
                index = pending.pop(ref)
                value = ray.get(ref)
                if isinstance(value, str):
                    logger.warning("%s: %s", layers[index].name, value)
                    value = None
                results[index] = value
                if progress is not None:
                    progress(layers[index].name)

        for index, layer in enumerate(layers):
            matrix = matrix_of(layer)
            if matrix is None:
                if progress is not None:
                    progress(layer.name)
                continue
            pending[task.remote(matrix, options)] = index
            del matrix
            while len(pending) >= limit:
                ready, _ = ray.wait(list(pending), num_returns=1)
                collect(ready)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            collect(ready)
        return results
    finally:
        if started:
            ray.shutdown()
