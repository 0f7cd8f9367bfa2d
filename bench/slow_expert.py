"""An expert with a fixed latency per sample, served alone: the replica of ``bench/scale.py``.

``python -m poegen.bench.slow_expert --per-sample-s 0.01 --max-batch 4 --port 0`` serves
:class:`SlowGaussian` through :func:`poegen.expert_servers.server.serve` (the entry point of
``poegen serve``) on 127.0.0.1 and prints ``poegen: serving slow on 127.0.0.1:PORT``.

The latency is a fault injected on purpose, a stand-in for GPU time: every velocity call of a
batch of B sleeps ``per_call_s + B·per_sample_s`` and then answers the exact velocity of the
standard normal N(0, I) on the rectified-flow path,

    v(x_σ, σ) = (2σ − 1) / ((1−σ)² + σ²) · x_σ,

so a replica costs no CPU while it "computes" and many of them fit on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from torch import Tensor

from poegen.expert_servers.server import ServerConfig, serve
from poegen.kernel.experts import ExpertInfo, ExpertKind


class SlowGaussian:
    """N(0, I) of ``dim`` dimensions, ``per_call_s + B·per_sample_s`` seconds per call."""

    def __init__(
        self, per_sample_s: float, *, per_call_s: float = 0.0, max_batch: int = 4, dim: int = 2
    ) -> None:
        if per_sample_s < 0 or per_call_s < 0:
            raise ValueError("per_sample_s: latencies must be >= 0")
        self.per_sample_s = per_sample_s
        self.per_call_s = per_call_s
        self.max_batch = max_batch
        self.dim = dim

    def describe(self) -> ExpertInfo:
        return ExpertInfo(
            name="slow",
            kind=ExpertKind.GENERATIVE,
            sample_shape=(self.dim,),
            max_batch=self.max_batch,
            model_id="bench-slow-gaussian",
        )

    def velocity(self, x: Tensor, sigma: Tensor) -> Tensor:
        time.sleep(self.per_call_s + self.per_sample_s * x.shape[0])
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (2 * s - 1) / ((1 - s) ** 2 + s**2) * x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve an expert with a fixed latency")
    parser.add_argument("--per-sample-s", type=float, required=True)
    parser.add_argument("--per-call-s", type=float, default=0.0)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=None)
    args = parser.parse_args(argv)
    expert = SlowGaussian(args.per_sample_s, per_call_s=args.per_call_s, max_batch=args.max_batch)
    config = ServerConfig(port=args.port, metrics_port=args.metrics_port, grace_s=0.0)
    return asyncio.run(
        serve(config, expert=expert, name="slow", announce=lambda s: print(s, flush=True))
    )


if __name__ == "__main__":
    sys.exit(main())
