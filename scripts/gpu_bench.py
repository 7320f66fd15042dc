"""One-go GPU check and benchmark of the fast runner (models/fast), printing a short table last.

    PYTHONPATH=src python scripts/gpu_bench.py --model /tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT
    PYTHONPATH=src python scripts/gpu_bench.py --smoke --out $OUT     # random weights, no model file needed

On this project's GPU machines (no registry, uploads of at most 64 MiB, /tmp kept only while the machine is warm),
the full run takes three steps and about 11 minutes of device time; run the two device calls back to back:

    here:   PYTHON=.venv/bin/python ../shared/tools/device-model smollm2      # -> .device-model/part1, part2
            mkdir -p .gpu_data && cp ../shared/data/spec_bench/question.jsonl .gpu_data/   # git-excluded folder
    run 1 (carry .device-model/part1):  mkdir -p /tmp/leap && cp .device-model/part1/* /tmp/leap/
    run 2 (carry .device-model/part2 and .gpu_data):
            cp .device-model/part2/* /tmp/leap/ && bash /tmp/leap/assemble.sh &&
            export PYTHONPATH=/tmp/site:$PWD/src LEAPDECODE_CACHE=/tmp/leapcache PYTHONUNBUFFERED=1 &&
            python3 scripts/gpu_bench.py --model /tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf
                --questions .gpu_data/question.jsonl --skip tiny --deadline 500 --out $OUT    (one line)

Sections (each guarded: a failure is logged and the rest still runs; everything also goes to OUT/gpu_bench.log and
OUT/results.json):
1. environment: GPU, torch, measured device-to-device copy bandwidth (the memory-bandwidth floor of a step);
2. correctness: logits of the fast runner against the Hugging Face runner (relative error) on tiny random Llama,
   Qwen2 and Gemma 3 models and on the target, through prefill, chains, trees with gathered commits and aux rows;
3. step latency against the number of scored tokens (1 .. 128) for the HF runner, the fast runner with graphs and
   without (eager), plus a 64-node tree; kernel time of one step from the profiler;
4. generation on Spec-Bench (first turn, chat template, greedy, up to --new-tokens): transformers `generate`,
   leapdecode plain decoding with the HF runner (a subset: they are slow), plain decoding with the fast runner and
   every registry drafter with the fast runner (all prompts): tokens/s, speed-up, MAT, time split (drafter, host,
   GPU), exactness against the fast runner's own plain greedy output with first-divergence positions; then the
   same exactness check with every step padded to one row bucket (FastConfig(min_rows=...)).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from leapdecode import GenerationConfig, speculate
from leapdecode.drafters.base import Draft
from leapdecode.drafters.registry import make_drafter, names
from leapdecode.models.fast import FastConfig, FastRunner
from leapdecode.models.hf import HFRunner
from leapdecode.stats import Stats

CATEGORY_ORDER = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
                  "translation", "summarization", "qa", "math_reasoning", "rag"]
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                     rope_theta=100000.0, rms_norm_eps=1e-5)
RESULTS: dict = {}
OUT_DIR = Path("out")
DEADLINE = float("inf")  # perf_counter time after which generation stops starting new prompts (--deadline)


def late() -> bool:
    return time.perf_counter() > DEADLINE


def log(*parts) -> None:
    text = " ".join(str(p) for p in parts)
    print(text, flush=True)
    logging.getLogger("gpu_bench").info(text)


def section(name):
    """Run a section; on failure log the traceback and go on with the next one."""
    def wrap(fn):
        def run(*args, **kwargs):
            log(f"\n===== {name} =====")
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception:  # a broken section must not cost the other measurements
                log(f"SECTION FAILED: {name}\n{traceback.format_exc()}")
                RESULTS.setdefault("failures", []).append(name)
            finally:
                log(f"[{name}: {time.perf_counter() - t0:.1f} s]")
                (OUT_DIR / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        return run
    return wrap


def ratio(a, b) -> float:
    return a / b if b and b == b and a == a else float("nan")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------- environment

@section("environment")
def environment(device: torch.device) -> None:
    import transformers

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        n = 1 << 30  # 2 GiB of bf16 copied: bytes read + written over time
        a = torch.randn(n, device=device, dtype=torch.bfloat16)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        sync()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        sync()
        seconds = begin.elapsed_time(end) / 1000 / 10
        env["copy_bandwidth_GBps"] = round(2 * a.numel() * 2 / seconds / 1e9)
        del a, b
        torch.cuda.empty_cache()
    RESULTS["environment"] = env
    log(json.dumps(env))


# ---------------------------------------------------------------------------------------------------- correctness

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def walk(prompt_len: int, vocab: int, seed: int = 0):
    """A prompt and a protocol walk: chain, tree with a gathered path, empty draft, aux rows, deep chain."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(vocab, (prompt_len,), generator=g).tolist()
    tok = lambda k: torch.randint(vocab, (k,), generator=g).tolist()  # noqa: E731
    aux = Draft(torch.tensor(tok(2)), torch.tensor([-1, 0]), aux_tokens=torch.tensor(tok(3)),
                aux_positions=torch.tensor([1, 2, 3]),
                aux_mask=torch.tensor([[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]], dtype=torch.bool))
    steps = [(tok(1)[0], Draft.chain(tok(3)), [0, 1]),
             (tok(1)[0], Draft.tree(tok(6), [-1, -1, 1, 2, 0, 4]), [1, 2, 3]),
             (tok(1)[0], Draft.empty(), []),
             (tok(1)[0], aux, [0]),
             (tok(1)[0], Draft.tree(tok(40), [-1] + list(range(39))), [0, 1, 2]),
             (tok(1)[0], Draft.chain(tok(9)), [])]
    return prompt, steps


