"""The machine the runs use, for the Runs page: CPU use, memory and, where NVIDIA's management
library (`pynvml`, from the `ui-gpu` extra) is installed, each GPU's name, memory and use."""

from __future__ import annotations

from typing import Any

import psutil
from starlette.requests import Request
from starlette.routing import Route

from stylelora.ui.http import UI, api


def routes() -> list[Route]:
    psutil.cpu_percent()  # the first reading starts the interval the next ones measure
    return [Route("/api/machine", api(machine))]


async def machine(request: Request, ui: UI) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(),
        "cpus": psutil.cpu_count(),
        "ram_used": memory.total - memory.available,
        "ram_total": memory.total,
        "gpus": gpus(),
    }


def gpus() -> list[dict[str, Any]]:
    """Each NVIDIA GPU's name, memory used and total (bytes) and use (percent); none without
    pynvml or a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append({
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_used": memory.used,
                "memory_total": memory.total,
                "use_percent": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            })  # fmt: skip
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()
