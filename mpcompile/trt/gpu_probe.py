"""Is there a GPU that can run the measured 2:4 audit? Plain ctypes on the CUDA driver.

Why its own module: the probe must answer (and never raise) on any machine, before anything
imports TensorRT, Polygraphy or torch, so ``mpcompile build`` can say in one line why it falls
back to the modeled report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from mpcompile.errors import BackendUnavailableError

__all__ = ["cuda_devices", "gpu_available"]


def _libcuda() -> ctypes.CDLL | None:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_devices() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of every visible GPU, via the driver API; [] when none."""
    lib = _libcuda()
    if lib is None:
        return []
    if lib.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        buffer = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(buffer, 256, device)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
        devices.append((buffer.value.decode(errors="replace"), (major.value, minor.value)))
    return devices


def gpu_available(require_tensorrt: bool = True) -> tuple[bool, str]:
    """Can the measured TensorRT sparse audit run here? ``(ok, reason)``; never raises.

    Checks, in order: TensorRT importable (when required), an NVIDIA driver and GPU visible,
    and sparse tensor cores (sm80+) on GPU 0.
    """
    try:
        version = None
        if require_tensorrt:
            try:
                from mpcompile.trt.builder import import_tensorrt

                version = import_tensorrt().__version__
            except BackendUnavailableError as exc:
                return False, str(exc)
        devices = cuda_devices()
        if not devices:
            return False, "no NVIDIA GPU visible (no CUDA driver, or CUDA_VISIBLE_DEVICES hides it)"
        name, (major, minor) = devices[0]
        where = f"{name} (sm{major}{minor})"
        if (major, minor) < (8, 0):
            return False, f"{where} has no sparse tensor cores: 2:4 needs Ampere (sm80) or newer"
        return True, where + (f", TensorRT {version}" if version else "")
    except Exception as exc:  # noqa: BLE001 - documented never to raise
        return False, f"GPU probe failed: {type(exc).__name__}: {exc}"
