"""Training-side ratios of fvlm, measured in one run (``make bench``).

On a synthetic cache shaped like ``fvlm preprocess`` output (the paper's 35-anatomy table, the
demo's 3D ViT, the real MiniLM text encoder) this prints:

* fine-grained step time / global-CLIP step time (forward + backward + AdamW step, median over
  ``--steps`` steps after ``--warmup`` warm-up steps, on the same batches);
* co-teaching optimiser step / fine-grained step: the student's step plus its partner's
  soft-target forward (eval mode, no gradient), the two networks alternating, after the burn-in;
* the text-deduplication speed-up: the fine-grained step encoding every valid anatomy text
  versus each distinct text once (what ``TextEncoder.encode_unique`` does);
* data-loader throughput (0 and 2 workers) / training-step throughput, in samples per second;
* peak memory per model: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak resident set
  size of the process that trains it.

Each model trains in a fresh (spawned) process, so its peak memory is its own and no model's
allocator cache or thread pool disturbs another's timings. Usage::

    python benchmarks/bench_train.py [--steps 5] [--batch-size 8] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The synthetic cache writer is shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from child_process import run_in_child  # noqa: E402

#: The demo's vision tower shape (configs/demo.yaml, whose three HU-window input channels only widen
#: the patch embedding) on a smaller crop; the cache volumes are a little larger, so crops move and
#: some anatomies fall outside, as on real scans.
VISION = {
    "img_size": (16, 48, 48),
    "patch_size": (4, 8, 8),
    "hidden_size": 64,
    "mlp_dim": 128,
    "num_layers": 2,
    "num_heads": 4,
}
VOLUME = (20, 56, 56)
EMBED_DIM = 128
MAX_TEXT_LENGTH = 64

PHASES = {
    "fine-grained": {"kind": "fine_grained", "dedup": True},
    "fine-grained, no dedup": {"kind": "fine_grained", "dedup": False},
    "global CLIP": {"kind": "global", "dedup": True},
    "co-teaching": {"kind": "co_teaching", "dedup": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=8, help="studies per batch")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per process (0: torch's default); 1 keeps ratios stable on a "
        "shared machine, where idle intra-op threads wait on busy cores",
    )
    parser.add_argument("--studies", type=int, default=32, help="training studies in the cache")
    parser.add_argument(
        "--loader-batches", type=int, default=12, help="batches timed per loader setting"
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.studies, args.loader_batches) < 1 or args.warmup < 0:
        parser.error("--steps, --batch-size, --studies, --loader-batches must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.studies < args.batch_size:
        parser.error("--studies must be at least --batch-size")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# -- data --------------------------------------------------------------------------------------


def make_data(cache: Path, batch_size: int, num_workers: int):  # noqa: ANN201 - lazy import
    """The training loader of the demo's data settings over ``cache``."""
    from fvlm.data_modules import CTReportDataModule

    data = CTReportDataModule(
        str(cache),
        anatomy_table="paper",
        tokenizer="minilm",
        crop_size=VISION["img_size"],
        batch_size=batch_size,
        num_workers=num_workers,
        max_text_length=MAX_TEXT_LENGTH,
        pin_memory=False,
        crop_check="off",  # synthetic studies: their crop-validity table says nothing here
    )
    data.setup("fit")
    return data


def loader_rate(cache: Path, batch_size: int, num_workers: int, batches: int) -> float:
    """Steady-state samples/s of the training loader (worker start-up and first batch excluded)."""
    from bench_loader import loader_throughput

    loader = make_data(cache, batch_size, num_workers).train_dataloader()
    return loader_throughput(loader, batches)[0]


# -- one model per process ---------------------------------------------------------------------


