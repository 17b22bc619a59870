"""GPU benchmarks (need a CUDA device; bf16): the figures a CPU cannot give.

1. Stage-2 step of a 7B-shaped model (LLaMA-7B text config, CLIP ViT-L/14 at 224 px, random weights, bf16,
   gradient checkpointing as in the reference recipe): LM only, ExGra-Med (after_de, ONE batched 2B pass), and
   the reference's arrangement (two extra LLM passes); time, tokens/s, model FLOPs utilisation, peak allocated
   memory. Forward + backward only: the AdamW states of a 7B model do not fit one 80 GB GPU (real runs shard
   them with ZeRO-3), and the optimizer step is the same with and without alignment.
2. Attention back-ends on the same step: SDPA (default dispatch, and each kernel forced), eager, and
   flash_attention_2 when the `flash_attn` package is importable.
3. The alignment loss on CUDA (D = 4096): time of forward + backward at B = 16, 32, 64 with the solver on the
   GPU and on the host, and the host synchronisations of one step, by source line.
4. Answer generation with the KV cache: batch 16 over batch 1.

    python -m benchmarks.bench_gpu [--quick] [--out results.json]

`--quick` uses a small model (for checking the script, not for figures). Results are printed as JSON rows
and markdown tables; `benchmarks/RESULTS.md` keeps the tables of the last GPU run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

# Dense bf16 peak of the H100/H200 SXM (datasheet, no sparsity): the MFU denominator.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}

SEVEN_B = dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)
SMALL = dict(hidden=256, layers=2, heads=4, intermediate=512, vocab=1000)
CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)
CLIP_SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=56, patch_size=14, projection_dim=128)


DEVICE = "cuda"  # `--device cpu --quick` runs the script's code paths on a CPU (no figures)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_flops() -> tuple[float, str]:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"{key} SXM datasheet dense bf16"
    return float("nan"), "unknown device"


def matmul_ceiling(n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate (FLOP/s) on random data: the practical ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        _sync()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times)


# --- model -------------------------------------------------------------------------------------------------
def build_model(shape: dict, vision: dict, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

    from exgra_med.model.config import ExGraMedConfig
    from exgra_med.model.modeling import ExGraMedForConditionalGeneration
    from exgra_med.model.vision import VisionTower

    vocab = shape["vocab"] + 3  # + <im_patch>, <im_start>, <im_end>
    text = LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision_cfg = CLIPVisionConfig(**vision).to_dict()
    config = ExGraMedConfig(text_config=text, vision_config=vision_cfg, image_token_id=vocab - 3,
                            im_start_token_id=vocab - 2, im_end_token_id=vocab - 1, contrastive=True,
                            multi_graph=True, after_de=True)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            llm = AutoModelForCausalLM.from_config(text, attn_implementation=attn)
            tower = VisionTower(vision_cfg, "hf", "sdpa")
            model = ExGraMedForConditionalGeneration(config, language_model=llm, vision_tower=tower)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=DEVICE, dtype=torch.bfloat16)
    model.train()
    model.vision_tower.requires_grad_(False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def set_attention(model, impl: str) -> None:
    llm = model.language_model
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(impl)
    else:  # pragma: no cover - older transformers
        llm.config._attn_implementation = impl


def count_params(module: torch.nn.Module, linear_only: bool = True) -> int:
    if not linear_only:
        return sum(p.numel() for p in module.parameters())
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def step_flops(model, batch: dict, aligned: bool) -> float:
    """Model FLOPs of one training step (forward + backward; recomputation of checkpointing not counted)."""
    cfg = model.config.text_config
    bsz, seq = batch["input_ids"].shape
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    llm_linear = count_params(model.language_model)  # all matmul weights, lm_head included
    head = model.language_model.get_output_embeddings().weight.numel()

    def llm(tokens: int, length: int, with_head: bool) -> float:
        dense = 6 * (llm_linear - (0 if with_head else head)) * tokens
        attention = 6 * layers * hidden * length * tokens  # causal: half of 12 L h s per token
        return dense + attention

    total = llm(bsz * seq, seq, True)
    tower = model.vision_tower
    patches = tower.num_patches + 1
    vcfg = tower.model.config
    total += bsz * patches * (2 * count_params(tower) + 4 * vcfg.num_hidden_layers * vcfg.hidden_size * patches)
    total += 6 * count_params(model.mm_projector) * bsz * model.num_image_tokens
    if aligned:
        t1, t2 = batch["response_ids"].shape[1], batch["extended_ids"].shape[1]
        if model.language_model.config._attn_implementation in ("sdpa", "eager"):  # packed: B rows of T1 + T2
            total += 6 * (llm_linear - head) * bsz * (t1 + t2) + 6 * layers * hidden * bsz * (t1 * t1 + t2 * t2)
        else:  # 2B rows padded to the longer text
            total += llm(2 * bsz * max(t1, t2), max(t1, t2), False)
    return float(total)


def _cuda_batch(model, bsz: int, text_len: int, response_len: int, extended_len: int) -> dict:
    from benchmarks.bench_step import _batch

    batch = _batch(model, bsz, text_len, response_len, extended_len)
    return {k: (v.to(DEVICE, torch.bfloat16) if v.is_floating_point() else v.to(DEVICE)) for k, v in batch.items()}


def _lm_only(model, batch):
    keep = ("input_ids", "attention_mask", "labels", "pixel_values")
    return model(**{k: batch[k] for k in keep}).loss


def _exgra_med(model, batch):
    return model(**batch).loss


def _reference(model, batch):
    from benchmarks.bench_step import _reference_arrangement

    return _reference_arrangement(model, batch)


STEPS = {"lm_only": _lm_only, "exgra_med": _exgra_med, "reference_arrangement": _reference}


def time_step(model, batch: dict, step, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of forward + backward (grads freed each step) and the peak allocated memory."""
    times = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        _sync()
        t0 = time.perf_counter()
        loss = step(model, batch)
        loss.backward()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"seconds": statistics.median(times), "seconds_min": min(times),
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")}


