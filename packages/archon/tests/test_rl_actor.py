"""PPOActor / PPOCritic against naive per-token references; minibatching; GAE + KL end to end;
training after an offload/onload round trip is bitwise identical."""

import archon
import pytest
import torch
from archon.config.fields import load_config
from archon.config.schema import ActorConfig
from archon.engine.engine import ArchonEngine
from archon.rl import PPOActor, PPOCritic, RLConfig, RLTrainer, minibatches, to_packed
from archon.rl.critic import load_backbone_from_lm
from archon.testing import hf_model, tiny_hf_config
from archon.train import sft_loss, target_tokens
from archon_rl import AdvantageConfig, PPOLossConfig, RolloutBatch, ValueLossConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    hf_model(tiny_hf_config("qwen3", vocab_size=50), seed=1).save_pretrained(d)
    return str(d)


def _rollouts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        p, r = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        ids = torch.randint(0, 50, (p + r,), generator=g)
        samples.append({"input_ids": ids, "prompt_len": p, "reward": float(torch.rand((), generator=g)),
                        "group_id": i // 2, "logprobs": torch.zeros(p + r)})
    return RolloutBatch.from_sequences(samples)


def _naive_logprobs(model, batch):
    out = []
    cu = batch.cu_seqlens.tolist()
    for i in range(batch.num_seqs):
        ids = batch.input_ids[cu[i]:cu[i + 1]]
        logp = model(ids[None])[0].float().log_softmax(-1)
        out.append(torch.cat([torch.zeros(1), logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)]))
    return torch.cat(out)


def test_actor_grads_equal_naive_ppo_loss(model_dir):
    cfg = ActorConfig(path=model_dir, dtype="float32", mb_max_tokens=14)  # several micro-batches
    eng = ArchonEngine(cfg, device="cpu").initialize()
    loss_cfg = PPOLossConfig(eps_clip=0.1, eps_clip_higher=0.15)
    actor = PPOActor(eng, loss_cfg, AdvantageConfig(estimator="grpo", group_size=2))
    batch = _rollouts()
    g = torch.Generator().manual_seed(5)
    behav_T = actor.compute_logp(batch) + 0.2 * torch.randn(batch.num_tokens, generator=g)
    batch = actor.prepare(batch.replace(logprobs=behav_T))
    assert len(eng._micro_batches(to_packed(batch))) >= 3
    eng.optimizer.zero_grad(set_to_none=True)
    eng.accumulate_grads(to_packed(batch), actor._loss_fn, actor._loss_weight)
    got = {n: p.grad.clone() for n, p in eng.model.named_parameters()}

    ref = archon.from_pretrained(model_dir)
    logp_T = _naive_logprobs(ref, batch)
    terms = []
    for t in range(batch.num_tokens):  # plain per-token PPO clip objective, token mean
        if batch.loss_mask[t]:
            ratio = torch.exp(logp_T[t] - behav_T[t])
            adv = batch.advantages[t]
            terms.append(torch.maximum(-adv * ratio, -adv * ratio.clamp(0.9, 1.15)))
    torch.stack(terms).mean().backward()
    for n, p in ref.named_parameters():
        rel = (p.grad - got[n]).norm() / p.grad.norm().clamp(min=1e-30)
        assert rel < 1e-5, f"{n}: {rel:.2e}"


def test_minibatches_partition_and_step_count(model_dir):
    batch = _rollouts(7)
    parts = minibatches(batch, 3, seed=1)
    assert [p.num_seqs for p in parts] == [3, 2, 2]
    assert sorted(t for p in parts for t in p.rewards.tolist()) == sorted(batch.rewards.tolist())
    eng = ArchonEngine(ActorConfig(path=model_dir, dtype="float32"), device="cpu").initialize()
    actor = PPOActor(eng, PPOLossConfig(), AdvantageConfig(estimator="rloo"), n_minibatches=3,
                     recompute_logprobs=True)
    batch = actor.prepare(_rollouts(6))
    stats = actor.ppo_update(batch)
    assert eng.version == 3
    assert {"clip_frac", "approx_kl", "entropy", "grad_norm"} <= set(stats)
    with pytest.raises(ValueError, match="n_minibatches must be in"):
        minibatches(batch, 7, seed=0)


def test_critic_values_are_token_aligned(model_dir):
    cfg = ActorConfig(path=model_dir, dtype="float32", init_from_scratch=True)
    eng = ArchonEngine(cfg, device="cpu", head="value").initialize()
    score = eng.model.score.weight.detach().clone()
    load_backbone_from_lm(eng.model, model_dir)  # the usual critic init: policy backbone, fresh head
    lm = archon.from_pretrained(model_dir)
    assert torch.equal(eng.model.layers["0"].attention.wq.weight, lm.layers["0"].attention.wq.weight)
    assert torch.equal(eng.model.score.weight, score)
    critic = PPOCritic(eng, ValueLossConfig())
    batch = _rollouts(3)
    got_T = critic.compute_values(batch)
    cu = batch.cu_seqlens.tolist()
    with torch.no_grad():
        for i in range(batch.num_seqs):
            ids = batch.input_ids[cu[i]:cu[i + 1]]
            assert got_T[cu[i]] == 0
            for t in range(1, len(ids)):  # value of the state in which token t is chosen: prefix ids[:t]
                want = eng.model(ids[None, :t])[0, -1]
                assert torch.allclose(got_T[cu[i] + t], want, atol=1e-5), (i, t)


def test_gae_with_critic_and_reference_kl_runs(tmp_path):
    cfg = load_config(RLConfig, "examples/grpo_tiny.yaml",
                      [f"--log.dir={tmp_path}", "--log.progress_bar=false", "--total_train_steps=2",
                       "--rl.estimator=gae", "--rl.batch_size=16", "--rl.sft_warmup_steps=2", "--rl.kl_coef=0.1"])
    trainer = RLTrainer(cfg)
    hist = trainer.run()
    assert trainer.critic is not None and trainer.critic.engine.version == 4
    assert trainer.engine.version == 2 + 4
    for key in ("critic/value_loss", "critic/returns_mean", "kl", "reward"):
        assert key in hist[-1], key
    assert hist[-1]["kl"] > 0  # KL to the (warmed-up) reference policy after the first update


def _offload_run(model_dir, device, round_trip):
    torch.manual_seed(0)
    eng = ArchonEngine(ActorConfig(path=model_dir, dtype="float32"), device=device).initialize()
    batch = to_packed(_rollouts(6)).to("cpu")
    for step in range(3):
        eng.train_batch(batch, sft_loss, target_tokens)
        if round_trip and step == 1:
            eng.offload()
            if eng.device.type == "cuda":
                assert all(p.device.type == "cpu" for p in eng.model.parameters())
            eng.onload()
    params = {n: p.detach().cpu().clone() for n, p in eng.model.named_parameters()}
    state = [v.cpu().clone() for s in eng.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return params, state


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_offload_onload_round_trip_is_bitwise_identical(model_dir, device):
    a_params, a_state = _offload_run(model_dir, device, round_trip=False)
    b_params, b_state = _offload_run(model_dir, device, round_trip=True)
    for n in a_params:
        assert torch.equal(a_params[n], b_params[n]), n
    assert len(a_state) == len(b_state) > 0
    assert all(torch.equal(x, y) for x, y in zip(a_state, b_state))


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Ops that make the host wait for the device on a GPU: scalar reads, nonzero, boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if bool_index or func in (aten._local_scalar_dense.default, aten.nonzero.default,
                                  aten.masked_select.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_cfg", [
    PPOLossConfig(eps_clip=0.1, c_clip=3.0, entropy_coef=0.01, behav_imp_weight_cap=5.0),
    PPOLossConfig(ratio_level="sequence", loss_agg="seq_mean_token_mean"),
    PPOLossConfig(kl=__import__("archon_rl").KLConfig(coef=0.1, in_reward=False), loss_agg="constant",
                  loss_norm_constant=8.0)], ids=["dual-clip-entropy-decoupled", "gspo", "kl-constant"])
def test_actor_and_critic_losses_never_read_the_device(model_dir, loss_cfg):
    """The loss functions the engine calls per micro-batch (and per DTA unit) read no device value on the host:
    on a GPU such a read would stall the step. The value-checking RolloutBatch build does read (the detector
    works); the actor's micro-batch view skips it because the batch was validated when it entered."""
    from archon.rl.convert import from_packed
    from archon_rl import PPOPolicyLoss, ValueLoss

    eng = ArchonEngine(ActorConfig(path=model_dir, dtype="float32"), device="cpu").initialize()
    actor = PPOActor(eng, loss_cfg, AdvantageConfig(estimator="grpo", group_size=2))
    g = torch.Generator().manual_seed(3)
    batch = _rollouts()
    n = batch.num_tokens
    batch = batch.replace(logprobs=torch.randn(n, generator=g) * 0.1 - 2.0, advantages=torch.randn(n, generator=g),
                          prox_logprobs=torch.randn(n, generator=g) * 0.1 - 2.0,
                          ref_logprobs=torch.randn(n, generator=g) * 0.1 - 2.0,
                          values=torch.randn(n, generator=g), returns=torch.randn(n, generator=g))
    mb = to_packed(batch)
    outputs = {"logprobs": (torch.randn(n, generator=g) * 0.1 - 2.0).requires_grad_(),
               "entropy": torch.rand(n, generator=g).requires_grad_()}
    with _HostReads() as checked:
        from_packed(mb)
    assert checked.reads, "the detector must see the validating build's host reads"
    want_loss, want_stats = PPOPolicyLoss(loss_cfg)(outputs, batch)
    with _HostReads() as hot:
        loss, stats = actor._loss_fn(outputs, mb)
        loss.backward()
        ValueLoss(ValueLossConfig(value_clip=0.2))({"values": outputs["entropy"]}, from_packed(mb, trusted=True))
    assert hot.reads == []
    torch.testing.assert_close(loss, want_loss)
    assert stats.keys() == want_stats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], want_stats[k], msg=k)
