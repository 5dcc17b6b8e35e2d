"""A wrong parallel or RL config fails in `resolve_setup` / `resolve_rl_setup`, before any process group, device
mesh or model exists; a good one resolves to the same dims, dtype and HF config the engine then uses."""

import pytest
import torch
import torch.distributed as dist
from archon.config.fields import load_config
from archon.config.schema import ActorConfig
from archon.engine.dp_layout import FsdpLayout, Zero1Layout, make_dp_layout
from archon.engine.engine import ArchonEngine
from archon.engine.setup import resolve_setup
from archon.rl import RLConfig, RLTrainer
from archon_parallel.dims import ParallelDims

EXAMPLE = "examples/grpo_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A config.json only (3 heads: no t2 split): the setup reads it, nothing loads weights."""
    from archon.testing import tiny_hf_config

    d = tmp_path_factory.mktemp("qwen3_cfg")
    tiny_hf_config("qwen3", vocab_size=64, num_attention_heads=3, num_key_value_heads=3).save_pretrained(d)
    return str(d)


@pytest.fixture
def no_distributed_or_model(monkeypatch):
    """Launched as rank 0 of 2 (torchrun's environment), with every way to create a process group, a device mesh
    or a model turned into a failure: a config error must be raised before any of them is reached."""
    import archon.engine.build as build
    import archon.hf as hf
    import archon_parallel.dims as dims_mod

    calls = []

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called before the config was rejected")
        return f

    for var, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(dist, "init_process_group", forbidden("init_process_group"))
    monkeypatch.setattr(dims_mod.ParallelDims, "build_meshes", forbidden("build_meshes"))
    monkeypatch.setattr(hf, "build_model", forbidden("build_model"))
    monkeypatch.setattr(build, "build_model", forbidden("build_model"))
    yield calls
    assert calls == [], calls


def _rl(tmp_path, *overrides):
    return load_config(RLConfig, EXAMPLE, [f"--log.dir={tmp_path}", "--log.progress_bar=false", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["--allocation_mode=archon:d2"], "set actor.archon.dp_layout=zero1"),  # FSDP2 shards what the sampler needs
    (["--allocation_mode=archon:t2", "--actor.archon.dp_layout=zero1"], "rule zero1-pure-dp"),
    (["--allocation_mode=archon:d2", "--actor.archon.dp_layout=zero1", "--critic.archon.dp_layout=zero1",
      "--rl.batch_size=6", "--rl.group_size=2"], "3 prompts per step must be divisible by the 2"),
    (["--allocation_mode=archon:d4", "--actor.archon.dp_layout=zero1"], "needs 4 ranks but the world size is 2"),
])
def test_wrong_rl_config_fails_before_process_group_or_model(tmp_path, no_distributed_or_model, overrides,
                                                            message):
    cfg = _rl(tmp_path, *overrides)
    with pytest.raises(ValueError, match=message):
        RLTrainer(cfg)


def test_wrong_critic_layout_fails_before_the_actor_is_built(tmp_path, no_distributed_or_model):
    cfg = _rl(tmp_path, "--allocation_mode=archon:d2", "--actor.archon.dp_layout=zero1", "--rl.estimator=gae")
    with pytest.raises(ValueError, match="set critic.archon.dp_layout=zero1"):
        RLTrainer(cfg)


@pytest.mark.parametrize("allocation, archon, message", [
    ("archon:d1t2", {"dp_layout": "zero1"}, "rule zero1-pure-dp"),
    ("archon:d2", {"offload_params": True, "dp_layout": "zero1"}, "rule offload-needs-fsdp"),
    ("archon:p2", {"pp_schedule": "NoSuchSchedule"}, "pp_schedule"),
    ("archon:t2", {}, "heads"),  # 3 attention heads do not split over t2: a rule on the HF config
])
def test_wrong_parallel_config_fails_before_process_group_or_model(tiny_model_dir, no_distributed_or_model,
                                                                  allocation, archon, message):
    from archon.config.schema import ArchonEngineConfig

    cfg = ActorConfig(path=tiny_model_dir, archon=ArchonEngineConfig(**archon))
    with pytest.raises(ValueError, match=message):
        ArchonEngine(cfg, allocation_mode=allocation, device="cpu")


