"""Shared fixtures of the suite (pytest puts this folder on ``sys.path``, so test modules
import their helpers as ``from helpers.server import ...``).

* ``loop``: a :class:`helpers.remote.LoopThread`, an asyncio loop on its own thread that
  serves real expert and sampler hosts on 127.0.0.1 while the test's synchronous kernel calls
  them; closed (servers stopped) after the test.
* ``flow_models``: tiny diffusers model folders, built on first use, once per session
  (:class:`helpers.flow_models.FlowModels`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from helpers.flow_models import FlowModels
    from helpers.remote import LoopThread


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