def compare_runners(hf_model, prompt_len: int, label: str) -> float:
    vocab = hf_model.get_output_embeddings().weight.shape[0]
    prompt, steps = walk(prompt_len, vocab)
    hf, fast = HFRunner(hf_model), FastRunner(hf_model)
    errors = []
    for r in (hf, fast):
        r.reset()
        r.prefill(prompt[:-1])
    for root, draft, path in steps:
        a, b = hf.verify(root, draft), fast.verify(root, draft)
        errors.append(rel_err(b, a))
        hf.commit(path)
        fast.commit(path)
    worst = max(errors)
    log(f"  {label}: logits rel err per step {[f'{e:.1e}' for e in errors]}  worst {worst:.2e}  "
        f"(graphs captured: {fast.graph_count})")
    return worst


@section("correctness: tiny random models")
def correctness_tiny(device: torch.device, dtype: torch.dtype) -> None:
    from leapdecode.models.tiny import tiny_model

    out = {}
    for arch in ("llama", "qwen2", "gemma3"):
        for dt in (torch.float32, dtype):
            model = tiny_model(arch, vocab_size=256, seed=1, initializer_range=0.1)
            hf_model = model.hf_model.to(device=device, dtype=dt)
            out[f"{arch}/{str(dt)[6:]}"] = compare_runners(hf_model, 40, f"{arch} {dt}")
            if dt == dtype:
                out[f"{arch}/{str(dt)[6:]}/greedy_exact"] = greedy_equivalence_tiny(hf_model)
    RESULTS["correctness_tiny"] = out


def greedy_equivalence_tiny(hf_model) -> str:
    """Scripted drafters through speculate with the graph runner: output equals the runner's own plain greedy."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from scripted_drafters import OracleDrafter, OracleTreeDrafter, RandomDrafter

    vocab = hf_model.get_output_embeddings().weight.shape[0]
    fast = FastRunner(hf_model)
    config = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    same = total = 0
    for seed in range(3):
        prompt = torch.randint(vocab, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = [t for s in speculate(fast, prompt, None, config) for t in s]
        ref = prompt + plain
        for drafter in (RandomDrafter(ref, vocab), OracleDrafter(ref, vocab, right=3), OracleTreeDrafter(ref, vocab)):
            out = [t for s in speculate(fast, prompt, drafter, config) for t in s]
            same += out == plain
            total += 1
    log(f"    scripted drafters with graphs: {same}/{total} outputs equal plain greedy")
    return f"{same}/{total}"


@section("correctness: target model")
def correctness_target(model) -> None:
    RESULTS["correctness_target"] = {"logits_rel_err_worst": compare_runners(model.hf_model, 300, model.name)}


# ---------------------------------------------------------------------------------------------------- latency

def time_steps(runner, rows: int, reps: int, tree: Draft | None = None) -> tuple[float, float]:
    """Median wall seconds of verify + argmax read + commit for a draft of rows - 1 nodes; mean GPU seconds."""
    draft = tree if tree is not None else Draft.chain(list(range(5, 5 + rows - 1)))
    times = []
    if isinstance(runner, FastRunner):
        runner.gpu_seconds()
    for i in range(reps + 3):
        sync()
        t0 = time.perf_counter()
        logits = runner.verify(7, draft)
        logits.argmax(-1).tolist()  # the loop's one synchronisation
        runner.commit([])
        t1 = time.perf_counter()
        if i >= 3:
            times.append(t1 - t0)
        elif isinstance(runner, FastRunner):
            runner.gpu_seconds()  # drop the warm-up (and capture) steps
    gpu = runner.gpu_seconds() / reps if isinstance(runner, FastRunner) else float("nan")
    return statistics.median(times), gpu


def tree_of(nodes: int) -> Draft:
    """A 64-node tree: 8 branches under the root, each a chain of nodes // 8."""
    depth = nodes // 8
    parents = [-1 if j == 0 else b * depth + j - 1 for b in range(8) for j in range(depth)]
    return Draft.tree(list(range(3, 3 + nodes)), parents)


