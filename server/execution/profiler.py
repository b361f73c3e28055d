"""``torch.profiler`` on every rank between a start and a stop (``POST /start_profile`` and ``/stop_profile``, or
``LLM.start_profile()`` / ``stop_profile()``).

Rank 0 broadcasts a :class:`~server.forward.plan.ProfileRequest` in the same stream as the step plans, so every
rank starts and stops between the same two steps. At the stop each rank writes, in the output directory:

- ``{tag}-rank{r}.trace.json.gz``: its Chrome trace (chrome://tracing, Perfetto), host ops and device kernels;
- ``{tag}-rank{r}.ops.txt``: its op table (``key_averages``), sorted by device time on CUDA, host time on CPU;

and returns a summary that rank 0 gathers: the two paths, its kernels' time (``device_ms``: the kernel and copy
events themselves, as the profiler's own table counts them; a collective waiting for a peer counts as busy) and
its ops' host time (``host_op_ms``). Comparing the ranks' summaries shows which rank a step waits for.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def device_ms(events) -> float:
    """Time of the device's own events (kernels, copies) in ``key_averages()`` (an op's self device time repeats
    its kernels'), in ms."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e3


class RankProfiler:
    """One rank's profiler. ``start`` and ``stop`` never raise: a rank's failure is in its summary (``error``)."""

    def __init__(self, rank: int, device: torch.device):
        self.rank = rank
        self.device = device
        self.prof = None
        self.request = None
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return self.request is not None

    def start(self, request) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.request, self.error = request, None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        try:
            os.makedirs(request.output_dir, exist_ok=True)
            self.prof = profile(activities=activities, record_shapes=request.record_shapes)
            self.prof.start()
        except Exception as e:  # reported at the stop, with the other ranks' summaries
            self.prof, self.error = None, f"the profiler did not start: {type(e).__name__}: {e}"
            log.warning("rank %d: %s", self.rank, self.error)

    def stop(self) -> dict:
        request, prof = self.request, self.prof
        self.request = self.prof = None
        out = {"rank": self.rank}
        if request is None:
            return {**out, "error": "no profile was running"}
        if prof is None:
            return {**out, "error": self.error}
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the steps' last kernels end inside the profile
            prof.stop()
            base = os.path.join(request.output_dir, f"{request.tag}-rank{self.rank}")
            prof.export_chrome_trace(base + ".trace.json.gz")
            events = prof.key_averages(group_by_input_shape=request.record_shapes)
            cuda = self.device.type == "cuda"
            table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=60)
            with open(base + ".ops.txt", "w") as f:
                f.write(f"rank {self.rank}, {request.tag}\n\n{table}\n")
            host = sum(e.self_cpu_time_total for e in events) / 1e3
            return {**out, "trace": base + ".trace.json.gz", "ops": base + ".ops.txt",
                    "device_ms": device_ms(events) if cuda else 0.0, "host_op_ms": host}
        except Exception as e:
            log.warning("rank %d: the profile could not be written: %s", self.rank, e)
            return {**out, "error": f"the profile could not be written: {type(e).__name__}: {e}"}
