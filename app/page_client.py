"""Events sent to a served app as its web page sends them: ``clipfp8 bench``'s ``serve`` step
times its queries this way.

Gradio's page speaks its queue protocol (``sse_v3``) directly: it POSTs the event to
``{api_prefix}/queue/join``, reads the session's event stream ``{api_prefix}/queue/data`` until
``process_completed`` arrives, then fetches the gallery's thumbnails. ``gradio_client`` does the
same over HTTP, but hands the messages to the caller through a queue it polls every 50 ms
(``gradio_client.utils.get_pred_from_sse_v1plus``, ``time.sleep(0.05)``), so each of its calls
took up to 50 ms longer than the server needed: on the lent H200 a steady served query measured
72-73 ms through it. ``BrowserSession`` reads the stream as the page does, with no polling.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx


class ServeProtocolError(RuntimeError):
    """The served page answered something this client does not understand, or an error."""


class BrowserSession:
    """One page session on a running Gradio app at ``base`` (e.g. ``http://127.0.0.1:7860/``),
    over ``http``. The page opens the session's event stream for each event and closes it when the
    answer is in, as Gradio's page does when no other event of the session is pending."""

    def __init__(self, http: httpx.Client, base: str) -> None:
        self.http, self.base = http, base.rstrip("/") + "/"
        config = http.get(self.base + "config").raise_for_status().json()
        if config.get("protocol") != "sse_v3":
            raise ServeProtocolError(f"{self.base}: protocol {config.get('protocol')!r}, expected sse_v3")
        self.prefix = self.base + str(config.get("api_prefix", "/gradio_api")).strip("/") + "/"
        self.types = {c["id"]: c.get("type") for c in config.get("components", [])}
        self.deps = {d["api_name"]: d for d in config.get("dependencies", []) if d.get("api_name")}
        self.session = uuid.uuid4().hex[:11]

    def output_types(self, api_name: str) -> list[str | None]:
        """The component type of each output of ``api_name``, in order (e.g. "gallery")."""
        return [self.types.get(i) for i in self._dep(api_name)["outputs"]]

    def call(self, api_name: str, args: Sequence[Any], timeout_s: float = 120.0) -> list[Any]:
        """Run the event ``api_name`` with ``args`` for its inputs other than ``gr.State`` (the
        page sends null for those: the server keeps them), as ``gradio_client.predict`` takes
        them. -> every output's value, in order (a component update is a dict). Raises
        ``ServeProtocolError`` with the server's message when the event fails, the server reports
        an error, the stream closes without the answer, or none arrives within ``timeout_s``."""
        dep = self._dep(api_name)
        wanted = sum(1 for i in dep["inputs"] if self.types.get(i) != "state")
        if len(args) != wanted:
            raise ServeProtocolError(f"{api_name} takes {wanted} values (its inputs but gr.State), got {len(args)}")
        values = iter(args)
        data = [None if self.types.get(i) == "state" else next(values) for i in dep["inputs"]]
        deadline = time.monotonic() + timeout_s
        try:
            join = self.http.post(self.prefix + "queue/join",
                                  json={"data": data, "fn_index": dep["id"], "session_hash": self.session,
                                        "event_data": None, "trigger_id": None})
            event_id = join.raise_for_status().json().get("event_id")
            if not event_id:
                raise ServeProtocolError(f"{api_name}: the queue took the event without an event id ({join.text[:200]})")
            with self.http.stream("GET", self.prefix + "queue/data", params={"session_hash": self.session}) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    answer = self._answer(api_name, event_id, line)
                    if answer is not None:
                        return answer
                    if time.monotonic() > deadline:  # heartbeats keep the stream alive: bound it here
                        raise ServeProtocolError(f"{api_name}: no answer within {timeout_s:.0f} s (event {event_id})")
        except httpx.HTTPError as e:
            raise ServeProtocolError(f"{api_name}: {type(e).__name__}: {e}") from e
        raise ServeProtocolError(f"{api_name}: the event stream ended before the answer (event {event_id})")

    @staticmethod
    def _answer(api_name: str, event_id: str, line: str) -> list[Any] | None:
        """The outputs if ``line`` (one line of the event stream) completes ``event_id``; None for
        other messages. Raises on the server's errors and on a stream closed without the answer."""
        if not line.startswith("data:"):
            return None
        msg = json.loads(line[5:])
        kind = msg.get("msg")
        if kind == "unexpected_error":  # e.g. the server stopped, or the session is unknown
            raise ServeProtocolError(f"{api_name}: {msg.get('message') or msg}")
        if kind == "close_stream":
            raise ServeProtocolError(f"{api_name}: the server closed the event stream before the answer (event {event_id})")
        if msg.get("event_id") != event_id or kind != "process_completed":
            return None
        if not msg.get("success", False):
            raise ServeProtocolError(f"{api_name}: {(msg.get('output') or {}).get('error') or msg}")
        return list(msg["output"]["data"])

    def _dep(self, api_name: str) -> dict[str, Any]:
        try:
            return self.deps[api_name]
        except KeyError:
            raise ServeProtocolError(f"the app has no event named {api_name!r} ({sorted(self.deps)})") from None


def gallery_urls(gallery: Any) -> list[str]:
    """The image URLs of a Gallery output (``{"value": [{"image": {"url": ...}}, ...]}`` as an
    update; a bare list of items as a value)."""
    items = gallery.get("value") if isinstance(gallery, dict) else gallery
    urls = []
    for item in items or []:
        image = item.get("image") if isinstance(item, dict) else None
        if isinstance(image, dict) and image.get("url"):
            urls.append(str(image["url"]))
    return urls


__all__ = ["BrowserSession", "ServeProtocolError", "gallery_urls"]
