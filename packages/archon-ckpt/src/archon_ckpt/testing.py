"""Tiny toy transformer-ish model and a deterministic training loop, for this package's tests.

Not part of the public API. Kept in src so that multi-rank test workers (loaded by file path)
can import it.
"""

# B: batch, S: sequence, D: model dim, V: vocab, F: ffn hidden

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from archon_ckpt.state import ModelState, OptimizerState, RNGState, SchedulerState

VOCAB, DIM, FFN, SEQ, GLOBAL_BATCH = 64, 32, 64, 8, 4


class Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, FFN)
        self.fc2 = nn.Linear(FFN, DIM)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x_BSD)))))


class ToyLM(nn.Module):
    """Embedding -> blocks -> head, plus a persistent running-stat buffer (like MoE biases)."""

    def __init__(self, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(dropout) for _ in range(num_layers))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("token_ema", torch.zeros(VOCAB))

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.embed(ids_BS)
        for layer in self.layers:
            x_BSD = layer(x_BSD)
        return self.head(x_BSD)


def make_model(seed: int = 0, dropout: float = 0.0, num_layers: int = 2) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(num_layers, dropout)


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def make_optim(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return opt, sched


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, train: dict, num_steps: int,
                dp_rank: int = 0, dp_size: int = 1, device: str = "cpu") -> list[float]:
    """Run ``num_steps`` steps from ``train["step"]``; each DP rank takes its slice of the batch."""
    losses = []
    for _ in range(num_steps):
        step = train["step"]
        ids_all = global_batch(step).to(device)
        per = GLOBAL_BATCH // dp_size
        ids = ids_all[dp_rank * per:(dp_rank + 1) * per]
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.token_ema.mul_(0.9).add_(torch.bincount(ids_all.reshape(-1), minlength=VOCAB).float(), alpha=0.1)
        report = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(report)
            report /= dp_size
        losses.append(report.item())
        train["step"] = step + 1
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of every state-dict tensor."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def make_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, train: dict) -> dict[str, Any]:
    return {"model": ModelState(model), "optim": OptimizerState(model, opt),
            "sched": SchedulerState(sched), "rng": RNGState(), "train": train}


def native_to_hf(name: str) -> str:
    """A renaming like a real adapter's: ``layers.0.fc1.weight`` -> ``model.layers.0.mlp.up.weight``."""
    return "model." + name.replace("fc1", "mlp.up").replace("fc2", "mlp.down")


def hf_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under HF-style names (plain copies), to be written by safetensors."""
    return {native_to_hf(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
