"""Process setup that must happen before JAX is imported."""

from __future__ import annotations

import os
import sys


def use_all_cpu_cores() -> None:
    """Expose one XLA CPU device per core, unless the user chose a device count.

    XLA runs each CPU device's ops on its own thread; sharding the batch over one device per core was measured
    faster here than one device using both cores (25.9 vs 41 ms/iter for shakespeare_char_cpu).
    Has no effect on GPUs/TPUs, and none once JAX is imported.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}".strip()