@section("step latency")
def step_latency(model, context: int, reps: int) -> None:
    hf_model = model.hf_model
    vocab = model.vocab_size
    prompt = torch.randint(vocab, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    rows_list = [1, 2, 4, 8, 16, 32, 64, 128]
    table = defaultdict(dict)
    runners = {"hf": HFRunner(hf_model), "fast": FastRunner(hf_model, FastConfig(timing=True)),
               "fast-eager": FastRunner(hf_model, FastConfig(graphs=False, timing=True))}
    for name, runner in runners.items():
        runner.reset()
        runner.prefill(prompt)
        for rows in rows_list:
            if name == "hf" and rows not in (1, 8, 32, 64, 128):
                continue
            wall, gpu = time_steps(runner, rows, reps if name != "hf" else max(3, reps // 4))
            table[name][rows] = {"wall_ms": wall * 1e3, "gpu_ms": gpu * 1e3}
        if name != "hf":
            wall, gpu = time_steps(runner, 65, reps, tree=tree_of(64))
            table[name]["tree64"] = {"wall_ms": wall * 1e3, "gpu_ms": gpu * 1e3}
    for name, row in table.items():
        log(f"  {name:10s} " + "  ".join(f"{k}:{v['wall_ms']:.2f}ms" + (f"(gpu {v['gpu_ms']:.2f})"
                                                                       if v['gpu_ms'] == v['gpu_ms'] else "")
                                         for k, v in row.items()))
    fast = table["fast"]
    tree_ratio = ratio(fast["tree64"]["wall_ms"], fast[1]["wall_ms"])
    log(f"  64-node tree / single-token step (fast, wall): {tree_ratio:.2f}x; gpu: "
        f"{ratio(fast['tree64']['gpu_ms'], fast[1]['gpu_ms']):.2f}x")
    weight_bytes = sum(p.numel() * p.element_size() for p in _weight_tensors(runners["fast"]))
    RESULTS["step_latency"] = {"context": context, "table": {k: {str(r): v for r, v in row.items()}
                                                             for k, row in table.items()},
                               "tree64_ratio_wall": tree_ratio, "weight_bytes": weight_bytes}
    bandwidth = RESULTS.get("environment", {}).get("copy_bandwidth_GBps")
    if bandwidth:
        floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
        RESULTS["step_latency"]["bandwidth_floor_ms"] = floor_ms
        log(f"  weights read per step {weight_bytes / 1e6:.0f} MB; at {bandwidth} GB/s the floor is {floor_ms:.3f} ms; "
            f"a 1-token graph step takes {fast[1]['gpu_ms']:.3f} ms on the GPU "
            f"({ratio(fast[1]['gpu_ms'], floor_ms):.1f}x)")
    kernel_profile(runners["fast-eager"], prompt)


def _weight_tensors(runner: FastRunner):
    w = runner.weights
    yield w.lm_head  # read whole for the logits; the embedding is only gathered (a few rows)
    yield w.final_norm
    for layer in w.layers:
        for t in (layer.attn_norm, layer.qkv, layer.qkv_bias, layer.o, layer.mlp_norm, layer.gate_up, layer.down,
                  layer.qk_norm, layer.post_attn_norm, layer.post_mlp_norm):
            if t is not None:
                yield t


def kernel_profile(runner: FastRunner, prompt) -> None:
    """Kernels of a 1-row step (eager runner: the same kernels a graph replays), by kind: how many launches and how
    much kernel time a step is made of. Graph time minus kernel time is what launching and gaps between kernels
    cost inside the graph."""
    if runner.device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    runner.reset()
    runner.prefill(prompt)
    draft = Draft.chain([])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.verify(7, draft).argmax(-1).tolist()
            runner.commit([])
    kinds = defaultdict(lambda: [0, 0.0])
    total_n, total_us = 0, 0.0
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA" or evt.device_time_total <= 0:
            continue
        name = evt.key.lower()
        kind = ("gemm" if any(s in name for s in ("gemm", "gemv", "cutlass", "sm90", "xmma", "splitk")) else
                "attention" if any(s in name for s in ("attention", "fmha", "flash", "softmax")) else
                "memcpy" if "memcpy" in name else "elementwise/norm/index")
        kinds[kind][0] += evt.count
        kinds[kind][1] += evt.device_time_total
        total_n += evt.count
        total_us += evt.device_time_total
    summary = {k: {"launches_per_step": v[0] / 3, "gpu_us_per_step": v[1] / 3} for k, v in kinds.items()}
    log(f"  kernels in a 1-row graph step (profiler, 3 steps): {total_n / 3:.0f} launches, "
        f"{total_us / 3:.0f} us of kernel time per step")
    for k, v in summary.items():
        log(f"    {k:24s} {v['launches_per_step']:6.0f} launches  {v['gpu_us_per_step']:8.1f} us")
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    for evt in top:
        if evt.device_time_total > 0:
            log(f"      {evt.count // 3:4d}x {evt.device_time_total / 3:8.1f} us  {evt.key[:100]}")
    RESULTS["kernel_profile"] = {"launches_per_step": total_n / 3, "kernel_us_per_step": total_us / 3,
                                 "by_kind": summary}


# ---------------------------------------------------------------------------------------------------- generation

def spec_bench_prompts(model, path: Path, per_category: int, categories: list[str]) -> list[tuple[str, list[int]]]:
    by_category = defaultdict(list)
    for line in path.read_text().splitlines():
        q = json.loads(line)
        by_category[q["category"]].append(q)
    prompts = []
    for category in categories:
        for q in by_category.get(category, [])[:per_category]:
            prompts.append((category, model.encode(q["turns"][0], chat=True if model.has_chat_template else False)))
    return prompts


def run_leap(runner, prompt, drafter, config, eos) -> tuple[list[int], Stats, float]:
    stats = Stats()
    if isinstance(runner, FastRunner):
        runner.gpu_seconds()  # start counting GPU time from here
    tokens = [t for step in speculate(runner, prompt, drafter, config, eos, stats) for t in step]
    gpu = runner.gpu_seconds() if isinstance(runner, FastRunner) else float("nan")
    return tokens, stats, gpu


def hf_generate(model, prompt, new_tokens) -> tuple[list[int], float]:
    ids = torch.tensor([prompt], device=model.device)
    sync()
    t0 = time.perf_counter()
    out = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=list(model.eos_token_ids) or None,
                                  pad_token_id=model.eos_token_ids[0] if model.eos_token_ids else 0)
    sync()
    return out[0, len(prompt):].tolist(), time.perf_counter() - t0


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@section("generation")
def generation(model, prompts, hf_subset, new_tokens: int, drafters: list[str], invariant_rows: int,
               invariant_subset) -> None:
    eos = model.eos_token_ids
    config = GenerationConfig(max_new_tokens=new_tokens)
    rows = {}

    def record(name, n_prompts, tokens, seconds, steps=None, drafter_s=None, target_s=None, gpu_s=None,
               prefill_s=None, exact=None, diverged=None):
        rows[name] = {"prompts": n_prompts, "tokens": tokens, "seconds": seconds, "tok_s": ratio(tokens, seconds),
                      "mat": tokens / steps if steps else None, "drafter_s": drafter_s, "target_s": target_s,
                      "gpu_s": gpu_s, "prefill_s": prefill_s, "exact": exact, "diverged": diverged}
        extra = f" MAT {tokens / steps:.2f}" if steps else ""
        log(f"  {name:22s} {n_prompts:4d} prompts {tokens:6d} tokens {seconds:7.2f} s "
            f"{ratio(tokens, seconds):8.1f} tok/s"
            f"{extra}" + (f"  exact {exact}" if exact else ""))

    # transformers generate, greedy (subset): warm up once, then time
    hf_generate(model, hf_subset[0][1], 8)
    total_t = total_s = 0
    for _, p in hf_subset:
        out, s = hf_generate(model, p, new_tokens)
        total_t, total_s = total_t + len(out), total_s + s
    record("hf-generate", len(hf_subset), total_t, total_s)

    def leap(name, runner, drafter_name, subset, reference=None, warm=True):
        if warm and not late():  # capture the common graphs and warm caches outside the timing
            for _, p in subset[:2]:
                run_leap(runner, p, make(drafter_name), GenerationConfig(max_new_tokens=32), eos)
        if reference is not None:
            subset = subset[: len(reference)]  # the reference run may have stopped at the deadline
        outs, agg = [], defaultdict(float)
        same, diverged = 0, []
        for i, (_, p) in enumerate(subset):
            if late():
                log(f"    deadline reached: {name} stops after {i} of {len(subset)} prompts")
                subset = subset[:i]
                break
            tokens, stats, gpu = run_leap(runner, p, make(drafter_name), config, eos)
            outs.append(tokens)
            agg["tokens"] += stats.new_tokens
            agg["seconds"] += stats.total_seconds
            agg["steps"] += stats.steps
            agg["drafter"] += stats.drafter_seconds
            agg["target"] += stats.target_seconds
            agg["prefill"] += stats.prefill_seconds
            agg["gpu"] += gpu
            if reference is not None:
                d = first_divergence(tokens, reference[i])
                same += d is None
                if d is not None:
                    diverged.append([i, d])
        exact = f"{same}/{len(subset)}" if reference is not None else None
        record(name, len(subset), int(agg["tokens"]), agg["seconds"], agg["steps"], agg["drafter"], agg["target"],
               agg["gpu"], agg["prefill"], exact, diverged)
        if diverged:
            log(f"    first divergence (prompt index, token position): {diverged}")
        return outs

    def make(drafter_name):
        return None if drafter_name == "none" else make_drafter(drafter_name, target=model, device=str(model.device),
                                                                dtype=str(model.dtype)[6:])

    leap("none/hf-runner", HFRunner(model.hf_model), "none", hf_subset)
    fast = FastRunner(model.hf_model, FastConfig(timing=True))
    plain = leap("none/fast", fast, "none", prompts)
    for name in drafters:
        if late():
            log(f"  deadline reached: {name} not run")
            continue
        try:
            leap(f"{name}/fast", fast, name, prompts, reference=plain)
        except Exception:
            log(f"  drafter {name} failed:\n{traceback.format_exc()}")
    log(f"  graphs captured by the fast runner: {fast.graph_count}")
    RESULTS["generation"] = rows

    # exactness with every step padded to one bucket: same kernels for every step, so bit-identical logits
    if invariant_rows and not late():
        log(f"\n  exactness with every step padded to {invariant_rows} rows (FastConfig(min_rows))")
        padded = FastRunner(model.hf_model, FastConfig(min_rows=invariant_rows, timing=True))
        inv_plain = leap(f"none/fast-pad{invariant_rows}", padded, "none", invariant_subset)
        for name in drafters:
            if late():
                continue
            try:
                leap(f"{name}/fast-pad{invariant_rows}", padded, name, invariant_subset, reference=inv_plain,
                     warm=False)
            except Exception:
                log(f"  drafter {name} failed:\n{traceback.format_exc()}")
        RESULTS["generation_invariant"] = {k: v for k, v in rows.items() if "pad" in k}


def print_table() -> None:
    gen = RESULTS.get("generation", {})
    base = gen.get("hf-generate", {}).get("tok_s")
    plain = gen.get("none/fast", {}).get("tok_s")
    log("\n" + "=" * 118)
    env = RESULTS.get("environment", {})
    log(f"{env.get('date')}  {env.get('gpu', 'cpu')}  torch {env.get('torch')}  transformers "
        f"{env.get('transformers')}  copy bandwidth {env.get('copy_bandwidth_GBps')} GB/s")
    lat = RESULTS.get("step_latency", {}).get("table", {})
    if lat:
        log("step latency, ms (wall: verify + argmax read + commit; gpu: graph time) vs scored tokens")
        for name, row in lat.items():
            log(f"  {name:10s} " + " ".join(f"{k:>6s}={v['wall_ms']:6.2f}" for k, v in row.items()))
        log(f"  64-node tree / 1-token step (fast): {RESULTS['step_latency']['tree64_ratio_wall']:.2f}x; "
            f"bandwidth floor {RESULTS['step_latency'].get('bandwidth_floor_ms', float('nan')):.3f} ms")
    if gen:
        log(f"{'method/runner':24s} {'prompts':>7s} {'tokens':>7s} {'tok/s':>8s} {'x gen':>6s} {'x plain':>7s} "
            f"{'MAT':>5s} {'draft s':>8s} {'host s':>7s} {'gpu s':>7s} {'exact':>8s}")
        for name, r in gen.items():
            host = (r["target_s"] - r["gpu_s"]) if r["target_s"] is not None and r["gpu_s"] == r["gpu_s"] and \
                r["gpu_s"] else None
            log(f"{name:24s} {r['prompts']:7d} {r['tokens']:7d} {r['tok_s']:8.1f} "
                f"{ratio(r['tok_s'], base):6.1f} {ratio(r['tok_s'], plain):7.2f} "
                f"{r['mat'] or 1.0:5.2f} {r['drafter_s'] or 0:8.2f} {host if host is not None else float('nan'):7.2f} "
                f"{r['gpu_s'] if r['gpu_s'] else float('nan'):7.2f} {r['exact'] or '-':>8s}")
    if RESULTS.get("failures"):
        log(f"FAILED SECTIONS: {RESULTS['failures']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="preset, .gguf file or HF directory (default: SmolLM2 preset)")
    ap.add_argument("--smoke", action="store_true", help="random SmolLM2-shaped weights: no model file, no "
                                                          "generation section")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--hf-prompts", type=int, default=13, help="prompts (one per category, in order) for the slow "
                                                               "HF baselines")
    ap.add_argument("--invariant-per-category", type=int, default=3)
    ap.add_argument("--invariant-rows", type=int, default=128, help="0 = skip the padded exactness run")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--context", type=int, default=512, help="prefilled tokens for the step-latency section")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after start when generation stops "
                                                                   "starting prompts (the table still prints)")
    ap.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories (default: all 13)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: tiny, target, latency, generation")
    ap.add_argument("--drafters", default=None, help="comma-separated (default: every registry drafter except "
                                                     "none and draft-model)")
    args = ap.parse_args()
    global OUT_DIR, DEADLINE
    DEADLINE = time.perf_counter() + args.deadline
    out = OUT_DIR = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "gpu_bench.log", level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    log(f"args: {vars(args)}")

    skip = set(args.skip.split(",")) - {""}
    environment(device)
    if "tiny" not in skip:
        correctness_tiny(device, dtype)
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        from leapdecode.models.base import Model

        with torch.device(device):
            hf_model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, initializer_range=0.05)).to(dtype).eval()
        model = Model(hf_model=hf_model, tokenizer=None, name="random-smollm2-shape", eos_token_ids=())
    else:
        from leapdecode.models.load import load_model

        t0 = time.perf_counter()
        model = load_model(args.model, device=str(device), dtype=str(dtype)[6:])
        log(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s")
    if "target" not in skip:
        correctness_target(model)
    if "latency" not in skip:
        step_latency(model, args.context, args.reps)
    if args.smoke and "generation" not in skip:  # plain decoding speed is the same with random weights
        g = torch.Generator().manual_seed(0)
        prompts = [("random", torch.randint(model.vocab_size, (200,), generator=g).tolist()) for _ in range(6)]
        generation(model, prompts, prompts[:2], args.new_tokens, ["pld", "copy"], 0, [])
    if not args.smoke and "generation" not in skip:
        drafters = args.drafters.split(",") if args.drafters else [n for n in names()
                                                                   if n not in ("none", "draft-model")]
        path = Path(args.questions)
        categories = args.categories.split(",") if args.categories else CATEGORY_ORDER
        prompts = spec_bench_prompts(model, path, args.per_category, categories)
        pick = lambda k: [p for c in CATEGORY_ORDER for p in [q for q in prompts if q[0] == c][:k]]  # noqa: E731
        generation(model, prompts, pick(1)[: args.hf_prompts], args.new_tokens, drafters, args.invariant_rows,
                   pick(args.invariant_per_category))
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print_table()


if __name__ == "__main__":
    sys.exit(main())
