"""Text rewards: math_verify on hand-written answers, the reasoning-gym reward against the dataset's own
score_answer through Archon's prompt records, and the reward pool's timeout and error policy."""

import textwrap
import time

import pytest
from archon.chat import ChatFormat
from archon.data.config import TextDataConfig
from archon.data.source import quiet_import
from archon.data.text import PromptData, open_records
from archon.reward_pool import RewardPool
from archon.rewards import math_verify
from archon.rewards import reasoning_gym as rg_reward
from archon.testing import tiny_byte_tokenizer
from archon.tokenizer import load_tokenizer

MATH = [  # (response, reference answer, expected reward)
    ("The answer is \\boxed{4}.", "4", 1.0),
    ("So we get \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Therefore x = 3/4", "\\frac{3}{4}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("Expanding: $x^2+2x+1$", "(x+1)^2", 1.0),
    ("I think it is 7", "7", 1.0),
    ("\\boxed{5}", "4", 0.0),
    ("\\boxed{\\frac{2}{3}}", "3/2", 0.0),
    ("first \\boxed{3}, no wait: \\boxed{-3}", "3", 0.0),
    ("I don't know", "12", 0.0),
]


def test_math_verify_scores_hand_written_answers():
    assert [math_verify("", r, answer=a) for r, a, _ in MATH] == [w for _, _, w in MATH]
    with pytest.raises(ValueError, match="reference answer"):
        math_verify("", "\\boxed{1}")


@pytest.mark.parametrize("name, kwargs", [("basic_arithmetic", {"max_terms": 3}), ("countdown", {})])
def test_reasoning_gym_reward_equals_dataset_score_answer(tmp_path, name, kwargs):
    with quiet_import():
        import reasoning_gym
        from reasoning_gym.utils import extract_answer
    cfg = TextDataConfig(source="reasoning_gym", dataset=name, dataset_size=6, dataset_kwargs=kwargs)
    tok = load_tokenizer(tiny_byte_tokenizer(str(tmp_path)))
    data = PromptData(cfg, ChatFormat(tok, system_prompt="Answer in <answer></answer>."),
                      open_records(cfg, "", seed=5), num_prompts=6, seed=5)
    ref = reasoning_gym.create_dataset(name, size=6, seed=5, **kwargs)  # the same records, made independently
    scores = []
    for i, (_, fields) in enumerate(data.prompts):
        entry = ref[i]
        assert fields["question"] == entry["question"] and fields["answer"] == entry["answer"]
        prompt = fields.pop("prompt_text")
        for response in (f"<answer>{entry['answer']}</answer>", "<answer>17</answer>", "<answer>1 + 1</answer>",
                         f"thinking... {entry['answer']}"):
            want = ref.score_answer(extract_answer(response), entry)
            got = rg_reward(prompt, response, **fields)
            assert got == want, (response, entry)
            scores.append(got)
    assert 1.0 in scores and min(scores) < 1.0


def _reward_module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import time

        def slow_or_not(prompt, response, **fields):
            if response == "hang":
                time.sleep(600)
            if response == "boom":
                raise RuntimeError("exploded")
            if response == "text":
                return "not a number"
            return float(len(response))
    """))
    return f"{tmp_path}/my_rewards.py:slow_or_not"


def test_hanging_reward_is_cut_at_its_timeout(tmp_path):
    spec = _reward_module(tmp_path)
    with RewardPool(spec, num_workers=2, timeout_s=1.0, on_error="zero") as pool:
        assert pool([(("p", "ab"), {})]) == ([2.0], 0)  # starts the workers
        t0 = time.monotonic()
        scores, errors = pool([(("p", "hang"), {}), (("p", "abc"), {}), (("p", "boom"), {}), (("p", "text"), {}),
                               (("p", "a"), {})])
        elapsed = time.monotonic() - t0
        assert scores == [0.0, 3.0, 0.0, 0.0, 1.0] and errors == 3
        assert 1.0 <= elapsed < 1.0 + 10  # the hang costs its timeout (+ a replacement worker's start), not 600 s
        assert pool([(("p", "abcd"), {})]) == ([4.0], 0)  # the replaced worker serves on
    with RewardPool(spec, num_workers=1, timeout_s=1.0) as pool:
        with pytest.raises(ValueError, match=r"reward.fn '.*slow_or_not' did not return within reward.timeout_s=1 s "
                                             r"on sample \('p', 'hang'\)"):
            pool([(("p", "hang"), {})])


def test_reward_errors_in_process_name_function_and_sample(tmp_path):
    pool = RewardPool(_reward_module(tmp_path), on_error="raise")
    with pytest.raises(ValueError, match=r"slow_or_not' raised RuntimeError: exploded on sample \('p', 'boom'\)"):
        pool([(("p", "boom"), {})])
    with pytest.raises(ValueError, match="returned 'not a number', not a finite number"):
        pool([(("p", "text"), {})])
