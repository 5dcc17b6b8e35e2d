"""CUDA: exact resume restores the CUDA generator (dropout on GPU); skipped without a GPU."""

import pytest
import torch
from archon_ckpt import Checkpointer
from archon_ckpt.testing import full_params, make_model, make_optim, make_state, train_steps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(steps, ckpt=None, resume=False):
    torch.cuda.manual_seed(0)
    model = make_model(0, dropout=0.3).cuda()
    opt, sched = make_optim(model)
    train = {"step": 0}
    state = make_state(model, opt, sched, train)
    if resume:
        torch.cuda.manual_seed(77)  # the restore must undo this
        assert ckpt.load(state) == 3
    losses = train_steps(model, opt, sched, train, steps, device="cuda")
    if ckpt is not None and not resume:
        ckpt.save(3, state)
    return losses, full_params(model)


def test_cuda_exact_resume(tmp_path):
    ref, ref_params = _run(6)
    ckpt = Checkpointer(tmp_path)
    first, _ = _run(3, ckpt)
    second, params = _run(3, ckpt, resume=True)
    assert first + second == ref
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), k
