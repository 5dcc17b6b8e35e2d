"""Pipeline parallelism for the engine: stage models and the `PipelineRunner` (a `Runner`).

Every pipeline micro-batch is padded to the same token count L (one padding document, as `pad_packed`),
so stage inputs have static shapes [1, L] token ids / [L/tp, D] hidden states. Each stage's forward gets
only `pp_mb` (the micro-batch index) besides its activation; a forward pre-hook swaps it for the packed
metadata (positions, cu_seqlens, attention meta, labels) that every pp rank builds from the batch it holds,
so varlen documents reach every stage without extra p2p traffic. The last stage returns per-token
logprobs (never logits) and the loss is computed there; results are broadcast over the pp group. How many
micro-batches a step has (at least `pp_microbatches`, a multiple of pp) is decided with every other runner's
budget in `archon.engine.micro_batches`.

M: pipeline micro-batches, L: padded tokens per micro-batch, T: tokens, D: model dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from archon.engine.batch import PackedBatch
from archon.engine.logprobs import next_token_labels, shift_to_tokens
from archon.engine.runner import Runner, pad_packed
from archon.engine.setup import EngineSetup
from archon.models.common.head import LogprobRequest
from archon.models.common.packing import pack_inputs
from torch import nn

_PAD_BUCKET = 64  # L is rounded up to this so few distinct schedules (one per L) are ever built


@dataclass
class PipelineInfo:
    """What the runner needs to know about this rank's stages (attached to the model as `.pipeline`)."""

    layout: Any  # archon_parallel.pipeline.StageLayout
    stages: list[nn.Module]  # one Decoder per local stage, in layout.stage_ids order
    group: Any  # the pp ProcessGroup
    act_dtype: torch.dtype  # dtype of hidden states sent between stages
    tp: int  # sequence-parallel degree: stage hidden states hold L / tp rows


class PipelineModel(nn.Module):
    """Several stages of one rank (interleaved schedules) behind one module with the whole model's parameter
    names: `layers` / `tok_embeddings` / `norm` / `output` / `score` are the stages' own modules, registered
    again here (the stages themselves are not children), so `state_dict`, DCP's `get_model_state_dict` and
    checkpoint names see `layers.7...` exactly as without pipelining."""

    def __init__(self, stages: list[nn.Module]) -> None:
        super().__init__()
        self._stages = list(stages)  # a plain list: not submodules, so no name is registered twice
        self.layers = nn.ModuleDict({k: block for stage in stages for k, block in stage.layers.items()})
        for name in ("tok_embeddings", "norm", "output", "score"):
            found = [getattr(stage, name) for stage in stages if getattr(stage, name, None) is not None]
            setattr(self, name, found[0] if found else None)
        first = stages[0]
        self.args, self.head_kind, self.hf_config = first.args, first.head_kind, first.hf_config

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self._stages:
            stage.train(mode)
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline-parallel model runs through PipelineRunner, not model(...)")


def build_pipeline_model(setup: EngineSetup, meshes, build_stage: Callable[[Callable], nn.Module]) -> nn.Module:
    """This rank's stage module(s). `build_stage(prune)` builds one stage, calling `prune(model, plan)` on the
    meta model before parallelizing it. Returns the Decoder itself for one stage per rank."""
    from archon_parallel.pipeline import prune_to_stage, stage_layout

    a, dims = setup.cfg.archon, setup.dims
    pp_rank = meshes["pp"].get_local_rank()
    layout = stage_layout(a.pp_schedule, setup.hf_config.num_hidden_layers, pp_rank, dims.pp, a.pp_stages_per_rank,
                          first_less=a.pp_first_stage_less_layers, last_less=a.pp_last_stage_less_layers)
    stages = []
    for sid, layers in zip(layout.stage_ids, layout.layers):
        first, last = layout.is_first(sid), layout.is_last(sid)

        def prune(model, plan, layers=layers, first=first, last=last):
            prune_to_stage(model, plan, layers, first=first, last=last)
            if not last:
                model.output, model.score = None, None

        stages.append(build_stage(prune))
    model = stages[0] if len(stages) == 1 else PipelineModel(stages)
    bf16 = setup.dtype == torch.bfloat16
    model.pipeline = PipelineInfo(
        layout=layout, stages=stages, group=meshes.group("pp"),
        act_dtype=torch.bfloat16 if bf16 and dims.fsdp_enabled else torch.float32, tp=dims.tp)
    return model


