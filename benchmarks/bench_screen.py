"""Screening throughput: what early exit and batching buy `personavec screen --approx`.

Side by side in one run, on the same chats, model, dtype and layer, each reading
the response mean and the last prompt token at layer L and projecting them:
- naive: one chat at a time, the full causal LM with `output_hidden_states=True`
  (LM head included), the way the paper's scripts read activations;
- batched full: the same full forward, batched (right padding);
- personavec: `project_chats`, batched by length, no LM head, blocks 1..L only.
Also prints the largest disagreement between the naive and personavec scores,
and the time a few-thousand-sample dataset would take at the measured rate.

Usage: python benchmarks/bench_screen.py [--model smollm2-135m] [--chats 256] [--layer L] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_core import bench_chats, timed

from personavec.activations import _batches, _pad_right
from personavec.chat import encode_chat
from personavec.models import hidden_size, load_model, n_layers
from personavec.pipeline.project import project_chats
from personavec.vectors import PersonaVector


@torch.no_grad()
def full_forward_scores(model, tokenizer, chats, layer: int, v_hat: torch.Tensor, batch_size: int) -> torch.Tensor:
    encoded = [encode_chat(tokenizer, c) for c in chats]
    scores = torch.zeros(len(chats), 2)
    for batch in _batches([len(e.input_ids) for e in encoded], batch_size, None):
        t = _pad_right([encoded[i] for i in batch], tokenizer.pad_token_id, "cpu")
        h = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], output_hidden_states=True,
                  use_cache=False).hidden_states[layer].float()
        weights = t["response"] / t["response"].sum(1, keepdim=True)
        response = torch.einsum("bt,bth->bh", weights, h)
        last = h[torch.arange(len(batch)), t["last"]]
        scores[batch] = torch.stack([response @ v_hat, last @ v_hat], 1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chats", type=int, default=256)
    parser.add_argument("--layer", type=int, default=None, help="default: two thirds of the depth")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dataset-size", type=int, default=3000, help="size to extrapolate the time to")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    pos, neg = bench_chats(args.chats)
    chats = pos + neg
    layer = args.layer or round(2 * n_layers(model) / 3)
    vector = PersonaVector(vectors=torch.randn(n_layers(model) + 1, hidden_size(model),
                                               generator=torch.Generator().manual_seed(0)), layer=layer)
    v_hat = vector.direction(layer)
    n_tokens = sum(len(encode_chat(tokenizer, c).input_ids) for c in chats)
    print(f"{args.model} ({next(model.parameters()).dtype}), {len(chats)} chats, {n_tokens} tokens, layer {layer} of "
          f"{n_layers(model)}, {torch.get_num_threads()} threads")

    naive_chats = chats[: max(32, len(chats) // 4)]  # one at a time is slow; its rate is per chat anyway
    t_naive, naive = timed(lambda: full_forward_scores(model, tokenizer, naive_chats, layer, v_hat, 1), 1)
    t_full, _ = timed(lambda: full_forward_scores(model, tokenizer, chats, layer, v_hat, args.batch_size), args.repeats)

    def ours():
        p = project_chats(model, tokenizer, chats, vector, layer, ("response_avg", "prompt_last"),
                          batch_size=args.batch_size, show_progress=False)
        return torch.tensor([p["response_avg"], p["prompt_last"]]).T

    t_ours, scores = timed(ours, args.repeats)
    rate = {"naive (batch 1, full LM)": len(naive_chats) / t_naive,
            f"batched full LM (batch {args.batch_size})": len(chats) / t_full,
            "personavec screen --approx": len(chats) / t_ours}
    base = rate["naive (batch 1, full LM)"]
    print(f"{'method':<36}{'chats/s':>10}{'x naive':>10}{f'time for {args.dataset_size}':>18}")
    for name, r in rate.items():
        print(f"{name:<36}{r:>10.1f}{r / base:>10.2f}{time.strftime('%M:%S', time.gmtime(args.dataset_size / r)):>18}")
    print(f"personavec vs batched full LM: {rate['personavec screen --approx'] / rate[f'batched full LM (batch {args.batch_size})']:.2f}x")
    diff = (scores[: len(naive_chats)] - naive).abs().max().item()
    scale = naive.abs().mean().item()
    print(f"largest score difference from the naive reading: {diff:.4f} (mean |score| {scale:.3f})")


if __name__ == "__main__":
    main()
