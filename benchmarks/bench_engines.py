"""Generation engines side by side: `extract`'s generation stage with transformers and with vLLM.

Same model, dtype, chats (the trait's pos/neg system prompts x extraction questions), greedy decoding and
token budget; each engine is timed after a warm-up call. Also a steered layer sweep (the same chats under
three coefficients): transformers runs one coefficient at a time, vLLM mixes them in one batch.

Usage (needs the vLLM environment): make bench-vllm, or
  .venv-vllm/bin/python benchmarks/bench_engines.py [--model qwen2.5-coder-0.5b] [--questions 4] [--tokens 64]

`--modes plain,compiled,compiled-steered,eager,eager-steered` instead measures vLLM's own speed against
personavec's engine modes: `plain` is vLLM compiled without personavec, `compiled` / `eager` personavec's engine
unsteered, `*-steered` with every request steered (four coefficients mixed in the batch). Every engine is loaded
at once (a process each, ~4 GB of RAM each here) and the modes are timed round-robin, `--repeats` rounds. Default
there: 32 prompts x 128 greedy tokens (`--prompts`, `--tokens`), the shipped vector's layer. Every answer is
exactly `--tokens` long (EOS ignored), so every mode does the same work: counting the tokens of answers that stop
where they like would rate steered modes by how long their answers are, not by their speed. The engine loaded
first ran up to ~10% faster here: compare runs in both orders. `--dtype auto` (default) is bf16 on a GPU or a
CPU with native bf16 matmuls, else fp32; `--ops` / `--declare-layers` choose the ops compiled engines carry.
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
from personavec.backends.base import Steering
from personavec.backends.vllm import VllmBackend


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


MODES = ("plain", "compiled", "compiled-steered", "eager", "eager-steered")
OPS = ("steer", "read", "capture")  # the op kinds a compiled engine can be loaded with
COEFS = (-0.5, -0.25, 0.25, 0.5)


BENCH_KV_CACHE_BYTES = 256 << 20  # every mode alike; 32 x ~200 tokens need ~80 MB (qwen2.5-0.5b, bf16)


def mode_runner(mode: str, args):
    """Build `mode`'s engine; returns `run()` (the job: its generation seconds and tokens) and `close()`."""
    import os

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from personavec.backends.vllm import _set_environment
    from personavec.chat import prompt_text
    from personavec.models import resolve
    from personavec.shipped import load_shipped

    questions = max(1, -(-args.prompts // 10))
    chats = [item_chat(it, with_answer=False) for it in extraction_items(load_trait(args.trait), questions, 1)]
    chats = chats[: args.prompts]
    vector = load_shipped(args.model, args.trait)
    layer = vector.layer
    memory = dict(kv_cache_memory_bytes=BENCH_KV_CACHE_BYTES)
    if torch.cuda.is_available():  # the engines of all modes live at once, one process each
        memory["gpu_memory_utilization"] = 0.85 / len(args.mode_list)
    _set_environment()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if mode == "plain":
        from transformers import AutoTokenizer

        llm = LLM(model=resolve(args.model), dtype=args.dtype_name, max_model_len=2048, enable_prefix_caching=False,
                  seed=0, **memory)
        tok = AutoTokenizer.from_pretrained(resolve(args.model))
        prompts = [TokensPrompt(prompt_token_ids=tok(prompt_text(tok, c), add_special_tokens=False)["input_ids"])
                   for c in chats]
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

        def run():
            seconds, outputs = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
            return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)
        return run, llm.llm_engine.engine_core.shutdown
    declared = {}
    if mode.startswith("compiled"):  # None: the op at every layer, []: nowhere
        declared = {f"{op}_layers": None if op in args.op_list else [] for op in OPS}
        if args.declare_layers:
            declared["steer_layers"] = [layer]
    engine = VllmBackend(args.model, dtype=args.dtype, max_model_len=2048, engine_mode=mode.split("-")[0],
                         **declared, **memory)
    steerings = [Steering({layer: vector.delta(layer, COEFS[i % len(COEFS)], "norm")})
                 if mode.endswith("steered") else None for i in range(len(chats))]
    engine.generate(chats[:2], steerings[:2], max_new_tokens=4, show_progress=False)  # warm-up

    def run():
        seconds, answers = timed(lambda: engine.generate(chats, steerings, max_new_tokens=args.tokens,
                                                         show_progress=False, stop_at_eos=False))
        counted = sum(len(engine.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        if counted < 0.5 * len(chats) * args.tokens:  # text hides special tokens past EOS: a rough check
            raise RuntimeError(f"answers hold {counted} tokens, not {len(chats)} x {args.tokens}")
        return seconds, len(chats) * args.tokens  # EOS ignored: every answer is max_new_tokens long
    return run, engine.close


def mode_process(mode: str, args, conn) -> None:
    """One mode's engine in its own process: loads, says "ready", then times a run per "run" it is sent."""
    try:
        run, close = mode_runner(mode, args)
    except BaseException as exc:  # noqa: BLE001 - the parent prints it and stops
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while conn.recv() == "run":
        try:
            seconds, n_tokens = run()
        except Exception as exc:  # noqa: BLE001 - the parent prints it and stops
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            break
        conn.send(("done", n_tokens / seconds))
    close()
    conn.send(("closed", None))


def bench_modes(args) -> None:
    """Throughput of each mode on the same chats. Every mode's engine lives in its own process, all at once, and
    the timed runs go round-robin (one run at a time): this machine's speed drifts by 10-30% over minutes, so
    modes timed one after the other would compare moments, not modes. Ratios are the median of each round's."""
    import multiprocessing
    import statistics

    from personavec.shipped import load_shipped

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.mode_list = modes
    layer = load_shipped(args.model, args.trait).layer
    context = multiprocessing.get_context("spawn")
    workers = {}
    try:
        for mode in modes:  # loaded one at a time: loads and compiles must not share the cores
            parent, child = context.Pipe()
            process = context.Process(target=mode_process, args=(mode, args, child), daemon=True)
            process.start()
            kind, detail = parent.recv()
            if kind == "error":
                raise SystemExit(f"{mode}: {detail}")
            workers[mode] = (process, parent)
            print(f"{mode}: engine ready", flush=True)
        rates = {mode: [] for mode in modes}
        for round_ in range(args.repeats):
            order = modes if round_ % 2 == 0 else modes[::-1]  # no mode always runs first or last
            for mode in order:
                workers[mode][1].send("run")
                kind, rate = workers[mode][1].recv()
                if kind == "error":
                    raise SystemExit(f"{mode}: {rate}")
                rates[mode].append(rate)
            print(f"round {round_ + 1}: " + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in modes) + " tok/s", flush=True)
    finally:
        for process, conn in workers.values():
            try:
                conn.send("close")
                conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    print(f"\n{args.model}, {args.dtype}, {args.prompts} prompts x {args.tokens} greedy tokens (EOS ignored), "
          f"steering at layer {layer} (coefs {COEFS} mixed), {args.repeats} rounds, modes interleaved")
    if any(m.startswith("compiled") for m in modes):
        where = f"steer at layer {layer} only" if args.declare_layers else "steer at every layer"
        print(f"compiled engines' ops: {', '.join(args.op_list)} ({where}; the rest at every layer)")
    base = [m for m in ("plain", "eager") if m in rates]
    print(f"{'mode':<18}{'tok/s (median)':>16}" + "".join(f"{'vs ' + b:>12}" for b in base))
    for mode in modes:
        ratios = [statistics.median(a / b for a, b in zip(rates[mode], rates[other])) for other in base]
        print(f"{mode:<18}{statistics.median(rates[mode]):>16.1f}" + "".join(f"{r:>11.2f}x" for r in ratios))


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
                        help="--modes: compiled engines get the steer op only at the steered layer")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"--modes: the op kinds compiled engines are loaded with, each at every layer "
                             f"(comma-separated, from {', '.join(OPS)}; default all)")
    parser.add_argument("--repeats", type=positive, default=5,
                        help="--modes: rounds (one timed run per mode each, modes interleaved; medians count)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 where the CPU has native bf16 matmuls (AVX512-BF16/AMX) or on a GPU, else "
                             "fp32 (bf16 without them runs a slow fallback)")
    args = parser.parse_args()
    if args.dtype == "auto":
        import torch

        from personavec.models.loading import default_device, resolve_dtype

        args.dtype = "bf16" if resolve_dtype("auto", default_device()) == torch.bfloat16 else "fp32"
    args.dtype_name = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    args.op_list = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in args.op_list if op not in OPS]
    if unknown or "steer" not in args.op_list:
        raise SystemExit(f"--ops {args.ops!r}: choose from {', '.join(OPS)}, steer included")
    if args.modes:
        args.tokens = args.tokens or 128
        bench_modes(args)
        return
    args.tokens = args.tokens or 64

    chats = [item_chat(it, with_answer=False) for it in extraction_items(load_trait(args.trait), args.questions, 1)]
    model, tok = load_model(args.model, dtype=args.dtype)
    engine = VllmBackend(args.model, dtype=args.dtype, max_model_len=2048)
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
    print(f"{args.model}, {args.dtype}, {len(chats)} chats x {args.tokens} greedy tokens, layer {layer} for steering")
    print(f"{'stage':<44}{'transformers':>14}{'vllm':>10}{'speed-up':>10}")
    print(f"{'extract generation (s)':<44}{t_hf:>14.1f}{t_vllm:>10.1f}{t_hf / t_vllm:>9.2f}x")
    print(f"{'  tokens/s':<44}{tokens(hf) / t_hf:>14.0f}{tokens(vl) / t_vllm:>10.0f}")
    print(f"{f'steered sweep, {len(coefs)} coefs mixed (s)':<44}{t_hf_sweep:>14.1f}{t_vllm_sweep:>10.1f}"
          f"{t_hf_sweep / t_vllm_sweep:>9.2f}x")
    print(f"identical greedy answers: {same} of {len(chats)} (bf16 kernels differ; paths part late)")


if __name__ == "__main__":
    main()