def test_setup_reads_the_hf_config_once_and_resolves_the_layout(tiny_model_dir, monkeypatch):
    import archon.hf as hf

    reads = []
    real = hf.load_hf_config
    monkeypatch.setattr(hf, "load_hf_config", lambda p: reads.append(p) or real(p))
    from archon.config.schema import ArchonEngineConfig

    cfg = ActorConfig(path=tiny_model_dir, dtype="bfloat16", archon=ArchonEngineConfig(ac_mode="full"))
    setup = resolve_setup(cfg, allocation_mode="archon:d2p2", world_size=4, device="cpu")
    assert reads == [tiny_model_dir]  # the pipeline rules (layers, tied embeddings) reuse that one read
    assert (setup.dims.dp_shard, setup.dims.pp, setup.world_size) == (2, 2, 4)
    assert setup.dtype == torch.bfloat16 and setup.hf_config.num_hidden_layers == real(tiny_model_dir).num_hidden_layers
    assert setup.mb_max_tokens == cfg.mb_max_tokens
    dims = ParallelDims.from_allocation("archon:d2", 2)
    assert isinstance(make_dp_layout("zero1", dims, group=None), Zero1Layout)
    fsdp = make_dp_layout("fsdp", dims, group=object())
    assert isinstance(fsdp, FsdpLayout) and fsdp.loss_scale_world() == 2 and not fsdp.needs_autocast(torch.bfloat16)


@pytest.mark.parametrize("allocation, world, archon, plan", [
    ("archon:d1", 1, {}, [[0, 1], [2, 3]]),  # flat: 10 tokens per micro-batch
    ("archon:c2", 2, {"cp_impl": "ring"}, [[0, 1, 2, 3]]),  # cp2: 20 tokens, split over the 2 cp ranks
    ("archon:p2", 2, {"pp_microbatches": 3}, [[0], [1], [2], [3]]),  # >= 3 micro-batches, a multiple of p
    ("archon:d1", 1, {"tree_training_mode": "sparse"}, [[0, 1, 2], [3]]),  # 4 + 3 x 1 tree tokens, then 5
])
def test_mb_max_tokens_is_tokens_of_one_micro_batch_on_one_rank(tiny_model_dir, allocation, world, archon, plan):
    """Every runner's conversion of mb_max_tokens is made by `EngineSetup.micro_batches` (no process group):
    four 5-token sequences, three sharing a 4-token prefix, under a budget of 10 tokens."""
    from archon.config.schema import ArchonEngineConfig
    from archon.engine.batch import PackedBatch

    cfg = ActorConfig(path=tiny_model_dir, dtype="float32", mb_max_tokens=10, archon=ArchonEngineConfig(**archon))
    setup = resolve_setup(cfg, allocation_mode=allocation, world_size=world, device="cpu")
    batch = PackedBatch.from_sequences([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 7], [9, 9, 9, 9, 9]])
    got = setup.micro_batches.plan(batch)
    assert sorted(got, key=lambda mb: mb[0] if mb else 99) == plan
    # the count agreed over data-parallel ranks (one more here); a pipeline rounds it up to a multiple of p
    more = setup.micro_batches.plan(batch, num_micro_batches=len(plan) + 1)
    assert len(more) == len(plan) + (1 if setup.dims.pp == 1 else 2)
    assert sorted(i for mb in more for i in mb) == [0, 1, 2, 3]
    assert setup.micro_batches.pad_to_tokens is None


def test_pad_to_maximum_pads_to_mb_max_tokens(tiny_model_dir):
    from archon.config.schema import ArchonEngineConfig

    cfg = ActorConfig(path=tiny_model_dir, dtype="float32", mb_max_tokens=48,
                      archon=ArchonEngineConfig(pad_to_maximum=True))
    assert resolve_setup(cfg, device="cpu", world_size=1).micro_batches.pad_to_tokens == 48


@pytest.mark.parametrize("overrides, message", [
    (["--allocation_mode=archon:d2", "--actor.archon.dp_layout=zero1", "--actor.archon.offload_params=true"],
     "rule offload-needs-fsdp"),
    (["--allocation_mode=archon:d1t2", "--actor.archon.dp_layout=zero1"], "rule zero1-pure-dp"),
])
def test_archon_train_rejects_a_wrong_parallel_config_before_the_process_group(tmp_path, no_distributed_or_model,
                                                                               overrides, message):
    from archon.config.schema import TrainConfig
    from archon.train import run_train

    cfg = load_config(TrainConfig, "examples/sft_tiny.yaml", [f"--log.dir={tmp_path}", "--device=cpu", *overrides])
    with pytest.raises(ValueError, match=message):
        run_train(cfg)
