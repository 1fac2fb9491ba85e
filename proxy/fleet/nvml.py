"""NVIDIA GPU health through NVML (the nvidia-ml-py package, imported only if present; the
`nvml` extra installs it). Jetson has no NVML: see tegrastats.py."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger("proxy.fleet.nvml")


class Nvml:
    """The GPUs NVML sees; `Nvml.open()` is None without the package, a driver or a GPU."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml)
        except Exception as exc:  # no package, no driver, no GPU: nothing to report
            log.debug("NVML unavailable", extra={"error": str(exc)})
            return None

    def sample(self) -> list[dict[str, Any]]:
        nv = self._nvml
        gpus = []
        for index, handle in enumerate(self._handles):
            gpu: dict[str, Any] = {"index": index}
            for field, read in (
                ("name", lambda h: nv.nvmlDeviceGetName(h)),
                ("util_percent", lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("mem_used", lambda h: nv.nvmlDeviceGetMemoryInfo(h).used),
                ("mem_total", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total),
                ("temp_c", lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("power_w", lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    value = read(handle)
                    gpu[field] = value.decode() if isinstance(value, bytes) else value
                except Exception:  # a reading this GPU does not support
                    continue
            gpus.append(gpu)
        return gpus

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()
