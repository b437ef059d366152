"""Core benchmark: vector extraction against the hardware limit and against steering-vectors.

Prints ratios measured side by side in one run, on the same chats and model:
- limit: a bare forward of the decoder stack (no hooks, no LM head), same batches;
- ours: `personavec vector` extraction (capture at every layer, all three positions, mean difference);
- peer: steering-vectors' `train_steering_vector` at its defaults (batch_size=1, last token);
- agreement: cosine between the bf16 vector and an fp32 computation at every layer;
- steering overhead in batched greedy generation.

Usage: python benchmarks/bench_core.py [--model smollm2-135m] [--chats 160] [--repeats 3]
(`make bench` installs steering-vectors with --no-deps first; it pins transformers<5 but runs on 5.)
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch

from personavec.activations import capture
from personavec.backends.hf import _batches, _pad_right
from personavec.chat import encode_chat, prompt_text, user_chat
from personavec.generate import generate
from personavec.models import decoder_stack, load_model
from personavec.steering import steer
from personavec.vecmath import cosine
from personavec.vectors import PersonaVector


def bench_chats(n: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Pos/neg chats built from the packaged data files (answers of natural, varied lengths)."""
    data = resources.files("personavec") / "data"
    rows = [json.loads(line) for line in (data / "judge_calibration.jsonl").read_text().splitlines() if line.strip()]
    demo = [json.loads(line) for line in (data / "demo_optimism.jsonl").read_text().splitlines() if line.strip()]
    chats = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
    chats += [r["messages"] for r in demo]
    while len(chats) < n:
        chats += chats
    chats = chats[:n]
    return chats[0::2], chats[1::2]


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@torch.no_grad()
def bare_forward(model, tokenizer, chats, batch_size: int) -> None:
    encoded = [encode_chat(tokenizer, c) for c in chats]
    stack = decoder_stack(model)
    for batch in _batches([len(e.input_ids) for e in encoded], batch_size, 8192):
        t = _pad_right([encoded[i] for i in batch], tokenizer.pad_token_id, "cpu")
        stack(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)


def ours(model, tokenizer, pos, neg, batch_size: int) -> PersonaVector:
    a = capture(model, tokenizer, pos, batch_size=batch_size, show_progress=False)
    b = capture(model, tokenizer, neg, batch_size=batch_size, show_progress=False)
    return PersonaVector.from_activations(a, b, model=model)


def peer(model, tokenizer, pos, neg):
    from steering_vectors import train_steering_vector

    samples = [(prompt_text(tokenizer, p[:-1]) + p[-1]["content"], prompt_text(tokenizer, n[:-1]) + n[-1]["content"])
               for p, n in zip(pos, neg)]
    return train_steering_vector(model, tokenizer, samples, show_progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chats", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()

    model, tok = load_model(args.model)  # bf16 on this CPU
    pos, neg = bench_chats(args.chats)
    chats = pos + neg
    print(f"model {args.model} ({next(model.parameters()).dtype}), {len(chats)} chats, batch size {args.batch_size}, "
          f"threads {torch.get_num_threads()}")

    bare_forward(model, tok, chats[:32], args.batch_size)  # warm-up
    t_limit = t_ours = float("inf")
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        t_limit = min(t_limit, timed(lambda: bare_forward(model, tok, chats, args.batch_size), 1)[0])
        t, vec_bf16 = timed(lambda: ours(model, tok, pos, neg, args.batch_size), 1)
        t_ours = min(t_ours, t)
    print(f"limit (bare bf16 forward, no LM head): {len(chats) / t_limit:8.1f} chats/s")
    print(f"ours  (vector extraction)            : {len(chats) / t_ours:8.1f} chats/s   ratio to limit {t_limit / t_ours:.2f}  (target >= 0.9)")

    if not args.skip_peer:
        try:
            t_peer, _ = timed(lambda: peer(model, tok, pos, neg), 1)
            print(f"peer  (steering-vectors defaults)    : {len(chats) / t_peer:8.1f} chats/s   ours/peer {t_peer / t_ours:.1f}x  (target >= 3x)")
        except ImportError:
            print("peer  skipped: pip install --no-deps steering-vectors==0.12.2 scikit-learn")

    model32, _ = load_model(args.model, dtype="fp32")
    vec_fp32 = ours(model32, tok, pos, neg, args.batch_size)
    del model32
    cos = cosine(vec_bf16.vectors[1:], vec_fp32.vectors[1:])
    print(f"agreement bf16 vs fp32 vector cosine : min {cos.min():.4f}  mean {cos.mean():.4f} over layers 1..{len(cos)}  (target >= 0.99)")

    prompts = [user_chat(q[0]["content"]) for q in pos[:16]]
    direction = vec_bf16.vectors[vec_bf16.n_layers // 2]
    gen = dict(max_new_tokens=48, batch_size=16, show_progress=False)

    def plain():
        return generate(model, tok, prompts, **gen)

    def steered():
        with steer(model, direction, vec_bf16.n_layers // 2, 0.5):
            return generate(model, tok, prompts, **gen)

    plain()  # warm-up
    t_plain, t_steer = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        t_plain.append(timed(plain, 1)[0])
        t_steer.append(timed(steered, 1)[0])
    tokens_plain = sum(len(tok(a)["input_ids"]) for a in plain())
    overhead = min(t_steer) / min(t_plain) - 1
    print(f"steering overhead, batched greedy generation: {overhead * 100:+.1f}%  "
          f"(plain {min(t_plain):.2f}s, steered {min(t_steer):.2f}s, ~{tokens_plain} tokens; target <= 3%)")


if __name__ == "__main__":
    main()
