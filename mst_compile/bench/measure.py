"""Peak memory of one training step, measured in a fresh process.

CPU: ``VmHWM - VmRSS`` around one step after writing ``5`` to ``/proc/self/clear_refs`` (resets the
high-water mark), with ``MALLOC_MMAP_THRESHOLD_=65536`` set for the process so freed blocks go back to the
OS. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """``with PeakMeter(device) as m: step()`` then ``m.peak_mib``: the step's own peak above its start."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base) / MIB
        else:
            self.peak_mib = (_status_kib("VmHWM") * 1024 - self._base) / MIB
        return False


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``proc`` (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_worker(args: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run ``python -m mst_compile.bench.worker ARGS`` in its own process (``env`` added to the environment);
    return its JSON result (an ``error`` entry when it fails or runs past ``timeout`` seconds). An interrupt
    (Ctrl-C) stops the worker before it propagates, whether or not the worker received the signal too."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "mst_compile.bench.worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, grace=0)
        stdout, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout:.0f} s"
    except BaseException:  # KeyboardInterrupt: no worker may outlive the benchmark
        _stop(proc)
        raise
    if proc.returncode == -signal.SIGINT:  # Ctrl-C in a terminal reaches the worker too, maybe first
        raise KeyboardInterrupt
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (stderr or stdout)[-2000:].strip(), "returncode": proc.returncode}
