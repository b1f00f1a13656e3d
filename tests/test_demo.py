"""`fastgrpo demo` (issue #4): its pieces, and a shortened run in which GRPO raises the reward."""

from __future__ import annotations

import json
import random

import pytest

from fastgrpo import demo
from fastgrpo.rewards import accuracy_reward, format_reward


def _conv(text: str) -> list[list[dict]]:
    return [[{"role": "assistant", "content": text}]]


def test_splits_are_disjoint_unordered_pairs():
    train, dev, test = demo.split_pairs()
    as_sets = [{frozenset(p) for p in split} for split in (train, dev, test)]
    assert not (as_sets[0] & as_sets[1]) and not (as_sets[0] & as_sets[2]) and not (as_sets[1] & as_sets[2])
    assert len(test) == demo.N_TEST and len(dev) == demo.N_DEV and len(train) > 3000


def test_clean_target_earns_both_rewards_and_slips_do_not():
    rng = random.Random(0)
    for a, b in [(47, 38), (12, 40), (99, 99), (10, 10)]:
        row = demo.make_row(a, b, rng)
        clean = demo.target_completion(row["a"], row["b"], rng, slip_rate=0.0, format_slip_rate=0.0)
        assert format_reward(_conv(clean)) == [1.0]
        assert accuracy_reward(_conv(clean), solution=[row["solution"]]) == [1.0]
        slipped = demo.target_completion(row["a"], row["b"], rng, slip_rate=1.0, format_slip_rate=0.0)
        assert accuracy_reward(_conv(slipped), solution=[row["solution"]]) == [0.0]
        broken = demo.target_completion(row["a"], row["b"], rng, slip_rate=0.0, format_slip_rate=1.0)
        assert format_reward(_conv(broken)) == [0.0]
    assert demo.target_completion(47, 38, rng, 0.0, 0.0) == "<think>7+8=15;4+3+1=8</think><answer>\\boxed{85}</answer>"


def test_tokenizer_round_trips_the_task_without_unknown_pieces():
    tok = demo.build_demo_tokenizer()
    rng = random.Random(1)
    train, _, _ = demo.split_pairs()
    for a, b in train[:50]:
        row = demo.make_row(a, b, rng)
        text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        text += demo.target_completion(row["a"], row["b"], rng, 0.3, 0.3)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    system = tok(demo.SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]
    assert len(system) == 1  # the recipe's system prompt is one token (see the module docstring)
    assert len(tok) < 128


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    out = capsys.readouterr().out
    for option in ("--steps", "--seed", "--output-dir", "--threads", "--warmup-steps", "--target-accuracy", "--lr",
                   "--lora", "--quick"):
        assert option in out


@pytest.mark.slow
def test_quick_demo_reward_rises(tmp_path):
    """A shortened demo (~1 minute on 2 cores): mean reward of the last logged GRPO steps beats the first ones."""
    assert demo.main(["--quick", "--seed", "0", "--output-dir", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = [m for m in demo.read_metrics(str(tmp_path / "metrics.jsonl")) if "reward" in m]
    assert len(metrics) == summary["grpo_steps"] == demo.QUICK["steps"]
    k = 8
    first = sum(m["reward"] for m in metrics[:k]) / k
    last = sum(m["reward"] for m in metrics[-k:]) / k
    assert last > first + 0.05, f"reward did not rise: first {k} steps {first:.3f}, last {k} steps {last:.3f}"
    assert (tmp_path / "rewards.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint-final" / "config.json").is_file()
    assert set(summary["before"]) == {"accuracy", "format_rate", "mean_length"}


def test_output_dir_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, what in ((afile, "is a file"), (afile / "sub", f"is under {afile}, which is a file")):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(["--output-dir", str(path), "--quick"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"fastgrpo demo: error: --output-dir {str(path)!r}: {what}") and "Fix:" in err
    assert demo.parse_args(["--output-dir", str(tmp_path / "new" / "sub"), "--quick"]).output_dir.endswith("sub")
