"""A test-only shim that makes aioresponses 0.7.9 work on aiohttp >= 3.14.

aioresponses builds its mocked ``ClientResponse`` objects without the
keyword-only ``stream_writer`` argument that aiohttp 3.14 made required, so
every mocked request raises ``TypeError: ClientResponse.__init__() missing 1
required keyword-only argument: 'stream_writer'``.

Upstream: https://github.com/pnuckowski/aioresponses/issues/289 (fix proposed
in #288, not released). Drop this module, and use ``aioresponses`` directly,
once a release with the fix is out.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import aiohttp
from aioresponses import aioresponses

__all__ = ["ShimClientResponse", "shimmed_aioresponses"]


class ShimClientResponse(aiohttp.ClientResponse):
    """A ``ClientResponse`` that supplies a dummy ``stream_writer`` when none is given."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        if kwargs.get("stream_writer") is None:
            kwargs["stream_writer"] = Mock(output_size=0)
        super().__init__(method, url, **kwargs)


class shimmed_aioresponses(aioresponses):
    """``aioresponses`` whose mocked routes answer with :class:`ShimClientResponse`."""

    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        if kwargs.get("response_class") is None:
            kwargs["response_class"] = ShimClientResponse
        super().add(url, method, *args, **kwargs)
