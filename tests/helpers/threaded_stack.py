"""A stack file's servers in this process: the fast form of a :class:`LocalStack`.

:class:`ThreadedStack` takes the same stack mapping as ``LocalStack.from_mapping``, validates it
with the same :class:`~poegen.clients.stack.StackConfig`, plans each expert with the same
``poegen serve`` planning (:func:`poegen.expert_servers.server.cli.plan`: backend adapter,
``--model`` location and allowlist, analytic ``--config``), loads ``--model`` through the
host's LoadModel path as ``serve_model`` does, and builds the Sampler from its ``sampler:``
section; every host listens on real gRPC (127.0.0.1, port 0) on a :class:`LoopThread`.
What it skips is only the process start (a fresh interpreter importing torch per server),
which ``tests/clients/test_stack.py`` and the slow tests cover.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from helpers.remote import LoopThread
from helpers.timing import scaled

from poegen.clients.stack import StackConfig, StackEndpoints
from poegen.expert_servers.server.cli import ServeRequest, plan
from poegen.kernel.service import SamplerServerConfig


class ThreadedStack:
    """``with ThreadedStack(mapping) as stack: stack.endpoints ...`` (hosts stopped on exit)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.config = StackConfig.model_validate(dict(data))
        self._loop: LoopThread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._endpoints: StackEndpoints | None = None

    @property
    def endpoints(self) -> StackEndpoints:
        if self._endpoints is None:
            raise RuntimeError("the stack is not started")
        return self._endpoints

    def __enter__(self) -> ThreadedStack:
        self._loop = LoopThread()
        self._tmp = tempfile.TemporaryDirectory(prefix="poegen-threaded-stack-")
        try:
            experts = {e.name: self._serve(e) for e in self.config.experts}
            sampler = None
            if self.config.sampler is not None:
                sampler = self._sampler(self.config.sampler)
        except BaseException:
            self.__exit__()
            raise
        self._endpoints = StackEndpoints(sampler, experts)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._endpoints = None

    def _serve(self, spec: Any) -> str:
        assert self._loop is not None and self._tmp is not None
        config = spec.config
        if spec.backend == "analytic" and spec.expert is not None:
            config = Path(self._tmp.name) / f"{spec.name}.yaml"
            config.write_text(yaml.safe_dump({"expert": spec.expert, "params": spec.params}))
        served = plan(
            ServeRequest(
                spec.backend,
                config,
                spec.model,
                tuple(f"{k}={v}" for k, v in spec.options.items()),
                host="127.0.0.1",
                port=0,
                model_root=spec.model_root,
            )
        )

        running = self._loop.serve(served.expert, served.config, adapter=served.adapter)
        if served.model_id is not None:

            async def load() -> None:
                async for _ in running.host.models.load(served.model_id, served.options or {}):
                    pass

            self._loop.run(load(), timeout=scaled(120))
        return running.address

    def _sampler(self, settings: Mapping[str, Any]) -> str:
        assert self._loop is not None
        config = SamplerServerConfig.model_validate({**settings, "host": "127.0.0.1", "port": 0})
        return self._loop.sampler(config).address