class _AddAuxGrad(torch.autograd.Function):
    """Identity on `x`; in backward also sends `scale` into `aux` (the stage's MoE load-balancing loss), so
    each stage back-propagates its own aux loss without it travelling to the last stage."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.clone()  # not a view: zero-bubble schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, g):
        shape, dtype, dev = ctx.aux_meta
        return g, torch.full(shape, ctx.scale, dtype=dtype, device=dev), None


@dataclass
class _Step:
    """Per-step state the stage hooks and the loss read, indexed by micro-batch."""

    mbs: list[PackedBatch]
    packed: list[Any]  # PackedInput per micro-batch: its own tokens, padded only to a multiple of tp
    labels: list[torch.Tensor]  # next-token labels per micro-batch
    ids_ML: torch.Tensor  # token ids zero-padded to L (the first stage's static input)
    want_entropy: bool
    loss_fn: Any = None
    scales: list[float] = dataclasses.field(default_factory=list)
    aux_scales: list[float] = dataclasses.field(default_factory=list)
    results: dict[int, tuple[float, dict]] = dataclasses.field(default_factory=dict)


class PipelineRunner(Runner):
    """Runs micro-batches through this rank's pipeline stages with a torch.distributed.pipelining schedule
    (train) or a forward-only p2p sweep (`forward_batch`)."""

    def __init__(self, model: nn.Module, *, logprob_chunk_size: int = 4096, **kw) -> None:
        super().__init__(model, logprob_chunk_size=logprob_chunk_size, **kw)
        self.info: PipelineInfo = model.pipeline
        self.layout = self.info.layout
        self.pp_size = dist.get_world_size(self.info.group)
        self.pp_rank = dist.get_rank(self.info.group)
        self._schedules: dict[tuple[int, int], Any] = {}
        self._step: _Step | None = None
        self._cur: list[int | None] = [None] * len(self.info.stages)
        for k, stage in enumerate(self.info.stages):
            # read the index first, while it is still a CPU tensor (FSDP's root pre-forward moves inputs to the
            # device, and reading it there would sync), then swap it for the packed metadata
            stage.register_forward_pre_hook(self._index_hook(k), with_kwargs=True, prepend=True)
            stage.register_forward_pre_hook(self._pre_hook(k), with_kwargs=True)
            stage.register_forward_hook(self._post_hook(k))

    def _prepare(self, mbs: list[PackedBatch], want_entropy: bool) -> _Step:
        # Stages compute only each micro-batch's own tokens (padded to a multiple of tp, exactly as FlatRunner) and
        # zero-fill the rest of the static [L] buffers, so padding never reaches attention, MoE routing or the loss.
        packed, ids = [], []
        for mb in mbs:
            ids_T, cu = pad_packed(mb.input_ids.to(self.device), mb.cu_seqlens.to(self.device), self.pad_multiple)
            packed.append(pack_inputs(ids_T, None, cu))
            ids.append(ids_T)
        multiple = _PAD_BUCKET * self.pad_multiple
        L = -(-max(x.shape[0] for x in ids) // multiple) * multiple
        ids_ML = torch.stack([torch.cat([x, x.new_zeros(L - x.shape[0])]) for x in ids])
        return _Step(mbs, packed, [next_token_labels(x) for x in ids], ids_ML, want_entropy)

    # -- stage hooks ----------------------------------------------------------------------------------
    def _index_hook(self, k: int):
        def hook(module, args, kwargs):
            if "pp_mb" in kwargs:
                self._cur[k] = int(kwargs["pp_mb"].reshape(-1)[0])
        return hook

    @property
    def _current(self) -> _Step:
        """The step being run (hooks and losses are called only inside forward_backward_all / forward_all)."""
        st = self._step
        assert st is not None, "pipeline hook outside a step"
        return st

    def _pre_hook(self, k: int):
        def hook(module, args, kwargs):
            if "pp_mb" not in kwargs:
                return None
            i = self._cur[k]
            st = self._current
            packed = st.packed[i]
            x = args[0]
            if x.is_floating_point():  # hidden states from the previous stage: this micro-batch's rows only
                packed = dataclasses.replace(packed, tokens=x[:packed.tokens.shape[0] // self.info.tp])
            new = {"packed": packed}
            if module.output is not None:
                new["logprobs"] = LogprobRequest(st.labels[i], want_entropy=st.want_entropy, chunk_size=self.chunk)
            return (x,), new
        return hook

    def _post_hook(self, k: int):
        sid = self.layout.stage_ids[k]
        last = self.layout.is_last(sid)

        def hook(module, args, output):
            i, self._cur[k] = self._cur[k], None
            if i is None:
                return None
            L = self._current.ids_ML.shape[1]
            if last:
                out = tuple(_pad_rows(o.float(), L) for o in output) if isinstance(output, tuple) else (
                    _pad_rows(output.float().reshape(-1), L))
            else:
                out = _pad_rows(output.to(self.info.act_dtype), L // self.info.tp)
            aux = module.moe_aux_loss() if torch.is_grad_enabled() else None
            st = self._current
            if aux is not None and st.aux_scales and st.aux_scales[i] != 0.0:
                if isinstance(out, tuple):
                    out = (_AddAuxGrad.apply(out[0], aux, st.aux_scales[i]), *out[1:])
                else:
                    out = _AddAuxGrad.apply(out, aux, st.aux_scales[i])
            return out
        return hook

    def _token_outputs(self, out: Any, i: int) -> dict[str, torch.Tensor]:
        st = self._current
        T, cu = st.mbs[i].num_tokens, st.packed[i].cu_seqlens
        Tp = st.packed[i].tokens.shape[0]
        if self.head == "value":
            return {"values": out.reshape(-1)[:T]}
        lp, ent = out
        res = {"logprobs": shift_to_tokens(lp[:Tp], cu)[:T]}
        if st.want_entropy:
            res["entropy"] = shift_to_tokens(ent[:Tp], cu)[:T]
        return res

    # -- train ----------------------------------------------------------------------------------------
    def _loss(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        i = int(target.reshape(-1)[0])
        st = self._current
        res = st.loss_fn(self._token_outputs(out, i), st.mbs[i])
        loss, stats = res if isinstance(res, tuple) else (res, {})
        st.results[i] = (float(loss.detach()), {k: float(v) for k, v in stats.items()})
        return loss * st.scales[i]

    def _schedule(self, L: int, M: int):
        key = (L, M)
        if key not in self._schedules:
            from archon_parallel.pipeline import build_schedule, validate_microbatches
            from torch.distributed.pipelining import PipelineStage

            validate_microbatches(self.layout.schedule, M, self.pp_size, len(self.info.stages))
            if len(self._schedules) >= 4:
                self._schedules.clear()
            stages = [PipelineStage(mod, sid, self.layout.num_stages, self.device, input_args=self._in_meta(sid, L),
                                    output_args=self._out_meta(sid, L), group=self.info.group)
                      for sid, mod in zip(self.layout.stage_ids, self.info.stages)]
            self._schedules[key] = build_schedule(self.layout.schedule, stages, M, self._loss)
        return self._schedules[key]

    def _hidden_meta(self, L: int) -> torch.Tensor:
        # requires_grad: torch >= 2.12 sizes recv buffers (and whether they track grads) from this metadata
        return torch.empty(L // self.info.tp, self.model.args.dim, dtype=self.info.act_dtype, device="meta",
                           requires_grad=True)

    def _in_meta(self, sid: int, L: int) -> torch.Tensor:
        if self.layout.is_first(sid):
            return torch.empty(1, L, dtype=torch.long, device="meta")
        return self._hidden_meta(L)

    def _out_meta(self, sid: int, L: int):
        if not self.layout.is_last(sid):
            return self._hidden_meta(L)
        v = torch.empty(L, dtype=torch.float32, device="meta", requires_grad=True)
        return v if self.head == "value" else (v, v.clone())

    def forward_backward_all(self, mbs: list[PackedBatch], loss_fn, scales: list[float], aux_scales: list[float]
                             ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        st = self._step = self._prepare(mbs, want_entropy=True)
        st.loss_fn, st.scales, st.aux_scales = loss_fn, list(scales), list(aux_scales)
        M, L = st.ids_ML.shape
        schedule = self._schedule(L, M)
        owns_first = any(self.layout.is_first(s) for s in self.layout.stage_ids)
        owns_last = any(self.layout.is_last(s) for s in self.layout.stage_ids)
        args = (st.ids_ML,) if owns_first else ()
        extra = {"target": torch.arange(M), "losses": []} if owns_last else {}
        with self.autocast():
            schedule.step(*args, pp_mb=torch.arange(M), **extra)
        mine = [st.results.get(i) for i in range(M)] if owns_last else None
        results = self._from_last_stage(mine)
        self._step = None
        return [(torch.tensor(loss), stats) for loss, stats in results]

    def forward_backward(self, mb: PackedBatch, loss_fn, scale: float, aux_scale: float, want_entropy: bool = True):
        raise RuntimeError("a pipeline runs all micro-batches of a step together; call forward_backward_all")

    # -- forward only ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_all(self, mbs: list[PackedBatch], want_entropy: bool) -> list[dict[str, torch.Tensor]]:
        """Forward every micro-batch through the stages (micro-batch-major order, async sends so ranks
        overlap), then broadcast the last stage's per-token outputs [M, L] over the pp group."""
        st = self._step = self._prepare(mbs, want_entropy)
        M, L = st.ids_ML.shape
        layout, group = self.layout, self.info.group
        local = dict(zip(layout.stage_ids, self.info.stages))
        last_sid = layout.num_stages - 1
        outs: list[Any] = [None] * M
        sends = []
        with self.autocast():
            for i in range(M):
                carry = None
                for sid in range(layout.num_stages):
                    if sid not in local:
                        continue
                    if layout.is_first(sid):
                        x = st.ids_ML[i:i + 1]
                    elif layout.owner[sid - 1] == self.pp_rank:
                        x = carry
                    else:
                        x = torch.empty_like(self._hidden_meta(L), device=self.device)
                        dist.recv(x, src=dist.get_global_rank(group, layout.owner[sid - 1]), group=group)
                    y = local[sid](x, pp_mb=torch.tensor([i]))
                    if sid == last_sid:
                        outs[i] = y
                    elif layout.owner[sid + 1] == self.pp_rank:
                        carry = y
                    else:
                        y = y.contiguous()
                        sends.append((y, dist.isend(y, dst=dist.get_global_rank(group, layout.owner[sid + 1]),
                                                    group=group)))
        for _, work in sends:
            work.wait()
        src = dist.get_global_rank(group, layout.owner[last_sid])
        width = 1 if self.head == "value" else 2
        buf = torch.empty(width, M, L, dtype=torch.float32, device=self.device)
        if layout.owner[last_sid] == self.pp_rank:
            for i, y in enumerate(outs):
                for j, t in enumerate(y if isinstance(y, tuple) else (y,)):
                    buf[j, i] = t.reshape(-1)
        dist.broadcast(buf, src=src, group=group)
        res = [self._token_outputs(buf[0, i] if width == 1 else (buf[0, i], buf[1, i]), i) for i in range(M)]
        self._step = None
        return res

    def forward(self, mb: PackedBatch, want_entropy: bool) -> dict[str, torch.Tensor]:
        return self.forward_all([mb], want_entropy)[0]

    def _from_last_stage(self, results: list | None) -> list:
        """The last stage's per-micro-batch (loss, stats) on every pp rank."""
        holder = [results]
        src = dist.get_global_rank(self.info.group, self.layout.owner[self.layout.num_stages - 1])
        dist.broadcast_object_list(holder, src=src, group=self.info.group,
                                   device=self.device if self.device.type == "cuda" else None)
        got = holder[0]
        assert got is not None  # the last stage's list, broadcast to every pp rank
        return got


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-fill `x` along dim 0 up to `rows` (a stage's static output shape)."""
    pad = rows - x.shape[0]
    return x if pad == 0 else torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
