"""One model call through an official SDK: its stream through an adapter, its failures as
ProviderError. Both SDKs (anthropic, openai) share the shape this relies on: APIStatusError (an
error answer, or an error event inside the stream), APIConnectionError, APIError with a body."""

from __future__ import annotations

from types import ModuleType
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import httpx2

from baaaht.agent.assistant.model import ModelEvent, ProviderError, status_error


class Adapter(Protocol):
    started: bool

    def feed(self, item: dict) -> list[ModelEvent]: ...
    def end(self) -> list[ModelEvent]: ...


async def sdk_events(
    sdk: ModuleType, open_stream: Callable[[], Awaitable[Any]], adapter: Adapter, **dump: Any
) -> AsyncIterator[ModelEvent]:
    """Our events of the stream `open_stream()` returns; each SDK item given to `adapter` as
    `item.model_dump(mode="json", **dump)`."""
    name = sdk.__name__
    try:
        stream = await open_stream()
        async with stream:
            async for item in stream:
                for ours in adapter.feed(item.model_dump(mode="json", **dump)):
                    yield ours
    except sdk.APIStatusError as error:
        raise status_error(error.status_code, error.body, str(error)) from None
    except sdk.APIConnectionError as error:
        if adapter.started:  # the SDK's word for a stream that broke after it began
            raise ProviderError("cut", f"the {name} stream was cut: {error!r}") from None
        raise ProviderError(
            "connection", f"cannot reach the model through the egress proxy: {error}"
        ) from None
    except sdk.APIError as error:  # an error chunk inside an openai stream: its body is the error
        raise status_error(200, error.body, str(error)) from None
    except httpx2.TransportError as error:  # the connection went away mid-stream
        raise ProviderError("cut", f"the {name} stream was cut: {error!r}") from None
    for ours in adapter.end():
        yield ours
