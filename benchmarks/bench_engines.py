"""Generation engines side by side: `extract`'s generation stage with transformers and with vLLM.

Same model, dtype, chats (the trait's pos/neg system prompts x extraction questions), greedy decoding and
token budget; each engine is timed after a warm-up call. Also a steered layer sweep (the same chats under
three coefficients): transformers runs one coefficient at a time, vLLM mixes them in one batch.

Usage (needs the vLLM environment): make bench-vllm, or
  .venv-vllm/bin/python benchmarks/bench_engines.py [--model qwen2.5-coder-0.5b] [--questions 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

from personavec.generate import generate, generate_each
from personavec.models import load_model
from personavec.pipeline.contrast import builtin_contrast, contrastive_vector
from personavec.pipeline.extract import extraction_items, item_chat
from personavec.traits import load_trait
from personavec.backends.vllm import VllmBackend


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--trait", default="optimistic")
    parser.add_argument("--questions", type=int, default=4, help="extraction questions (x 5 instructions x pos/neg)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=20, help="transformers batch size (extract's demo value)")
    args = parser.parse_args()

    chats = [item_chat(it, with_answer=False) for it in extraction_items(load_trait(args.trait), args.questions, 1)]
    model, tok = load_model(args.model, dtype="bf16")
    engine = VllmBackend(args.model, dtype="bf16", max_model_len=2048)
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(model, tok, pos, neg, show_progress=False)
    layer = vector.layer
    kwargs = dict(max_new_tokens=args.tokens, batch_size=args.batch_size, show_progress=False)

    generate(model, tok, chats[:2], max_new_tokens=4, show_progress=False)  # warm-ups
    generate(engine, tok, chats[:2], max_new_tokens=4, show_progress=False)
    t_hf, hf = timed(lambda: generate(model, tok, chats, **kwargs))
    t_vllm, vl = timed(lambda: generate(engine, tok, chats, **kwargs))

    coefs = (-0.5, 0.0, 0.5)
    deltas = {c: ({layer: vector.delta(layer, c, "norm")} if c else None) for c in coefs}
    sweep_chats = chats * len(coefs)
    sweep_deltas = [deltas[c] for c in coefs for _ in chats]
    t_hf_sweep, _ = timed(lambda: generate_each(model, tok, sweep_chats, sweep_deltas, **kwargs))
    t_vllm_sweep, _ = timed(lambda: generate_each(engine, tok, sweep_chats, sweep_deltas, **kwargs))

    tokens = lambda answers: sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)  # noqa: E731
    same = sum(a == b for a, b in zip(hf, vl))
    print(f"{args.model}, bf16, {len(chats)} chats x {args.tokens} greedy tokens, layer {layer} for steering")
    print(f"{'stage':<44}{'transformers':>14}{'vllm':>10}{'speed-up':>10}")
    print(f"{'extract generation (s)':<44}{t_hf:>14.1f}{t_vllm:>10.1f}{t_hf / t_vllm:>9.2f}x")
    print(f"{'  tokens/s':<44}{tokens(hf) / t_hf:>14.0f}{tokens(vl) / t_vllm:>10.0f}")
    print(f"{f'steered sweep, {len(coefs)} coefs mixed (s)':<44}{t_hf_sweep:>14.1f}{t_vllm_sweep:>10.1f}"
          f"{t_hf_sweep / t_vllm_sweep:>9.2f}x")
    print(f"identical greedy answers: {same} of {len(chats)} (bf16 kernels differ; paths part late)")


if __name__ == "__main__":
    main()
