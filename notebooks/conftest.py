"""pytest's notebook runs (nbmake): the client waits for each cell's reply in one-second slices.

nbclient waits for a cell's execute reply with a single poll of the kernel's shell socket, as long
as the cell's time limit. Now and then that poll misses its wake-up (pyzmq's asyncio sockets are
woken by zmq's edge-triggered descriptor) and a reply that has arrived is read only when the limit
fires: in CI a notebook of short cells took 164 s under a 150-s limit. A new poll looks at the
socket before it waits, so waiting in slices of a second bounds what a missed wake-up costs.
"""

import time
from queue import Empty

from jupyter_client.channels import AsyncZMQSocketChannel

SLICE = 1.0  # seconds
_get_msg = AsyncZMQSocketChannel.get_msg


async def _get_msg_in_slices(self, timeout: float | None = None) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await _get_msg(self, SLICE if left is None else min(SLICE, left))
        except Empty:
            if left is not None and left <= SLICE:
                raise


AsyncZMQSocketChannel.get_msg = _get_msg_in_slices
