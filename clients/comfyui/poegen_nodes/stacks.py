"""Local stacks started by PoE Stack nodes, kept running between prompts.

A stack (:class:`poegen.clients.stack.LocalStack`: every expert server and the Sampler as
separate processes) takes seconds to start, and ComfyUI runs a node again whenever a graph
changes, so a started stack outlives the node's execution: :class:`StackKeeper` holds it, per
source, until ComfyUI exits (``atexit``). If ComfyUI dies without stopping them, the children
stop themselves (they watch their parent, see ``POEGEN_PARENT_PID`` in
:mod:`poegen.clients.stack`).

Sources: a stack file (YAML, see :mod:`poegen.clients.stack`), or ``digits``: poegen's shipped
digit experts (:func:`poegen.clients.digits_demo.stack_mapping`: three flow priors over
16×16 digits ``all``, ``low`` (0–4), ``even``, a classifier ``reward`` (condition text: a
label such as ``three``), a masked-target constraint ``left-half`` (condition tensor
``target``), and the Sampler, here with one job slot).
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

from poegen.clients.stack import LocalStack

logger = logging.getLogger(__name__)

DIGITS = "digits"


class StackKeeper:
    """The stacks this process started, by source (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stacks: dict[tuple[str, float], LocalStack] = {}
        self._restarts: dict[tuple[str, float], int] = {}
        self._exit_hook = False

    def key(self, source: str) -> tuple[str, float]:
        """(source, the file's mtime): an edited stack file is a new stack."""
        if source.strip() == DIGITS:
            return DIGITS, 0.0
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"no such stack file: {path} (or give {DIGITS!r})")
        return str(path), path.stat().st_mtime

    def fingerprint(self, source: str) -> tuple[str, float, int, bool]:
        """Changes only when ``source``'s stack must start again (its file was edited, or a
        process of it died), so ComfyUI reuses the node's output while the stack runs."""
        key = self.key(source)
        with self._lock:
            stack = self._stacks.get(key)
            dead = stack is not None and not _alive(stack)
            return (*key, self._restarts.get(key, 0), dead)

    def start(self, source: str) -> LocalStack:
        """The stack of ``source``, started now unless it already runs (a dead one restarts)."""
        key = self.key(source)
        with self._lock:
            stack = self._stacks.get(key)
            if stack is not None and _alive(stack):
                return stack
            if stack is not None:
                logger.warning("the stack of %s has a dead process; restarting it", key[0])
                stack.stop()
                self._restarts[key] = self._restarts.get(key, 0) + 1
            if key[0] == DIGITS:
                from poegen.clients.digits_demo import stack_mapping

                # ComfyUI runs one prompt at a time, so the Sampler runs one job at a time:
                # a prompt queued right after an interrupt waits until the cancelled job has
                # stopped instead of running beside it
                mapping = stack_mapping(1) | {"sampler": {"max_jobs": 1}}
                stack = LocalStack.from_mapping(mapping)
            else:
                stack = LocalStack.from_yaml(key[0])
            if not self._exit_hook:
                atexit.register(self.stop_all)
                self._exit_hook = True
            stack.start()  # StackError names the process that failed
            self._stacks[key] = stack
            return stack

    def stop_all(self) -> None:
        with self._lock:
            stacks, self._stacks = list(self._stacks.values()), {}
        for stack in stacks:
            stack.stop()


def _alive(stack: LocalStack) -> bool:
    return bool(stack.processes) and all(p.proc.poll() is None for p in stack.processes)


# One keeper per ComfyUI process: the stacks belong to the server process, not to a prompt
# (filled only when a PoE Stack node starts one).
KEEPER = StackKeeper()
