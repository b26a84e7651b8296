"""A guard for api/http_protocol.py, which subclasses uvicorn's private httptools protocol.

The subclass overrides parser callbacks and reads uvicorn's own state (`cycle`, `pipeline`,
`connections`...). None of that is public API: an upgrade of uvicorn that renames one would not
fail loudly, it would quietly drop a limit (a callback no longer called) or raise on a live
connection. This test names everything the subclass relies on, so an upgrade fails here first.
"""

from __future__ import annotations

import asyncio
import inspect

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from multiserve.api.http_protocol import ConnectionLimits, limited_protocol

# Methods the subclass overrides and calls through `super()`: each must be uvicorn's own
OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
)
# uvicorn's instance state the subclass reads
STATE = ("connections", "loop", "cycle", "pipeline", "transport", "client")
CYCLE_STATE = ("response_complete", "more_body")  # of the request being answered


def test_uvicorn_still_has_every_hook_and_attribute_the_limits_use() -> None:
    for name in OVERRIDDEN:
        assert name in vars(HttpToolsProtocol), f"uvicorn {uvicorn.__version__}: no {name}"
        assert callable(vars(HttpToolsProtocol)[name])

    config = uvicorn.Config(app=lambda scope, receive, send: None, http="httptools")
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = HttpToolsProtocol(config, ServerState(), app_state={}, _loop=loop)
        for name in STATE:
            assert hasattr(protocol, name), f"uvicorn {uvicorn.__version__}: no .{name}"
        assert hasattr(protocol.pipeline, "clear")
    finally:
        loop.close()
    cycle_init = inspect.getsource(RequestResponseCycle.__init__)
    for name in CYCLE_STATE:
        assert f"self.{name} =" in cycle_init, f"uvicorn {uvicorn.__version__}: no cycle.{name}"


def test_the_limited_protocol_overrides_exactly_those_hooks() -> None:
    """A new override must be added to the list above, so the guard keeps covering it."""
    limited = limited_protocol(ConnectionLimits(8192, 10.0, 100))
    overridden = {
        name
        for name, value in vars(limited).items()
        if callable(value) and not name.startswith("_") and name in vars(HttpToolsProtocol)
    }
    assert overridden == set(OVERRIDDEN)
