import math
import re

import pytest
from archon_parallel.allocation import parse_allocation
from archon_parallel.dims import ParallelDims
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VALID = [
    # text, world, (dp_replicate, dp_shard, cp, tp, pp, ep, etp), inference
    ("archon:d8", 8, (1, 8, 1, 1, 1, 1, 1), None),
    ("archon:d2p2t2c2", 16, (1, 2, 2, 2, 2, 1, 1), None),
    ("archon:d2t2e2", 4, (1, 2, 1, 2, 1, 2, 1), None),
    ("archon:d4t2e4", 8, (1, 4, 1, 2, 1, 4, 1), None),
    ("archon:d2c2e4", 4, (1, 2, 2, 1, 1, 4, 1), None),
    ("archon:r2d2", 4, (2, 2, 1, 1, 1, 1, 1), None),
    ("archon:t4", 4, (1, 1, 1, 4, 1, 1, 1), None),
    ("archon:(attn:d1p4t2c2|ffn:d1p4t1e4)", 16, (1, 1, 2, 2, 4, 4, 1), None),
    ("archon:(ffn:d2e2|attn:d4)", 4, (1, 4, 1, 1, 1, 2, 1), None),
    ("archon:(attn:d2t2|ffn:t2e2)", 4, (1, 2, 1, 2, 1, 2, 2), None),
    ("sglang:d4+archon:d4p2t2", 16, (1, 4, 1, 2, 2, 1, 1), ("sglang", {"d": 4})),
    ("vllm:d2t2+archon:d4", 4, (1, 4, 1, 1, 1, 1, 1), ("vllm", {"d": 2, "t": 2})),
    ("archon:d4 + vllm:t2", 4, (1, 4, 1, 1, 1, 1, 1), ("vllm", {"t": 2})),
    ("ARCHON:D2", 2, (1, 2, 1, 1, 1, 1, 1), None),
]


@pytest.mark.parametrize("text,world,sizes,infer", VALID)
def test_valid(text, world, sizes, infer):
    mode = parse_allocation(text)
    assert mode.train.world_size == world
    dims = ParallelDims.from_allocation(text, world)
    assert (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.pp, dims.ep, dims.etp) == sizes
    if infer is None:
        assert mode.inference is None
    else:
        assert (mode.inference.backend, mode.inference.dims) == infer


INVALID = [
    # text, column, fragment of the message
    ("", 1, "expected a backend name"),
    ("archon", 7, "expected ':'"),
    ("archon:", 8, "expected a dimension letter"),
    ("archon:d", 9, "expected a size after 'd'"),
    ("archon:d0", 9, "must be >= 1"),
    ("archon:x2", 8, "unknown dimension 'x'"),
    ("archon:dp2", 8, "unknown dimension 'dp'"),
    ("archon:d2d2", 10, "given twice"),
    ("archon:d2t2e3", 8, "ep 3 must divide"),
    ("archon:r2d1e2", 8, "ep 2 must divide"),
    ("archon:d1t2e2", 8, "ep 2 must divide d*c = 1"),
    ("torch:d2", 1, "unknown backend 'torch'"),
    ("sglang:d2", 10, "no archon part"),
    ("archon:d2+archon:d2", 11, "appears twice"),
    ("sglang:d2+vllm:d2+archon:d2", 11, "more than one inference part"),
    ("archon:d2 t", 12, "expected a size after 't'"),
    ("archon:d2)", 10, "expected '+' or end of string"),
    ("archon:d2#", 10, "unexpected character '#'"),
    ("archon:(attn:d2", 16, "expected '|' or ')'"),
    ("archon:(attn:d2)", 16, "'ffn' is missing"),
    ("archon:(attn:d2|attn:d2)", 17, "appears twice"),
    ("archon:(moe:d2|attn:d2)", 9, "expected 'attn' or 'ffn'"),
    ("archon:(attn:d2e2|ffn:e2)", 16, "unknown dimension 'e' in the attn section"),
    ("archon:(attn:d2|ffn:c2)", 21, "unknown dimension 'c' in the ffn section"),
    ("archon:(attn:d4|ffn:e2)", 17, "ffn world size 2 differs from attn world size 4"),
    ("archon:(attn:d2p2|ffn:d2e2)", 19, "ffn pp 1 differs from attn pp 2"),
    ("archon:(attn:r4|ffn:e4)", 17, "must divide attn d*c*t"),
    ("vllm:x2+archon:d2", 6, "unknown dimension 'x' in the vllm part"),
    ("sglang:(attn:d2|ffn:d2)+archon:d2", 8, "expected a dimension letter"),
]


