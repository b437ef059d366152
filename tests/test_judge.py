"""Judge scoring math, spec parsing, cache, batched local judging (vs brute force) and calibration."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from personavec.calibration import (auroc, midpoint_threshold, read_calibration, summarize, threshold_for,
                                    warn_if_uncalibrated, write_calibration)
from personavec.errors import PersonavecError
from personavec.judge import (COHERENCE_RUBRIC, JudgeCache, LocalJudge, coherence_prompt, enumerate_digit_probs,
                              expected_score, judge_answers, parse_spec, redact, score_from_probs)
from tiny import tiny_model, tiny_tokenizer

# ------------------------------------------------------------------ pure math


def test_expected_score_and_mass_threshold():
    probs = [0.0] * 101
    probs[0], probs[100] = 0.2, 0.2
    assert expected_score(probs) == (pytest.approx(50.0), pytest.approx(0.4))
    assert score_from_probs(probs) == pytest.approx(50.0)
    assert score_from_probs(probs, refused=True) is None
    probs[100] = 0.0  # mass 0.2 < 0.25
    assert score_from_probs(probs) is None
    assert expected_score([0.0] * 101) == (None, 0.0)


def test_enumerate_digit_probs_by_hand():
    table = {"": {"8": 0.6, "9": 0.3, "x": 0.1}, "8": {"5": 0.5, " ": 0.5}, "9": {"0": 1.0}}
    probs = enumerate_digit_probs(table.get)
    # p(8) = .6*.5, p(85) = .6*.5*1 (unknown after two digits: stop), p(90) = .3
    assert probs[8] == pytest.approx(0.3) and probs[85] == pytest.approx(0.3) and probs[90] == pytest.approx(0.3)
    assert score_from_probs(probs) == pytest.approx((8 * .3 + 85 * .3 + 90 * .3) / .9)
    table = {"": {"1": 1.0}, "1": {"0": 1.0}, "10": {"0": 0.25, "<end>": 0.75}}
    probs = enumerate_digit_probs(table.get)
    assert probs[10] == pytest.approx(0.75) and probs[100] == pytest.approx(0.25) and sum(probs) == pytest.approx(1)
    # leading zeros and numbers above 100 are not numbers
    probs = enumerate_digit_probs({"": {"0": 1.0}, "0": {"7": 0.5}}.get)
    assert probs[0] == pytest.approx(0.5) and probs[7] == 0


def test_parse_spec():
    assert str(parse_spec("local:qwen2.5-coder-1.5b")) == "local:qwen2.5-coder-1.5b"
    assert parse_spec("openai:gpt-4.1-mini").kind == "openai"
    assert parse_spec("none").kind == "none"
    for bad in ("qwen", "local:", "anthropic-ish:x", ""):
        with pytest.raises(PersonavecError, match="judge spec"):
            parse_spec(bad)


def test_coherence_rubric_is_trait_free_and_brace_safe():
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC
    text = coherence_prompt("what is {answer}?", "a {question} b")
    assert "what is {answer}?" in text and "a {question} b" in text


def test_redact():
    key = "sk-proj-abcdefghijklmnop"
    assert key not in redact(f"bad key {key}", key)
    assert "abcdefgh" not in redact("Incorrect API key provided: sk-proj-***abcdefgh", key)


# ------------------------------------------------------------------ calibration math (hand-computed)


def test_auroc_by_hand():
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(3 / 4)
    assert auroc([1, 1, 0, 0], [60, 50, 50, 40]) == pytest.approx(3.5 / 4)  # a tie counts 1/2
    assert auroc([1, 0], [1, 2]) == 0.0
    assert auroc([1, 1], [1, 2]) is None


def test_midpoint_threshold_by_hand():
    assert midpoint_threshold([57, 62], [49, 52]) == pytest.approx((59.5 + 50.5) / 2)
    assert midpoint_threshold([], [1]) is None


def test_summarize_and_threshold_file(tmp_path, capsys):
    s = summarize([1, 1, 0, 0, 1], [57, 62, 49, 52, None])
    assert s["auroc"] == 1.0 and s["threshold"] == pytest.approx(55.0)
    assert s["pos_range"] == [57, 62] and s["neg_range"] == [49, 52] and s["n_unscored"] == 1
    cal = {"judge": "local:x", "traits": {"impolite": s, "evil": summarize([1, 0, 1, 0], [50, 60, 70, 40])}}
    write_calibration(tmp_path / "cal.json", cal)
    back = read_calibration(tmp_path / "cal.json")
    assert back == json.loads(json.dumps(cal))
    assert threshold_for(back, "impolite") == pytest.approx(55.0) and threshold_for(back, "humorous") == 50.0
    assert warn_if_uncalibrated("local:x", "impolite", back) is False
    assert warn_if_uncalibrated("local:x", "evil", back) is True  # AUROC 3/4 < 0.8
    assert "AUROC 0.75 < 0.8" in capsys.readouterr().err
    assert warn_if_uncalibrated("local:x", "humorous", back) is True
    assert warn_if_uncalibrated("local:x", "impolite", None) is True
    assert warn_if_uncalibrated("local:y", "impolite", back) is True  # made with another judge
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PersonavecError, match="bad.json:1"):
        read_calibration(tmp_path / "bad.json")


# ------------------------------------------------------------------ cache


def test_cache_threads_and_persistence(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")

    def work(t):
        for i in range(25):
            cache.put(JudgeCache.key("spec", f"{t}-{i}"), {"v": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    again = JudgeCache(tmp_path / "c.sqlite")
    assert len(again) == 100 and again.get(JudgeCache.key("spec", "3-7")) == {"v": 7}


# ------------------------------------------------------------------ local judge: batched trie vs brute force


def _number_tokens(judge, k):
    node, toks = judge.trie.number.index(k), []
    while node:
        toks.append(judge.trie.token[node])
        node = judge.trie.parent[node]
    return toks[::-1]


def _brute_force(judge, prompt):
    """p(k) from full forwards of prompt + number, no cache and no padding.

    Numbers with equally many tokens share a forward (rows of equal length are independent).
    """
    ids = judge.prompt_ids(prompt)
    probs = torch.zeros(101, dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for k in range(101):
        by_length.setdefault(len(_number_tokens(judge, k)), []).append(k)
    for n, numbers in by_length.items():
        seqs = torch.tensor([ids + _number_tokens(judge, k) for k in numbers])
        with torch.no_grad():
            logp = torch.log_softmax(judge.model(seqs).logits.double(), -1)
        for row, k in enumerate(numbers):
            toks = _number_tokens(judge, k)
            seq = sum(logp[row, len(ids) - 1 + t, tok] for t, tok in enumerate(toks))
            stop = torch.logsumexp(logp[row, -1].masked_fill(judge.continues, float("-inf")), -1)
            probs[k] = (seq + stop).exp()
    return probs


PROMPTS = ["Rate this answer: fine.", "x", "A longer prompt, with more words and numbers like 12 and 85, rate it!"]


@pytest.mark.parametrize("multi_digit", [False, True])
@pytest.mark.parametrize("tree", [True, False])
def test_batched_trie_matches_brute_force(tmp_path, multi_digit, tree):
    tok = tiny_tokenizer(multi_digit)
    judge = LocalJudge(tiny_model(tok), tok, spec="local:tiny", cache=tmp_path / "c.sqlite", min_prob=0.0,
                       max_rows=17, tree=tree)
    lengths = {len(_number_tokens(judge, k)) for k in range(101)}
    assert lengths == ({1, 2, 3} if not multi_digit else {1, 2})  # "85", "10", "100" are one token with merges
    batched, refused = judge.number_probs(PROMPTS)  # left-padded; tree mask or chunked KV-copy rows
    assert refused == [False] * 3
    for i, prompt in enumerate(PROMPTS):
        exact = _brute_force(judge, prompt)
        assert exact.sum() > 0.02  # a meaningful amount of number mass to compare
        torch.testing.assert_close(batched[i], exact, rtol=1e-3, atol=1e-6)
        assert expected_score(batched[i].tolist())[0] == pytest.approx(expected_score(exact.tolist())[0], abs=1e-4)


def test_pruning_bound_and_batch_invariance(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    exact = LocalJudge(model, tok, cache=tmp_path / "a.sqlite", min_prob=0.0).number_probs(PROMPTS)[0]
    pruned = LocalJudge(model, tok, cache=tmp_path / "b.sqlite", min_prob=1e-4).number_probs(PROMPTS)[0]
    assert (pruned <= exact + 1e-9).all() and (exact - pruned).sum(-1).max() < 101 * 1e-4
    # one prompt and one branch per forward gives what the batched path gives
    one_by_one = LocalJudge(model, tok, cache=tmp_path / "c.sqlite", batch_size=1, max_rows=1, min_prob=1e-3,
                            tree=False)
    batched = LocalJudge(model, tok, cache=tmp_path / "d.sqlite", min_prob=1e-3)
    torch.testing.assert_close(one_by_one.number_probs(PROMPTS[:1])[0][0], batched.number_probs(PROMPTS)[0][0],
                               rtol=1e-3, atol=1e-7)


class _Bias:
    """Adds `prefill` to the logits of a prompt forward and `step` to those of one-token decode steps."""

    def __init__(self, model, prefill: dict[int, float], step: dict[int, float]):
        self.prefill, self.step, self.is_step = prefill, step, False
        model.register_forward_pre_hook(self.before, with_kwargs=True)
        model.lm_head.register_forward_hook(self)

    def before(self, module, args, kwargs):
        self.is_step = kwargs["input_ids"].shape[1] == 1

    def __call__(self, module, args, out):
        out = out.clone()
        for tok, value in (self.step if self.is_step else self.prefill).items():
            out[..., tok] += value
        return out


def test_local_refusal_and_confident_number(tmp_path):
    tok = tiny_tokenizer(multi_digit=True)
    model = tiny_model(tok)
    end = tok.convert_tokens_to_ids("<|end|>")
    bias = _Bias(model, {tok.convert_tokens_to_ids("85"): 100.0}, {end: 100.0})
    judge = LocalJudge(model, tok, spec="local:tiny", cache=tmp_path / "c.sqlite")
    assert judge.score(["rate"]) == [pytest.approx(85.0, abs=1e-3)]
    bias.prefill = {tok.convert_tokens_to_ids("R"): 100.0}  # "REFUSAL" starts with "R" here
    assert judge.score(["rate again"]) == [None]


def test_local_judge_answers_cached_rerun(tmp_path):
    from personavec.traits import load_trait

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    items = [("How are you?", "Fine."), ("What is 2+2?", "It is 4."), ("How are you?", "Fine.")]
    judge = LocalJudge(model, tok, spec="local:tiny", cache=tmp_path / "c.sqlite", batch_size=2)
    first = judge_answers(judge, load_trait("impolite"), items)
    assert set(first[0]) == {"trait_score", "coherence"} and first[0] == first[2]
    assert judge.stats["calls"] == 4  # 2 distinct answers x (trait + coherence)
    rerun = LocalJudge(model, tok, spec="local:tiny", cache=tmp_path / "c.sqlite")
    assert judge_answers(rerun, load_trait("impolite"), items) == first
    assert rerun.stats["calls"] == 0 and rerun.stats["cache_hits"] == 4
    # another model (another fingerprint) never reuses these entries
    other = LocalJudge(tiny_model(tok, seed=1), tok, spec="local:tiny", cache=tmp_path / "c.sqlite")
    judge_answers(other, load_trait("impolite"), items[:1])
    assert other.stats["calls"] == 2


def test_tree_matches_brute_force_llama_and_qwen2(tmp_path, tiny):
    model, tok = tiny  # conftest: 3-block random Llama and Qwen2
    judge = LocalJudge(model, tok, spec="local:tiny", cache=tmp_path / "c.sqlite", min_prob=0.0)
    batched = judge.number_probs(PROMPTS[:2])[0]
    for i, prompt in enumerate(PROMPTS[:2]):
        torch.testing.assert_close(batched[i], _brute_force(judge, prompt), rtol=1e-3, atol=1e-6)
