"""`RolloutClient`: one client for one or more rollout servers speaking SGLang's native HTTP API
(real SGLang or `archon serve`). Needs the `client` extra (`pip install archon-rl[client]`, i.e. aiohttp);
`import archon_rl` works without it, this module imports aiohttp when a client is built.

API (every method is synchronous and thread-safe; the HTTP work runs on the client's own event loop thread):

- ``generate(requests, return_logprob=True) -> list[GenResult]``: the requests go out at once as batched POST
  /generate calls (``input_ids`` as a list of lists, per-request ``sampling_params``; at least one call per server,
  at most ``max_chunk`` prompts each), each to the server with the fewest outstanding prompts; results in request
  order, each tagged with ``weight_version`` (the version the server held when it produced it) and
  ``prompt_tokens``. One batched call per server lets a server generate them in one batch.
  ``generate_async(...)`` returns a ``concurrent.futures.Future`` of the same list (for async RL).
- ``health() -> list[bool]`` (GET /health_generate on each server), ``wait_healthy(timeout)``,
  ``flush_cache()``, ``get_model_info()``, ``get_server_info()`` (lists: one answer per server).
- ``update_weights_from_disk(model_path, weight_version=None, flush_cache=True, abort_all_requests=False)``:
  every server loads an HF directory; raises `RolloutServerError` unless every server reports success.
- ``init_weights_update_group(master_address, master_port, world_size, group_name=..., backend=...,
  ranks_per_server=1) -> Future``: server i joins as ranks ``1 + i * ranks_per_server ...`` (the trainer is rank 0
  and must create its side concurrently, `archon_rl.weight_group.init_weight_group`); the future completes once
  every server has joined.
- ``update_weights_from_distributed(names, dtypes, shapes, group_name=..., weight_version=None) -> Future``:
  the servers receive each tensor by ``broadcast(src=0)`` in ``names`` order while the calls are open, so the
  trainer broadcasts after calling this and then waits on the future.
- ``get_weights_by_name(name, truncate_size)``: one tensor's leading rows from every server (for checks).
- ``update_weight_version(version)``: the version every server reports from now on (/update_weight_version).
- ``pause_generation(mode="abort" | "retract" | "in_place")``, ``continue_generation()``.
- ``close()`` (also a context manager).

Errors: HTTP 400 -> `RolloutRequestError` (not retried); a server that cannot be reached, drops the connection
or answers 5xx is retried up to ``retries`` times on any server (with backoff), then `RolloutServerError` naming
the servers tried; every call is bounded by ``timeout`` seconds, so a dead or hung server never blocks forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from archon_rl.protocol import ProtocolError, decode_answer, encode_generate_batch
from archon_rl.requests import GenRequest, GenResult

__all__ = ["RolloutClient", "RolloutServerError", "RolloutRequestError"]


class RolloutServerError(RuntimeError):
    """A server could not be reached, failed, or timed out (after retries)."""


class RolloutRequestError(ValueError):
    """A server rejected a request as invalid (HTTP 400); the message is the server's."""


def _aiohttp():
    try:
        import aiohttp
    except ImportError as e:  # the optional extra is missing
        raise ImportError("RolloutClient needs aiohttp: install archon-rl[client]") from e
    return aiohttp


