"""Persona server throughput: plain, monitored and steered+monitored requests, measured side by side in one run.

32 concurrent clients (the official openai package) x 64 greedy tokens against `personavec serve --engine hf`
on 127.0.0.1. "monitored" reads 7 trait vectors per token; since the cost of a reading does not depend on what
the vector means, the 7 vectors are the built-in optimistic contrast vector at 7 different layers, under 7 names.

With `--engine vllm` (run in .venv-vllm) it also measures the peer: vLLM's own OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) on the same folder with the same engine settings as ours
(eager, no prefix caching, the same share of memory), plain requests, the same clients.

Usage: python benchmarks/bench_serve.py [--model smollm2-135m] [--engine hf|vllm] [--clients 32] [--tokens 64]
       [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    args = parser.parse_args()
    peer = measure_peer(args) if args.engine == "vllm" else None
    backend = load_backend(args.model, engine=args.engine, **({"max_model_len": 2048} if args.engine == "vllm" else {}))
    pos, neg = builtin_contrast()
    base, _ = contrastive_vector(backend, backend.tokenizer, pos, neg, trait="optimistic", show_progress=False)
    layers = [round(backend.n_layers * f) for f in (0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8)]
    vectors = []
    for name, layer in zip(TRAITS, layers):
        v = type(base)(vectors=base.vectors, norms=base.norms, trait=name, model=base.model,
                       fingerprint=base.fingerprint, layer=layer, coef_mode="norm")
        vectors.append(v)
    modes = {"plain": ([], None), "monitored (7 traits)": (vectors, {}),
             "steered + monitored": (vectors, {"steer": {"optimistic": 0.3}})}
    figures: dict[str, list[dict]] = {m: [] for m in modes}

    def start(served):
        service = PersonaService(backend, served, model_name=args.model, max_batch=args.clients, batch_window_s=0.3)
        return service, Server(create_app(service))

    if args.engine == "hf":  # interleaved rounds, so machine noise hits every mode alike
        running = {id(v): start(v) for v in (modes["plain"][0], vectors)}
        run(running[id(modes["plain"][0])][1], args.model, 4, 8, None)  # warm-up
        for _ in range(args.rounds):
            for mode, (served, persona) in modes.items():
                figures[mode].append(run(running[id(served)][1], args.model, args.clients, args.tokens, persona))
        stop = list(running.values())
    else:  # one engine serves one stepper at a time: the modes run one after another
        stop = []
        for mode, (served, persona) in modes.items():
            service, server = start(served)
            run(server, args.model, 4, 8, persona)  # warm-up
            figures[mode] = [run(server, args.model, args.clients, args.tokens, persona) for _ in range(args.rounds)]
            server.stop()
            service.close()
    dtype = next(backend.model.parameters()).dtype if args.engine == "hf" else backend.llm.llm_engine.vllm_config.model_config.dtype
    print(f"model {args.model}, dtype {dtype}, {args.clients} concurrent clients x {args.tokens} greedy tokens, "
          f"best of {args.rounds} rounds, engine {args.engine}")
    if peer is not None:
        print(f"{'peer: vllm api_server':22s} {peer['tok_s']:7.1f} tok/s  p50 {peer['p50']:6.2f} s  p95 {peer['p95']:6.2f} s")
    best = {m: max(r, key=lambda x: x["tok_s"]) for m, r in figures.items()}
    for mode, r in best.items():
        ratio = r["tok_s"] / best["plain"]["tok_s"]
        print(f"{mode:22s} {r['tok_s']:7.1f} tok/s  p50 {r['p50']:6.2f} s  p95 {r['p95']:6.2f} s  "
              f"x plain {ratio:.3f}  (cost {100 * (1 - ratio):+.1f}%)"
              + (f"  x peer {r['tok_s'] / peer['tok_s']:.3f}" if peer else ""))
    for service, server in stop:
        server.stop()
        service.close()


class _PeerServer:
    """vLLM's own OpenAI server in a subprocess, on a free loopback port."""

    def __init__(self, model: str):
        from test_serve import _free_port, wait_healthy

        from personavec.models import resolve

        self.port = _free_port()
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve(model),
             "--served-model-name", model, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
             "--no-enable-prefix-caching", "--max-model-len", "2048", "--gpu-memory-utilization", "0.25",
             "--dtype", "bfloat16"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, 600, 1, "vllm's api_server", exited=lambda: self.process.poll() is not None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=600)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def measure_peer(args) -> dict:
    """Before our engine loads: two engines do not fit beside each other in this machine's memory share."""
    peer = _PeerServer(args.model)
    try:
        run(peer, args.model, 4, 8, None)  # warm-up
        return max((run(peer, args.model, args.clients, args.tokens, None) for _ in range(args.rounds)),
                   key=lambda r: r["tok_s"])
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
