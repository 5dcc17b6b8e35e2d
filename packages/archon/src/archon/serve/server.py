"""`archon serve`: SGLang's native HTTP API (the token-id subset, docs/rollout.md) on an aiohttp server.

Requests wait in one queue; a batcher takes up to ``max_batch`` of them after a short window (``batch_wait_ms``
after the first arrival) and hands them to the `GenerationBackend` in one call, on one worker thread, so the
event loop keeps accepting requests while a batch generates. Generation batches and weight updates take turns
under one lock: an update waits for the batch in flight, and every request is generated start to end by one
weight version, the one its answer reports (``meta_info.weight_version``). ``abort_all_requests`` (or
`/pause_generation` mode ``abort``) answers the requests still queued with ``finish_reason: abort``; the batch
in flight always completes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web
from archon_rl import GenRequest, GenResult, SamplingConfig
from archon_rl.protocol import ProtocolError, encode_answer, parse_generate
from archon_rl.weight_group import WeightGroup, init_weight_group

from archon.serve.weights import hf_targets, load_from_disk, ready_version, receive_broadcast

log = logging.getLogger("archon.serve")

__all__ = ["RolloutServer", "ServedModel"]


@dataclass
class ServedModel:
    """What the server needs from the loaded model (built by `archon.serve.app.load_served_model`)."""

    model: Any
    backend: Any
    vocab_size: int
    context_len: int
    model_path: str
    model_type: str
    weight_version: str = "0"
    architectures: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    request: GenRequest
    future: asyncio.Future
    arrived: float


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _fail(message: str) -> web.Response:  # SGLang answers a failed weight update with 400 {success, message}
    return web.json_response({"success": False, "message": message}, status=400)


class RolloutServer:
    """The aiohttp application and its state. ``served`` is set once the model has loaded (503 until then)."""

    def __init__(self, *, max_batch: int = 256, batch_wait_ms: float = 5.0, health_timeout: float = 60.0) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        self.max_batch, self.batch_wait, self.health_timeout = max_batch, batch_wait_ms / 1000, health_timeout
        self.served: ServedModel | None = None
        self.load_error: str | None = None
        self.weights_broken: str | None = None
        self.queue: list[_Pending] = []
        self.groups: dict[str, WeightGroup] = {}
        self.batch_sizes: Counter[int] = Counter()
        self.generated_tokens = 0
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="archon-serve-model")
        # made again in _start, on the app's event loop (each primitive binds to the loop that first waits on it)
        self._lock, self._wake, self._running = asyncio.Lock(), asyncio.Event(), asyncio.Event()
        self._batcher: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30, middlewares=[self._errors])
        get, post = web.get, web.post
        app.add_routes([
            post("/generate", self.generate), get("/health", self.health), get("/health_generate", self.health_generate),
            get("/get_model_info", self.get_model_info), get("/get_server_info", self.get_server_info),
            get("/get_weight_version", self.get_weight_version),
            post("/get_weights_by_name", self.get_weights_by_name), get("/get_weights_by_name", self.get_weights_by_name),
            post("/flush_cache", self.flush_cache), get("/flush_cache", self.flush_cache),
            post("/update_weights_from_disk", self.update_weights_from_disk),
            post("/init_weights_update_group", self.init_weights_update_group),
            post("/update_weights_from_distributed", self.update_weights_from_distributed),
            post("/update_weight_version", self.update_weight_version),
            post("/pause_generation", self.pause_generation), post("/continue_generation", self.continue_generation),
        ])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        self._lock, self._wake, self._running = asyncio.Lock(), asyncio.Event(), asyncio.Event()
        self._running.set()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _stop(self, app) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        for g in self.groups.values():
            g.close()
        self._exec.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ProtocolError as e:
            return _error(400, str(e))
        except web.HTTPException:
            raise
        except Exception as e:  # a server bug or a backend failure: answer, log, keep serving
            log.exception("%s failed", request.path)
            return _error(500, f"{type(e).__name__}: {e}")

    async def _body(self, request: web.Request) -> dict:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError as e:
            raise ProtocolError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _ready(self) -> ServedModel:
        if self.served is None:
            raise web.HTTPServiceUnavailable(text=json.dumps({"error": {"message": self.load_error or "loading"}}),
                                             content_type="application/json")
        return self.served

    # ------------------------------------------------------------------------------------------- generation
    async def generate(self, request: web.Request) -> web.Response:
        served = self._ready()
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            raise ProtocolError(f"the request body is not valid JSON: {e}") from None
        call = parse_generate(body, vocab_size=served.vocab_size, context_len=served.context_len)
        results = await self.submit(call.requests)
        answers = [encode_answer(r, return_logprob=lp, weight_version=r.weight_version or served.weight_version,
                                 rid=rid) for r, lp, rid in zip(results, call.return_logprob, call.rids)]
        return web.json_response(answers if call.batched else answers[0])

    async def submit(self, requests: list[GenRequest]) -> list[GenResult]:
        loop = asyncio.get_running_loop()
        pending = [_Pending(r, loop.create_future(), time.monotonic()) for r in requests]
        self.queue.extend(pending)
        self._wake.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await self._running.wait()
            if not self.queue:
                self._wake.clear()
                continue
            wait = self.queue[0].arrived + self.batch_wait - time.monotonic()
            if len(self.queue) < self.max_batch and wait > 0:
                await asyncio.sleep(wait)
            async with self._lock:
                if not self._running.is_set() or not self.queue:
                    continue
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch:]
                served = self.served
                assert served is not None  # requests are queued only once the model has loaded (`_ready`)
                version = served.weight_version
                try:
                    results = await loop.run_in_executor(self._exec, served.backend.generate,
                                                         [p.request for p in batch])
                except Exception as e:
                    log.exception("generate failed")
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
            self.batch_sizes[len(batch)] += 1
            for p, r in zip(batch, results):
                r.weight_version = version
                self.generated_tokens += len(r.output_ids)
                if not p.future.done():
                    p.future.set_result(r)

    def _abort_queued(self) -> int:
        queued, self.queue = self.queue, []
        for p in queued:
            if not p.future.done():
                p.future.set_result(GenResult([], [], "abort", prompt_tokens=len(p.request.input_ids)))
        return len(queued)

    # ------------------------------------------------------------------------------------------- info
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def health_generate(self, request: web.Request) -> web.Response:
        self._ready()
        if self.weights_broken:
            return _error(503, self.weights_broken)
        if not self._running.is_set():
            return web.Response(text="paused")
        probe = GenRequest([0], SamplingConfig(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(self.submit([probe]), self.health_timeout)
        except Exception as e:  # TimeoutError included
            return _error(503, f"generation probe failed: {type(e).__name__}: {e}")
        return web.Response(text="ok")

    async def get_model_info(self, request: web.Request) -> web.Response:
        s = self._ready()
        return web.json_response({"model_path": s.model_path, "tokenizer_path": None, "is_generation": True,
                                  "weight_version": s.weight_version, "model_type": s.model_type,
                                  "architectures": s.architectures, "vocab_size": s.vocab_size,
                                  "max_context_length": s.context_len})

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self._ready().weight_version})

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        """The first ``truncate_size`` rows (dim 0) of one HF-named tensor, as nested lists (as SGLang answers)."""
        served = self._ready()
        body = await self._body(request)
        name, truncate = body.get("name"), body.get("truncate_size", 100)
        if not isinstance(truncate, int) or truncate < 1:
            raise ProtocolError(f"truncate_size must be an integer >= 1, got {truncate!r}")
        t = hf_targets(served.model).get(name) if isinstance(name, str) else None
        if t is None:
            raise ProtocolError(f"name {name!r} is not an HF tensor name of this model")
        async with self._lock:
            rows = t[:truncate] if t.ndim else t
            data = rows.detach().float().cpu().tolist()  # float32 -> Python float is exact (bf16 too)
        return web.json_response(data)

    async def get_server_info(self, request: web.Request) -> web.Response:
        n_batches = sum(self.batch_sizes.values())
        n_requests = sum(k * v for k, v in self.batch_sizes.items())
        s = self.served
        return web.json_response({
            "ready": s is not None, "weight_version": s.weight_version if s else None,
            "max_batch": self.max_batch, "batch_wait_ms": self.batch_wait * 1000,
            "max_context_length": s.context_len if s else None,
            "num_batches": n_batches, "num_requests": n_requests,
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "mean_batch_size": n_requests / n_batches if n_batches else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generated_tokens": self.generated_tokens, "queued": len(self.queue),
            "paused": not self._running.is_set(), "weight_update_groups": sorted(self.groups),
        })

    async def flush_cache(self, request: web.Request) -> web.Response:
        return web.Response(text="Cache flushed.")  # the sampler keeps no cache between batches

    # ------------------------------------------------------------------------------------------- pause
    async def pause_generation(self, request: web.Request) -> web.Response:
        mode = (await self._body(request)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ProtocolError(f"mode must be abort | retract | in_place, got {mode!r}")
        self._running.clear()
        aborted = self._abort_queued() if mode == "abort" else 0
        async with self._lock:  # the batch in flight has finished
            pass
        return web.json_response({"success": True, "message": f"paused ({mode}); {aborted} queued requests aborted"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self._running.set()
        self._wake.set()
        return web.json_response({"success": True, "message": "generation continued"})

    # ------------------------------------------------------------------------------------------- weights
    def _update_options(self, body: dict) -> tuple[str | None, bool]:
        version = body.get("weight_version")
        if version is not None and not isinstance(version, (str, int)):
            raise ProtocolError(f"weight_version must be a string, got {version!r}")
        abort = body.get("abort_all_requests", False)
        if not isinstance(abort, bool) or not isinstance(body.get("flush_cache", True), bool):
            raise ProtocolError("abort_all_requests and flush_cache must be true or false")
        return (None if version is None else str(version)), abort

    async def _apply(self, fn, *args) -> str | None:
        """Run a weight update on the model thread; the error message on failure."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._exec, fn, *args)
        except ValueError as e:  # rejected before any tensor changed
            return str(e)
        except Exception as e:  # failed part-way: the weights are a mix until the next successful update
            self.weights_broken = f"a weight update failed part-way ({type(e).__name__}: {e}); update again"
            log.exception("weight update failed")
            return self.weights_broken
        self.weights_broken = None
        return None

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        served = self._ready()
        body = await self._body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise ProtocolError("model_path (an HF directory) is required")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise ProtocolError(f"load_format {body['load_format']!r} is not supported: use auto or safetensors")
        version, abort = self._update_options(body)
        if abort:
            self._abort_queued()
        async with self._lock:
            err = await self._apply(load_from_disk, served.model, path)
            if err is not None:
                return _fail(err)
            served.model_path = path
            served.weight_version = version or ready_version(path) or served.weight_version
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0})

    async def update_weight_version(self, request: web.Request) -> web.Response:
        served = self._ready()
        body = await self._body(request)
        version = body.get("new_version")
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise ProtocolError(f"new_version must be a string, got {version!r}")
        _, abort = self._update_options(body)
        if abort:
            self._abort_queued()
        async with self._lock:
            served.weight_version = str(version)
        return web.json_response({"success": True, "message": f"weight version set to {version}"})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        served = self._ready()
        body = await self._body(request)
        try:
            addr, port = str(body["master_address"]), int(body["master_port"])
            rank, world = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"init_weights_update_group needs master_address, master_port, rank_offset, "
                                f"world_size ({type(e).__name__}: {e})") from None
        name, backend = str(body.get("group_name", "weight_update_group")), str(body.get("backend", "nccl"))
        device = next(served.model.parameters()).device
        if backend == "nccl" and device.type != "cuda":
            return _fail("backend nccl needs a CUDA server (--device cuda); a CPU server joins with backend gloo")
        if backend == "gloo":  # gloo moves host tensors; each one is copied onto the model's device after receipt
            device = torch.device("cpu")
        if name in self.groups:
            return _fail(f"weight update group {name!r} already exists")
        loop = asyncio.get_running_loop()
        try:  # blocks until every rank joined: off the model thread, generation goes on meanwhile
            group = await loop.run_in_executor(None, lambda: init_weight_group(
                addr, port, rank, world, backend=backend, group_name=name, device=device))
        except Exception as e:
            return _fail(f"could not join weight update group {name!r} at {addr}:{port}: {type(e).__name__}: {e}")
        self.groups[name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        served = self._ready()
        body = await self._body(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise ProtocolError("names, dtypes and shapes must be lists")
        group = self.groups.get(str(body.get("group_name", "weight_update_group")))
        if group is None:
            return _fail(f"no weight update group {body.get('group_name', 'weight_update_group')!r}: "
                         "call /init_weights_update_group first")
        version, abort = self._update_options(body)
        if abort:
            self._abort_queued()
        async with self._lock:
            err = await self._apply(receive_broadcast, served.model, group, names, dtypes, shapes)
            if err is not None:
                return _fail(err)
            if version is not None:
                served.weight_version = version
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})
