"""Persona server throughput: plain, monitored and steered+monitored requests, measured side by side in one run.

32 concurrent clients (the official openai package) x 64 greedy tokens against `personavec serve --engine hf`
on 127.0.0.1. "monitored" reads 7 trait vectors per token; since the cost of a reading does not depend on what
the vector means, the 7 vectors are the built-in optimistic contrast vector at 7 different layers, under 7 names.

Usage: python benchmarks/bench_serve.py [--model smollm2-135m] [--clients 32] [--tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_serve import Server  # noqa: E402  (a real uvicorn server in a thread)

from personavec.backends import load_backend  # noqa: E402
from personavec.pipeline.contrast import builtin_contrast, contrastive_vector  # noqa: E402
from personavec.serve.app import create_app  # noqa: E402
from personavec.serve.service import PersonaService  # noqa: E402

TRAITS = ["optimistic", "sycophantic", "evil", "humorous", "impolite", "apathetic", "hallucinating"]
QUESTIONS = ["How was your day?", "What do you think of Mondays?", "Is the weather nice?", "Tell me a story.",
             "What should I cook tonight?", "Describe your ideal city.", "How do I learn piano?", "Any advice?"]


def run(server: Server, model: str, clients: int, tokens: int, persona: dict | None) -> dict:
    client = server.client()

    def one(i):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=tokens,
            temperature=0, extra_body={"persona": persona} if persona else None)
        return time.perf_counter() - start, reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    generated = sum(r[1] for r in results)
    return {"tok_s": generated / wall, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "tokens": generated}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    backend = load_backend(args.model)
    pos, neg = builtin_contrast()
    base, _ = contrastive_vector(backend, backend.tokenizer, pos, neg, trait="optimistic", show_progress=False)
    layers = [round(backend.n_layers * f) for f in (0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8)]
    vectors = []
    for name, layer in zip(TRAITS, layers):
        v = contrastive_vector(backend, backend.tokenizer, pos, neg, trait=name, show_progress=False)[0]
        v.layer, v.coef_mode = layer, "norm"
        vectors.append(v)
    plain_service = PersonaService(backend, [], model_name=args.model, max_batch=args.clients, batch_window_s=0.3)
    monitored_service = PersonaService(backend, vectors, model_name=args.model, max_batch=args.clients,
                                       batch_window_s=0.3)
    plain, monitored = Server(create_app(plain_service)), Server(create_app(monitored_service))
    modes = {"plain": (plain, None), "monitored (7 traits)": (monitored, {}),
             "steered + monitored": (monitored, {"steer": {"optimistic": 0.3}})}
    run(plain, args.model, 4, 8, None)  # warm-up
    figures: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved rounds, so machine noise hits every mode alike
        for mode, (server, persona) in modes.items():
            figures[mode].append(run(server, args.model, args.clients, args.tokens, persona))
    print(f"model {args.model}, dtype {next(backend.model.parameters()).dtype}, {args.clients} concurrent clients x "
          f"{args.tokens} greedy tokens, best of {args.rounds} interleaved rounds, engine hf")
    best = {m: max(r, key=lambda x: x["tok_s"]) for m, r in figures.items()}
    for mode, r in best.items():
        ratio = r["tok_s"] / best["plain"]["tok_s"]
        print(f"{mode:22s} {r['tok_s']:7.1f} tok/s  p50 {r['p50']:6.2f} s  p95 {r['p95']:6.2f} s  "
              f"x plain {ratio:.3f}  (cost {100 * (1 - ratio):+.1f}%)")
    for server in (plain, monitored):
        server.stop()
    plain_service.close()
    monitored_service.close()


if __name__ == "__main__":
    main()
