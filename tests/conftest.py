"""Shared fixtures of the suite (pytest puts this folder on ``sys.path``, so test modules
import their helpers as ``from helpers.server import ...``).

* ``loop``: a :class:`helpers.remote.LoopThread`, an asyncio loop on its own thread that
  serves real expert and sampler hosts on 127.0.0.1 while the test's synchronous kernel calls
  them; closed (servers stopped) after the test.
* ``flow_models``: tiny diffusers model folders, built on first use, once per session
  (:class:`helpers.flow_models.FlowModels`).
* ``certs``: a self-signed server and a client certificate with their keys, once per session
  (:func:`helpers.certs.server_and_client`; the openssl CLI).

Time limits scale with ``POEGEN_TEST_TIME_SCALE`` (:mod:`helpers.timing`), pytest-timeout's
per-test limit included (:func:`pytest_configure`).

``POEGEN_JOB_STORE=memory`` (unless set): a ``poegen sampler`` on a fixed port that a test
starts keeps its jobs in memory instead of resuming another test's jobs from the user's state
folder; the tests of the job store name their folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from helpers.flow_models import FlowModels
    from helpers.remote import LoopThread

os.environ.setdefault("POEGEN_JOB_STORE", "memory")


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout's own pytest_configure reads it
def pytest_configure(config: pytest.Config) -> None:
    """Stretch pytest-timeout's per-test limit (``--timeout`` in pyproject's addopts, or
    given on the command line) by ``POEGEN_TEST_TIME_SCALE``, like every other limit."""
    from helpers.timing import scaled

    timeout = getattr(config.option, "timeout", None)
    if timeout:  # None or 0: no limit
        config.option.timeout = scaled(float(timeout))


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    from helpers.remote import LoopThread

    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="session")
def flow_models(tmp_path_factory: pytest.TempPathFactory) -> FlowModels:
    # imported here: diffusers loads only in sessions that build a flow model
    from helpers.flow_models import FlowModels

    return FlowModels(tmp_path_factory.mktemp("flow-models"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers.certs import server_and_client

    return server_and_client(tmp_path_factory.mktemp("certs"))
