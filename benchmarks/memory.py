"""Peak-memory probes that run in a fresh process: RSS sampling, and AlignNet logits at scale.

    python -m benchmarks.memory --child '{"dim": 512, "batch": 64, "classes": 1000, "chunk": 256, "grad": false}'

Kept apart from run.py so that a probe process imports only torch and glad_core.alignnet.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import child, parser
from glad_core.alignnet import AlignNet

MB = 2 ** 20


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Samples the RSS every millisecond in a thread; `peak` is the largest value seen."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def alignnet_peak(spec: dict) -> dict:
    """Peak RSS of AlignNet logits for `classes` classes, `chunk` at a time (no_grad, or fwd+bwd)."""
    torch.manual_seed(0)
    net = AlignNet(spec["dim"])
    nn.init.normal_(net.last.weight, std=0.01)
    f_i, f_t = torch.randn(spec["batch"], spec["dim"]), F.normalize(torch.randn(spec["classes"], spec["dim"]), dim=-1)
    with PeakRSS() as m:
        if spec["grad"]:
            net.logits(f_i, f_t, 10.0, chunk=spec["chunk"]).logsumexp(-1).sum().backward()
        else:
            with torch.no_grad():
                net.logits(f_i, f_t, 10.0, chunk=spec["chunk"])
    return {"start_mb": m.start / MB, "peak_mb": m.peak / MB}


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__, "threads", "child")
    args = cli.parse_args(argv)
    if not args.child:
        cli.error("give the probe as --child JSON (see above)")
    torch.set_num_threads(args.threads)
    return child(alignnet_peak, args.child)


if __name__ == "__main__":
    sys.exit(main())