def _rss_mib(field: str) -> float | None:
    """``VmRSS``/``VmHWM`` of this process in MiB (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes vs KiB


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_phase(spec: dict, batches: list[dict], results: Any) -> None:
    """Child process: build one model, time its steps on ``batches``, report time and memory."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from transformers.utils import logging as hf_logging

    from fvlm.lit_modules import CoTeachingModule, FineGrainedCLIPModule, GlobalCLIPModule
    from fvlm.models import VisionConfig

    hf_logging.disable_progress_bar()

    device = torch.device(spec["device"])
    rss_before = _rss_mib("VmRSS")
    torch.manual_seed(0)
    common = {"num_anatomies": 35, "vision": VisionConfig(**VISION), "embed_dim": EMBED_DIM}
    if spec["kind"] == "global":
        module = GlobalCLIPModule(**common)
    elif spec["kind"] == "co_teaching":
        module = CoTeachingModule(**common, anatomy_reduction="mean")
    else:
        module = FineGrainedCLIPModule(**common, anatomy_reduction="mean")
    module = module.to(device).train()
    text = module.network.text
    if not spec["dedup"]:
        text.deduplicate = False
    encoded: list[int] = []
    text.register_forward_hook(lambda _m, args, _out: encoded.append(args[0].numel()))
    networks = getattr(module, "networks", [module])
    optimizers = [torch.optim.AdamW(n.parameters(), lr=1e-4, weight_decay=0.05) for n in networks]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, tokens = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        # As Lightning after its transfer: the module finishes the crops on the device.
        batch = module.on_after_batch_transfer(_to(batches[i % len(batches)], device), 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        encoded.clear()
        start = time.perf_counter()
        k = i % len(optimizers)  # co-teaching: the networks alternate, each taught by the other
        if spec["kind"] == "co_teaching":
            loss = module.network_loss(k, batch, teach=True)[0]["loss"]
        else:
            loss = module.contrastive_loss(module(batch))["loss"]
        optimizers[k].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[k].step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
            tokens.append(sum(encoded))
    result = {
        "name": spec["name"],
        "step_s": statistics.median(times),
        "text_tokens": statistics.mean(tokens),
        "valid": statistics.mean(int(b["valid"].sum()) for b in batches),
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["base_mib"] = None
    else:
        result["peak_mib"] = _rss_mib("VmHWM") or _peak_rss_mib()
        result["base_mib"] = rss_before
    results.put(result)


def run_phase(name: str, args: argparse.Namespace, batches: list[dict]) -> dict:
    """Train one model in a spawned process (CUDA- and OpenMP-safe, unlike fork)."""
    spec = PHASES[name] | {
        "name": name,
        "device": args.device,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    return run_in_child(train_phase, (spec, batches), name)


# -- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, phases: dict[str, dict], loaders: dict[int, float]) -> str:
    """The table and the ratios, as printed."""
    fine, plain, clip = (
        phases["fine-grained"],
        phases["fine-grained, no dedup"],
        phases["global CLIP"],
    )
    cuda = args.device.startswith("cuda")
    memory = "peak CUDA MiB" if cuda else "peak RSS MiB"
    lines = [
        f"{'model':<24}{'step ms':>9}{'samples/s':>11}{'text tokens':>13}{memory:>15}"
        + ("" if cuda else f"{'(+ train)':>11}")
    ]
    for name, r in phases.items():
        row = f"{name:<24}{r['step_s'] * 1e3:>9.0f}{args.batch_size / r['step_s']:>11.1f}"
        row += f"{r['text_tokens']:>13.0f}{r['peak_mib']:>15.0f}"
        if not cuda and r["base_mib"] is not None:
            row += f"{r['peak_mib'] - r['base_mib']:>11.0f}"
        lines.append(row)
    for workers, rate in loaders.items():
        lines.append(f"{f'loader, {workers} workers':<24}{'':>9}{rate:>11.1f}")
    train_rate = args.batch_size / fine["step_s"]
    loader_ratios = ", ".join(
        f"{w} workers {rate / train_rate:.1f}x" for w, rate in loaders.items()
    )
    memory_ratio = (
        (fine["peak_mib"] - fine["base_mib"]) / (clip["peak_mib"] - clip["base_mib"])
        if not cuda and fine["base_mib"] is not None
        else fine["peak_mib"] / clip["peak_mib"]
    )
    tokens = plain["text_tokens"] / fine["text_tokens"]
    cot = phases["co-teaching"]
    cot_memory = (
        (cot["peak_mib"] - cot["base_mib"]) / (fine["peak_mib"] - fine["base_mib"])
        if not cuda and fine["base_mib"] is not None
        else cot["peak_mib"] / fine["peak_mib"]
    )
    ratios = [
        ("fine-grained step / global-CLIP step", f"{fine['step_s'] / clip['step_s']:.2f}x"),
        (
            "text dedup speed-up (no-dedup / dedup step)",
            f"{plain['step_s'] / fine['step_s']:.2f}x (text tokens {tokens:.2f}x)",
        ),
        ("loader / fine-grained training throughput", f"{loader_ratios} (> 1: keeps up)"),
        (
            "peak memory fine-grained / global CLIP",
            f"{memory_ratio:.2f}x" + ("" if cuda else " (training increments)"),
        ),
        (
            "co-teaching / fine-grained optimiser step",
            f"{cot['step_s'] / fine['step_s']:.2f}x (target <= 1.5x)",
        ),
        (
            "peak memory co-teaching / fine-grained",
            f"{cot_memory:.2f}x" + ("" if cuda else " (training increments)"),
        ),
    ]
    lines += ["", "ratios"] + [f"  {label:<45}{value}" for label, value in ratios]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cache_factory import write_cache

    with tempfile.TemporaryDirectory(prefix="fvlm-bench-") as tmp:
        start = time.perf_counter()
        cache = write_cache(
            Path(tmp) / "cache", anatomies=None, n_train=args.studies, n_val=0, shape=VOLUME
        )
        print(
            f"fvlm training benchmark: device {args.device}, {torch.get_num_threads()} CPU "
            f"threads, batch {args.batch_size}, median of {args.steps} steps after "
            f"{args.warmup} warm-up, torch {torch.__version__}\n"
            f"ViT {VISION['img_size']} patch {VISION['patch_size']} width "
            f"{VISION['hidden_size']} x {VISION['num_layers']} layers, MiniLM-L6 text, "
            f"35-anatomy paper table, {args.studies} synthetic studies of {VOLUME}",
            flush=True,
        )
        loaders = {}
        for workers in (0, 2):
            loaders[workers] = loader_rate(cache, args.batch_size, workers, args.loader_batches)
        loader = make_data(cache, args.batch_size, 0).train_dataloader()
        batches = []
        while len(batches) < args.warmup + args.steps:
            batches += list(loader)
        batches = batches[: args.warmup + args.steps]
        phases = {}
        for name in PHASES:
            phases[name] = run_phase(name, args, batches)
            print(f"  {name}: {phases[name]['step_s'] * 1e3:.0f} ms/step", flush=True)
        valid = phases["fine-grained"]["valid"]
        print(f"\n{valid:.0f} valid (study, anatomy) pairs per batch of {args.batch_size}\n")
        print(report(args, phases, loaders))
        print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
