"""Generation engines side by side: `extract`'s generation stage with transformers and with vLLM.

Same model, dtype, chats (the trait's pos/neg system prompts x extraction questions), greedy decoding and
token budget; each engine is timed after a warm-up call. Also a steered layer sweep (the same chats under
three coefficients): transformers runs one coefficient at a time, vLLM mixes them in one batch.

Usage (needs the vLLM environment): make bench-vllm, or
  .venv-vllm/bin/python benchmarks/bench_engines.py [--model qwen2.5-coder-0.5b] [--questions 4] [--tokens 64]

`--modes plain,compiled,compiled-steered,eager,eager-steered` instead measures vLLM's own speed against personavec's
engine modes, in one run, one engine at a time: `plain` is vLLM compiled without personavec, `compiled` /
`eager` personavec's engine unsteered, `*-steered` with every request steered (four coefficients mixed in the
batch). Default there: 32 prompts x 128 greedy tokens (`--prompts`, `--tokens`), the shipped vector's layer:
  .venv-vllm/bin/python benchmarks/bench_engines.py --modes plain,compiled,compiled-steered,eager,eager-steered
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


MODES = ("plain", "compiled", "compiled-steered", "eager", "eager-steered")


def bench_modes(args) -> None:
    """Throughput of each mode on the same chats; each engine warms up first and is closed before the next."""
    import gc

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from personavec.backends.vllm import CPU_KV_CACHE_BYTES, _set_environment
    from personavec.chat import prompt_text
    from personavec.models import resolve
    from personavec.shipped import load_shipped

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    questions = max(1, -(-args.prompts // 10))
    chats = [item_chat(it, with_answer=False) for it in extraction_items(load_trait(args.trait), questions, 1)]
    chats = chats[: args.prompts]
    vector = load_shipped(args.model, args.trait)
    layer = vector.layer
    coefs = (-0.5, -0.25, 0.25, 0.5)
    steerings = [{layer: vector.delta(layer, coefs[i % len(coefs)], "norm")} for i in range(len(chats))]
    results = {}
    for mode in modes:
        _set_environment()
        if mode == "plain":
            import os

            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm = LLM(model=resolve(args.model), dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False,
                      seed=0, **({} if torch.cuda.is_available() else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}))
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(resolve(args.model))
            prompts = [TokensPrompt(prompt_token_ids=tok(prompt_text(tok, c), add_special_tokens=False)["input_ids"])
                       for c in chats]
            params = SamplingParams(max_tokens=args.tokens, temperature=0.0)

            def run(n=None, llm=llm, prompts=prompts, params=params):
                if n:
                    return [o.outputs[0].text for o in llm.generate(prompts[:2], SamplingParams(max_tokens=n),
                                                                    use_tqdm=False)]
                return [o.outputs[0].text.strip() for o in llm.generate(prompts, params, use_tqdm=False)]
            close = lambda: llm.llm_engine.engine_core.shutdown()  # noqa: E731
        else:
            declared = {} if not args.declare_layers or not mode.startswith("compiled") else dict(
                steer_layers=[layer], read_layers=[], capture_layers=[])
            engine = VllmBackend(args.model, dtype="bf16", max_model_len=2048, engine_mode=mode.split("-")[0], **declared)
            tok = engine.tokenizer
            steer = steerings if mode.endswith("steered") else None

            def run(n=None, engine=engine, steer=steer):
                if n:
                    return generate_each(engine, tok, chats[:2], steer[:2] if steer else [None, None],
                                         max_new_tokens=n, show_progress=False)
                return generate_each(engine, tok, chats, steer or [None] * len(chats), max_new_tokens=args.tokens,
                                     show_progress=False)
            close = engine.close
        run(4)  # warm-up
        best = None
        for _ in range(args.repeats):
            seconds, answers = timed(run)
            n_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
            rate = n_tokens / seconds
            best = rate if best is None else max(best, rate)
        results[mode] = best
        print(f"{mode:<18}{best:>10.1f} tok/s", flush=True)
        close()
        del run, close
        gc.collect()
    print(f"\n{args.model}, bf16, {len(chats)} prompts x {args.tokens} greedy tokens, steering at layer {layer} "
          f"(coefs {coefs} mixed), best of {args.repeats}")
    base = [m for m in ("plain", "eager") if m in results]
    print(f"{'mode':<18}{'tok/s':>10}" + "".join(f"{'vs ' + b:>12}" for b in base))
    for mode, rate in results.items():
        print(f"{mode:<18}{rate:>10.1f}" + "".join(f"{rate / results[b]:>11.2f}x" for b in base))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--trait", default="optimistic")
    parser.add_argument("--questions", type=positive, default=4, help="extraction questions (x 5 instructions x pos/neg)")
    parser.add_argument("--tokens", type=positive, default=None, help="new tokens per answer (64; 128 with --modes)")
    parser.add_argument("--batch-size", type=positive, default=20, help="transformers batch size (extract's demo value)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--prompts", type=positive, default=32, help="--modes: prompts")
    parser.add_argument("--declare-layers", action="store_true",
                        help="--modes: compiled engines get the ops only at the steered layer (no read or capture ops)")
    parser.add_argument("--repeats", type=positive, default=1, help="--modes: timed runs per mode (best counts)")
    args = parser.parse_args()
    if args.modes:
        args.tokens = args.tokens or 128
        bench_modes(args)
        return
    args.tokens = args.tokens or 64

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