def run_steps(quick: bool, repeats: int, parts: set[str]) -> list[dict]:
    shape, vision = (SMALL, CLIP_SMALL) if quick else (SEVEN_B, CLIP_L14)
    t0 = time.perf_counter()
    model = build_model(shape, vision)
    build_s = time.perf_counter() - t0
    bsz, text_len, response_len, extended_len = (16, 32, 16, 24) if quick else (16, 256, 128, 256)
    batch = _cuda_batch(model, bsz, text_len, response_len, extended_len)
    if "steps" not in parts:
        return run_sweep(model, quick, repeats, text_len) if "sweep" in parts else []
    peak, peak_name = peak_flops()
    rows = []
    model_name = "7B-shaped LLaMA + CLIP ViT-L/14-224" if not quick else "small LLaMA + small CLIP"
    params = count_params(model, linear_only=False)

    def record(name: str, attn: str, result: dict) -> None:
        aligned = name != "lm_only"
        flops = step_flops(model, batch, aligned)
        tokens = batch["input_ids"].numel()
        rows.append({"benchmark": "gpu_step", "model": model_name, "params": params, "arrangement": name,
                     "attention": attn, "batch": bsz, "seq_len": batch["input_ids"].shape[1],
                     "image_tokens": model.num_image_tokens, "response_len": response_len,
                     "extended_len": extended_len, **result, "tokens_per_s": tokens / result["seconds"],
                     "model_tflops": flops / 1e12, "mfu": flops / result["seconds"] / peak,
                     "peak_name": peak_name, "build_s": build_s})
        print(json.dumps(rows[-1]), flush=True)

    for name, step in STEPS.items():
        record(name, "sdpa", time_step(model, batch, step, repeats))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"sdpa[flash]": SDPBackend.FLASH_ATTENTION, "sdpa[efficient]": SDPBackend.EFFICIENT_ATTENTION,
              "sdpa[cudnn]": SDPBackend.CUDNN_ATTENTION}
    for label, backend in forced.items():
        try:
            with sdpa_kernel(backend):
                record("lm_only", label, time_step(model, batch, _lm_only, repeats))
        except Exception as err:  # a kernel that refuses these inputs is a result, not a crash
            rows.append({"benchmark": "gpu_step", "arrangement": "lm_only", "attention": label,
                         "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(json.dumps(rows[-1]), flush=True)
    others = ["eager"]
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        others.append("flash_attention_2")
    else:
        rows.append({"benchmark": "gpu_step", "arrangement": "lm_only", "attention": "flash_attention_2",
                     "error": "flash_attn is not installed on this machine"})
    for impl in others:
        try:
            set_attention(model, impl)
            record("lm_only", impl, time_step(model, batch, _lm_only, repeats))
            record("exgra_med", impl, time_step(model, batch, _exgra_med, repeats))
        except Exception as err:
            rows.append({"benchmark": "gpu_step", "arrangement": "lm_only", "attention": impl,
                         "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(json.dumps(rows[-1]), flush=True)
    set_attention(model, "sdpa")
    # Without gradient checkpointing (the reference recipe turns it on): no recomputation, more memory.
    model.activation_checkpointing_disable()
    for name in ("lm_only", "exgra_med"):
        try:
            record(name, "sdpa, no checkpointing", time_step(model, batch, STEPS[name], repeats))
        except torch.OutOfMemoryError:
            rows.append({"benchmark": "gpu_step", "arrangement": name, "attention": "sdpa, no checkpointing",
                         "error": "out of memory on this GPU"})
            print(json.dumps(rows[-1]), flush=True)
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if "sweep" in parts:
        rows += run_sweep(model, quick, repeats, text_len)
    rows += run_generate(model, quick)
    return rows


def run_sweep(model, quick: bool, repeats: int, text_len: int) -> list[dict]:
    """The step ratio against the length of the alignment texts (same main sequence, sdpa, checkpointing)."""
    rows = []
    lengths = ((8, 16), (16, 32)) if quick else ((32, 64), (64, 128), (128, 256))
    base = time_step(model, _cuda_batch(model, 16, text_len, 8, 8), _lm_only, repeats)
    for response_len, extended_len in lengths:
        batch = _cuda_batch(model, 16, text_len, response_len, extended_len)
        row = {"benchmark": "gpu_sweep", "seq_len": batch["input_ids"].shape[1], "response_len": response_len,
               "extended_len": extended_len, "lm_only_s": base["seconds"],
               "flops_ratio": step_flops(model, batch, True) / step_flops(model, batch, False)}
        for name in ("exgra_med", "reference_arrangement"):
            row[f"{name}_s"] = time_step(model, batch, STEPS[name], repeats)["seconds"]
            row[f"{name}_ratio"] = row[f"{name}_s"] / base["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --- generation --------------------------------------------------------------------------------------------
def run_generate(model, quick: bool) -> list[dict]:
    """Greedy answers for the same prompts at batch 1 and batch 16 (KV cache, fixed number of new tokens)."""
    model.eval()
    n_prompts, new_tokens = (16, 4) if quick else (32, 16)
    batch = _cuda_batch(model, n_prompts, 32, 4, 4)
    rows, outputs = [], {}
    with torch.no_grad():
        model.generate(batch["input_ids"][:2], batch["pixel_values"][:2], max_new_tokens=2, min_new_tokens=2)
        for bs in (1, 16):
            _sync()
            t0 = time.perf_counter()
            outs = []
            for lo in range(0, n_prompts, bs):
                outs.append(model.generate(batch["input_ids"][lo:lo + bs], batch["pixel_values"][lo:lo + bs],
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
            _sync()
            seconds = time.perf_counter() - t0
            outputs[bs] = torch.cat(outs)
            rows.append({"benchmark": "gpu_generate", "batch_size": bs, "prompts": n_prompts,
                         "new_tokens": new_tokens, "seconds": seconds,
                         "tokens_per_s": n_prompts * new_tokens / seconds})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
        # bf16 batched and single decoding may differ in the last bits; report the agreement
        row["same_tokens_fraction"] = float((outputs[1] == outputs[row["batch_size"]]).float().mean())
        print(json.dumps(row), flush=True)
    model.train()
    return rows


# --- alignment on CUDA -------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_syncs():
    """Record the host synchronisations torch reports while the block runs, by (file, line)."""
    counter: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counter[f"{Path(w.filename).name}:{w.lineno}"] += 1


def run_alignment(quick: bool, repeats: int) -> list[dict]:
    from exgra_med.align import MultiGraphAlignmentLoss

    rows = []
    dim = 4096
    for bsz in ((16,) if quick else (16, 32, 64)):
        for solve_on in (None, "cpu"):
            module = MultiGraphAlignmentLoss(dim, seed=0, solver_kwargs={"solve_on": solve_on}).to(DEVICE).train()
            gen = torch.Generator(device=DEVICE).manual_seed(bsz)
            times = []
            for rep in range(repeats + 2):
                base = torch.randn(bsz, dim, device=DEVICE, generator=gen)
                nodes = [(base + torch.randn(bsz, dim, device=DEVICE, generator=gen)).requires_grad_(True)
                         for _ in range(3)]
                _sync()
                t0 = time.perf_counter()
                out = module(*nodes)
                out.loss.backward()
                _sync()
                if rep >= 2:
                    times.append(time.perf_counter() - t0)
            with count_syncs() as syncs:
                out = module(*nodes)
                out.loss.backward()
                _sync()
            in_solver = sum(v for k, v in syncs.items() if k.startswith("qap.py"))
            rows.append({"benchmark": "gpu_align", "B": bsz, "D": dim, "solver_on": solve_on or DEVICE,
                         "ms_median": 1000 * statistics.median(times), "ms_min": 1000 * min(times),
                         "syncs_total": sum(syncs.values()), "syncs_in_solver": in_solver,
                         "sync_sites": dict(syncs.most_common())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _table(rows: list[dict], kind: str, header: str, rule: str, line) -> list[str]:
    """A blank line, header, rule and one line per row of benchmark `kind` (nothing when there is none)."""
    picked = [r for r in rows if r["benchmark"] == kind]
    return ["", header, rule, *(line(r) for r in picked)] if picked else []


def to_markdown(rows: list[dict]) -> str:
    """Tables of the rows of one run."""
    out = []
    steps = [r for r in rows if r["benchmark"] == "gpu_step"]
    if steps:
        out += ["| arrangement | attention | batch x seq | step s | tokens/s | model TFLOP | MFU | peak GiB |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in steps:
            if "error" in r:
                out.append(f"| {r['arrangement']} | {r['attention']} | - | - | - | - | - | {r['error']} |")
                continue
            out.append(
                f"| {r['arrangement']} | {r['attention']} | {r['batch']} x {r['seq_len']} | {r['seconds']:.3f} | "
                f"{r['tokens_per_s']:.0f} | {r['model_tflops']:.0f} | {100 * r['mfu']:.1f}% | "
                f"{r['peak_alloc_gib']:.1f} |"
            )
        base = {r["attention"]: r["seconds"] for r in steps if r.get("arrangement") == "lm_only" and "error" not in r}
        # ratios pair each arrangement with the LM-only step of the same attention and checkpointing
        ratios = [
            (r["arrangement"], r["attention"], r["seconds"] / base[r["attention"]])
            for r in steps
            if r.get("arrangement") != "lm_only" and "error" not in r and r["attention"] in base
        ]
        if ratios:
            out += ["", "| arrangement | attention | step time over LM only |", "|---|---|---:|"]
            out += [f"| {a} | {b} | {c:.2f} |" for a, b, c in ratios]
    out += _table(
        rows,
        "gpu_sweep",
        "| seq len | response + extended tokens | model FLOPs ratio | ExGra-Med ratio | reference arrangement ratio |",
        "|---:|---:|---:|---:|---:|",
        lambda r: (
            f"| {r['seq_len']} | {r['response_len']} + {r['extended_len']} | {r['flops_ratio']:.2f} | "
            f"{r['exgra_med_ratio']:.2f} | {r['reference_arrangement_ratio']:.2f} |"
        ),
    )
    out += _table(
        rows,
        "gpu_generate",
        "| batch | prompts | new tokens | seconds | tokens/s | speedup | same tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        lambda r: (
            f"| {r['batch_size']} | {r['prompts']} | {r['new_tokens']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['speedup']:.1f}x | {100 * r['same_tokens_fraction']:.0f}% |"
        ),
    )
    out += _table(
        rows,
        "gpu_align",
        "| B | D | solver on | median ms | min ms | host syncs per step | of which in the solver |",
        "|---:|---:|---|---:|---:|---:|---:|",
        lambda r: (
            f"| {r['B']} | {r['D']} | {r['solver_on']} | {r['ms_median']:.1f} | {r['ms_min']:.1f} | "
            f"{r['syncs_total']} | {r['syncs_in_solver']} |"
        ),
    )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few repeats (checks the script)")
    parser.add_argument("--out", help="write all rows as JSON here")
    parser.add_argument(
        "--only",
        default="align,steps,sweep",
        help="comma-separated parts: align, steps (with generation), sweep (default: all)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: run the code paths with --quick to check the script (no figures)",
    )
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu" and not args.quick:
        parser.error("--device cpu only checks the script; add --quick")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: these benchmarks need a GPU (the CPU ones are `python -m benchmarks`)")
    torch.backends.cuda.matmul.allow_tf32 = True
    repeats = 2 if args.quick else 5
    env = {
        "benchmark": "env",
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_bf16_tflops": matmul_ceiling() / 1e12 if DEVICE == "cuda" else float("nan"),
    }
    import transformers

    env["transformers"] = transformers.__version__
    env["peak_tflops"], env["peak_name"] = peak_flops()[0] / 1e12, peak_flops()[1]
    print(json.dumps(env), flush=True)
    rows = [env]
    parts = set(args.only.split(","))
    if parts - {"align", "steps", "sweep"}:
        parser.error(f"--only: unknown parts {sorted(parts - {'align', 'steps', 'sweep'})}")
    if "align" in parts:
        rows += run_alignment(args.quick, repeats)
    if parts & {"steps", "sweep"}:
        rows += run_steps(args.quick, repeats, parts)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(
        f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"bf16 matmul {env['matmul_bf16_tflops']:.0f} TFLOP/s measured, MFU against {env['peak_tflops']:.0f}"
    )
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
