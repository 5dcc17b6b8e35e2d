"""`archon serve MODEL_DIR`: load the model (after the port is open: /health_generate answers 503 meanwhile) and
serve until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading

import torch

from archon.serve.backend import make_backend
from archon.serve.server import RolloutServer, ServedModel
from archon.serve.weights import ready_version

log = logging.getLogger("archon.serve")

__all__ = ["add_serve_arguments", "run_serve", "load_served_model", "serve_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="HF model directory (config.json + safetensors; no tokenizer needed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default 30000, SGLang's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's; float32 on CPU) | bfloat16 | float16 | "
                                                   "float32")
    p.add_argument("--max-batch", type=int, default=256, help="most requests per generate call (default 256)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="after a request arrives, wait this long for more to batch with it (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for requests without sampling_seed")
    p.add_argument("--engine", default="rollout", choices=["embedded", "rollout"],
                   help="generation engine: rollout (static KV cache, continuous batching, CUDA-graph decode with "
                   "fused kernels; the default, see docs/rollout.md) or embedded (the simple KV-cache sampler)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="--engine rollout: KV cache budget in GiB (default: a fraction of free GPU memory)")


def serve_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"--dtype {requested!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32")
    return _DTYPES.get(name.removeprefix("torch."), torch.float32)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use cpu or cuda")
    return dev


def load_served_model(model_dir: str, *, device: torch.device, dtype: str = "auto", seed: int = 0,
                      engine: str = "rollout", kv_cache_gb: float | None = None) -> ServedModel:
    from archon.hf import from_pretrained, load_hf_config

    hf_config = load_hf_config(model_dir)
    model = from_pretrained(model_dir, dtype=serve_dtype(dtype, hf_config, device), device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ServedModel(model=model, backend=make_backend(model, device=device, seed=seed, engine=engine,
                                                          **({"kv_cache_gb": kv_cache_gb} if kv_cache_gb else {})),
                       vocab_size=int(hf_config.vocab_size), context_len=int(hf_config.max_position_embeddings),
                       model_path=os.path.abspath(model_dir), model_type=hf_config.model_type,
                       weight_version=ready_version(model_dir) or "0",
                       architectures=list(getattr(hf_config, "architectures", None) or []))


def _check_model_dir(model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} has no config.json: pass an HF model directory")
    if not any(f.endswith(".safetensors") for f in os.listdir(model_dir)):
        raise ValueError(f"{model_dir!r} has no *.safetensors weights")


def run_serve(args: argparse.Namespace) -> None:
    """Serve until interrupted; the model loads in the background while the port already answers."""
    from aiohttp import web

    _check_model_dir(args.model_dir)
    device = _device(args.device)
    if args.dtype != "auto" and args.dtype not in _DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number")
    server = RolloutServer(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)

    def load() -> None:
        try:
            server.served = load_served_model(args.model_dir, device=device, dtype=args.dtype, seed=args.seed,
                                              engine=args.engine, kv_cache_gb=args.kv_cache_gb)
            log.info("archon serve: model %s loaded on %s, ready", args.model_dir, device)
        except Exception as e:  # keep answering (503 with the reason) so a client sees why
            server.load_error = f"loading {args.model_dir} failed: {type(e).__name__}: {e}"
            log.error("archon serve: %s", server.load_error)

    async def main() -> None:
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({e}); pick another --port or --host") from None
        log.info("archon serve: listening on http://%s:%d", args.host, args.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        threading.Thread(target=load, name="archon-serve-load", daemon=True).start()
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