class RolloutClient:
    """See the module docstring."""

    def __init__(self, urls: str | Sequence[str], *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 retries: int = 2, backoff: float = 0.2, max_connections: int = 1024, max_chunk: int = 64) -> None:
        aiohttp = _aiohttp()
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.urls = [u if "://" in u else f"http://{u}" for u in (u.rstrip("/") for u in self.urls)]
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.max_chunk = max_chunk
        self.outstanding = [0] * len(self.urls)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-client", daemon=True)
        self._thread.start()

        async def make_session():
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                         timeout=self._timeout)

        self._session = self._run(make_session())

    # ------------------------------------------------------------------------------------------- plumbing
    def _submit(self, coro) -> concurrent.futures.Future:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("RolloutClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro):
        # The outer bound is a safety net above the per-request ClientTimeout (retries included).
        return self._submit(coro).result(timeout=self.timeout * (self.retries + 1) + 30)

    def _pick(self, exclude: set[int]) -> int:
        candidates = [i for i in range(len(self.urls)) if i not in exclude] or list(range(len(self.urls)))
        return min(candidates, key=lambda i: self.outstanding[i])

    async def _post_once(self, i: int, path: str, payload: Any, method: str, weight: int = 1) -> Any:
        aiohttp = _aiohttp()
        url = self.urls[i] + path
        self.outstanding[i] += weight
        try:
            async with self._session.request(method, url, json=payload) as resp:
                text = await resp.text()
                if resp.status == 400:
                    raise RolloutRequestError(f"{url}: {_error_message(text)}")
                if resp.status >= 500:
                    raise _Retry(f"{url} answered HTTP {resp.status}: {_error_message(text)}")
                if resp.status >= 300:
                    raise RolloutServerError(f"{url} answered HTTP {resp.status}: {_error_message(text)}")
                ctype = resp.headers.get("Content-Type", "")
                return await resp.json(content_type=None) if "json" in ctype or text[:1] in "[{" else text
        except TimeoutError:  # first: aiohttp's socket timeouts are also ClientConnectionErrors; never retried
            raise RolloutServerError(f"{url}: no answer within the client timeout of {self.timeout:g}s") from None
        except (aiohttp.ClientConnectionError, ConnectionError) as e:
            raise _Retry(f"{url}: {type(e).__name__}: {e}") from None
        finally:
            self.outstanding[i] -= weight

    async def _request(self, path: str, payload: Any = None, *, server: int | None = None,
                       method: str = "POST", weight: int = 1) -> Any:
        """One call with retries: to ``server`` or to the least-loaded server (another one on each retry)."""
        tried: list[str] = []
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            i = server if server is not None else self._pick({self.urls.index(u) for u in tried})
            tried.append(self.urls[i])
            try:
                return await self._post_once(i, path, payload, method, weight)
            except _Retry as e:
                errors.append(str(e))
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff * (2**attempt))
        raise RolloutServerError(f"{path} failed after {self.retries + 1} attempts: " + "; ".join(errors))

    async def _all(self, path: str, payload: Any = None, method: str = "POST") -> list[Any]:
        return list(await asyncio.gather(*(self._request(path, payload, server=i, method=method)
                                           for i in range(len(self.urls)))))

    # ------------------------------------------------------------------------------------------- generation
    async def _generate(self, requests: Sequence[GenRequest], return_logprob: bool) -> list[GenResult]:
        if not requests:
            return []
        n_chunks = max(min(len(self.urls), len(requests)), -(-len(requests) // self.max_chunk))
        size = -(-len(requests) // n_chunks)
        chunks = [requests[i: i + size] for i in range(0, len(requests), size)]

        async def one(chunk: Sequence[GenRequest]) -> list[GenResult]:
            answers = await self._request("/generate", encode_generate_batch(chunk, return_logprob=return_logprob),
                                          weight=len(chunk))
            if not isinstance(answers, list) or len(answers) != len(chunk):
                raise RolloutServerError(f"/generate answered {str(answers)[:200]} for a batch of {len(chunk)}")
            try:
                return [decode_answer(a) for a in answers]
            except ProtocolError as e:
                raise RolloutServerError(str(e)) from None

        return [r for rs in await asyncio.gather(*(one(c) for c in chunks)) for r in rs]

    def generate(self, requests: Sequence[GenRequest], *, return_logprob: bool = True) -> list[GenResult]:
        return self._run(self._generate(list(requests), return_logprob))

    def generate_async(self, requests: Sequence[GenRequest], *,
                       return_logprob: bool = True) -> concurrent.futures.Future:
        return self._submit(self._generate(list(requests), return_logprob))

    # ------------------------------------------------------------------------------------------- control
    def health(self) -> list[bool]:
        async def one(i: int) -> bool:
            try:
                await self._post_once(i, "/health_generate", None, "GET")
                return True
            except (_Retry, RolloutServerError, RolloutRequestError):
                return False

        async def every():
            return list(await asyncio.gather(*(one(i) for i in range(len(self.urls)))))

        return self._run(every())

    def wait_healthy(self, timeout: float = 300.0, poll: float = 0.2) -> None:
        """Block until every server answers /health_generate with 200; RolloutServerError after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            ok = self.health()
            if all(ok):
                return
            if time.monotonic() > end:
                down = [u for u, good in zip(self.urls, ok) if not good]
                raise RolloutServerError(f"servers not healthy after {timeout:g}s: {down}")
            time.sleep(poll)

    def flush_cache(self) -> list[Any]:
        return self._run(self._all("/flush_cache"))

    def get_model_info(self) -> list[dict]:
        return self._run(self._all("/get_model_info", method="GET"))

    def get_server_info(self) -> list[dict]:
        return self._run(self._all("/get_server_info", method="GET"))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """The first ``truncate_size`` rows of tensor ``name`` on every server (for checks, not for speed)."""
        return self._run(self._all("/get_weights_by_name", {"name": name, "truncate_size": truncate_size}))

    def pause_generation(self, mode: str = "abort") -> list[Any]:
        return self._run(self._all("/pause_generation", {"mode": mode}))

    def continue_generation(self) -> list[Any]:
        return self._run(self._all("/continue_generation", {}))

    def update_weights_from_disk(self, model_path: str, *, weight_version: str | int | None = None,
                                 flush_cache: bool = True, abort_all_requests: bool = False,
                                 load_format: str | None = None) -> list[dict]:
        payload = {"model_path": model_path, "load_format": load_format, "flush_cache": flush_cache,
                   "abort_all_requests": abort_all_requests,
                   "weight_version": None if weight_version is None else str(weight_version)}
        return _check_success(self._run(self._all("/update_weights_from_disk", payload)), self.urls)

    def update_weight_version(self, version: str | int, *, abort_all_requests: bool = False) -> list[dict]:
        """Set the version every server reports (after tensors sent by `update_weights_from_distributed`)."""
        payload = {"new_version": str(version), "abort_all_requests": abort_all_requests}
        return _check_success(self._run(self._all("/update_weight_version", payload)), self.urls)

    def init_weights_update_group(self, master_address: str, master_port: int, world_size: int, *,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  ranks_per_server: int = 1) -> concurrent.futures.Future:
        async def every():
            calls = [self._request("/init_weights_update_group",
                                   {"master_address": master_address, "master_port": master_port,
                                    "rank_offset": 1 + i * ranks_per_server, "world_size": world_size,
                                    "group_name": group_name, "backend": backend}, server=i)
                     for i in range(len(self.urls))]
            return _check_success(list(await asyncio.gather(*calls)), self.urls)

        return self._submit(every())

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], *, group_name: str = "weight_update_group",
                                        weight_version: str | int | None = None, flush_cache: bool = True,
                                        abort_all_requests: bool = False) -> concurrent.futures.Future:
        payload = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                   "group_name": group_name, "flush_cache": flush_cache, "abort_all_requests": abort_all_requests,
                   "weight_version": None if weight_version is None else str(weight_version)}

        async def every():
            return _check_success(await self._all("/update_weights_from_distributed", payload), self.urls)

        return self._submit(every())

    # ------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._submit(self._session.close()).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Retry(Exception):
    """A failure worth another attempt (connection refused or dropped, HTTP 5xx)."""


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", text))
        if isinstance(body, dict) and "message" in body:
            return str(body["message"])
    except ValueError:
        pass
    return text[:500]


def _check_success(answers: list[Any], urls: list[str]) -> list[Any]:
    bad = [(u, a) for u, a in zip(urls, answers) if isinstance(a, dict) and a.get("success") is False]
    if bad:
        raise RolloutServerError("; ".join(f"{u}: {a.get('message', a)}" for u, a in bad))
    return answers