@pytest.mark.parametrize("text,col,fragment", INVALID)
def test_invalid_names_column(text, col, fragment):
    with pytest.raises(ValueError) as info:
        parse_allocation(text)
    msg = str(info.value)
    assert f"column {col}:" in msg, msg
    assert fragment in msg, msg
    # the caret line points at the same column
    caret_line = msg.splitlines()[-1]
    assert caret_line.index("^") - 2 == col - 1


def test_from_allocation_world_size_mismatch():
    with pytest.raises(ValueError, match="needs 8 ranks but the world size is 4"):
        ParallelDims.from_allocation("archon:d8", 4)


def test_parallel_dims_validation():
    assert ParallelDims(tp=2, world_size=8).dp_shard == 4
    with pytest.raises(ValueError, match="does not equal the world size"):
        ParallelDims(dp_shard=2, tp=2, world_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims(tp=3, world_size=8)
    with pytest.raises(ValueError, match="ep 4 must divide dp_shard\\*cp = 2"):
        ParallelDims(dp_replicate=2, dp_shard=2, ep=4, world_size=4)
    with pytest.raises(ValueError, match="ep\\*etp = 4 must divide"):
        ParallelDims(dp_replicate=2, dp_shard=2, ep=4, world_size=4, hybrid=True)
    with pytest.raises(ValueError, match="etp 2 must be 1"):
        ParallelDims(dp_shard=4, etp=2, world_size=4)
    dims = ParallelDims(dp_shard=2, tp=2, ep=2, world_size=4)
    assert dims.edp == 1 and dims.ep_rep == 2 and dims.dp_cp == 2 and dims.tp_enabled and not dims.cp_enabled
    dims = ParallelDims(dp_replicate=2, dp_shard=4, tp=2, ep=2, etp=2, world_size=16)
    assert dims.edp == 4 and dims.ep_rep == 1


def test_world_size_one_needs_no_process_group():
    dims = ParallelDims.from_allocation("archon:d1", 1)
    meshes = dims.build_meshes("cpu")
    assert meshes["dp"] is None and meshes.group("tp") is None
    assert dims.build_meshes("cpu") is meshes
    assert not (dims.dp_enabled or dims.tp_enabled or dims.fsdp_enabled)


# ---- fuzzing -------------------------------------------------------------------------------------

_ALPHABET = "archonsglvmtfpeidx0123456789:+()| #"
_PIECES = ["archon", "sglang", "vllm", ":", "+", "(", ")", "|", "attn", "ffn", "d", "r", "p", "t", "c", "e",
           "x", "2", "4", "1", "0", "3", "16", " "]


def _check(text: str) -> None:
    try:
        mode = parse_allocation(text)
    except ValueError as err:
        msg = str(err)
        assert re.search(r"at column \d+: .+", msg), msg
        col = int(re.search(r"column (\d+)", msg).group(1))
        assert 1 <= col <= len(text) + 1
        return
    train = mode.train
    world = train.world_size
    assert world == math.prod(v for k, v in train.attn.items() if k != "e")
    if train.ffn is not None:
        assert math.prod(train.ffn.values()) == world
    dims = ParallelDims.from_allocation(text, world)  # a parsed string always gives valid dims
    assert dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp * dims.pp == world
    assert dims.edp * dims.ep * dims.ep_rep * dims.etp * dims.pp == world


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=_ALPHABET, max_size=30))
def test_fuzz_random_text(text):
    _check(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=16))
def test_fuzz_token_soup(pieces):
    _check("".join(pieces))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([v[0] for v in VALID]), st.integers(0, 40), st.sampled_from(["del", "ins", "swap"]),
       st.sampled_from(list(_ALPHABET)))
def test_fuzz_mutated_valid(text, pos, op, ch):
    pos = pos % (len(text) + 1)
    if op == "del":
        mutated = text[:pos] + text[pos + 1:]
    elif op == "ins":
        mutated = text[:pos] + ch + text[pos:]
    else:
        mutated = text[:pos] + ch + text[pos + 1:]
    _check(mutated)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list("rdptce")), st.integers(1, 8), min_size=1))
def test_fuzz_plain_dims(dims):
    _check("archon:" + "".join(f"{k}{v}" for k, v in dims.items()))


def test_docs_allocation_examples():
    import doctest
    from pathlib import Path

    doc = Path(__file__).resolve().parents[3] / "docs" / "allocation.md"
    result = doctest.testfile(str(doc), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
