"""Paper-shape training steps on a GPU: step time, samples/s, memory, TFLOP/s, MFU, loader balance.

What a user with a GPU wants to know before renting 4-64 of them: how fast one training step of
the paper's model is in bf16, how much memory it takes, how much of the device's peak it reaches
(MFU), and whether the real data loader keeps up. For each of the fVLM step, the global-CLIP
step and the co-teaching step (the other network's forward in eval mode without gradients, then
the trained network's step on soft targets, as :class:`~fvlm.lit_modules.CoTeachingModule` does
after its burn-in) this prints:

* median step time and samples/s over ``--steps`` steps after ``--warmup`` warm-up steps;
* peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS);
* FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
  attention, forward and backward), achieved TFLOP/s and MFU against the device's dense bf16 peak
  (known devices by name, else ``--peak-tflops``);
* the training loader's samples/s with ``--workers`` workers over a synthetic cache of the
  recipe's volume size, against the step's samples/s (> 1: the loader keeps up).

Shapes: ``paper`` takes the vision tower, crop, batch size and text length from
``configs/fvlm.yaml`` (ViT-B on 128x256x288, 12 per GPU, BERT-base shape with random weights so
that nothing is downloaded); ``tiny`` is a CPU smoke size (the test runs it). Usage::

    python benchmarks/bench_gpu.py --shape paper --device cuda [--json runs/bench_gpu.json]
    python benchmarks/bench_gpu.py --shape tiny --device cpu --precision 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic cache writer is shared with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

#: BERT-base's shape (the paper's text tower) with random weights: the FLOPs of the real one.
BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
TINY = {
    "vision": {
        "patch_size": [4, 8, 8],
        "hidden_size": 64,
        "mlp_dim": 128,
        "num_layers": 2,
        "num_heads": 4,
    },
    "crop_size": [16, 32, 32],
    "batch_size": 4,
    "max_text_length": 32,
    "embed_dim": 64,
    "text": {
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
}
KINDS = ("fine-grained", "global CLIP", "co-teaching")


def paper_shape() -> dict[str, Any]:
    """The shapes of ``configs/fvlm.yaml`` (one source of truth for the recipe)."""
    config = yaml.safe_load((ROOT / "configs" / "fvlm.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]
    vision = {k: v for k, v in model["vision"].items() if k != "init_from"}
    return {
        "vision": vision,
        "crop_size": data["crop_size"],
        "batch_size": data["batch_size"],
        "max_text_length": data["max_text_length"],
        "embed_dim": model["embed_dim"],
        "text": BERT_BASE,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    parser.add_argument("--precision", choices=("bf16", "32"), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shape's")
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes")
    parser.add_argument("--loader-batches", type=int, default=10, help="batches timed")
    parser.add_argument("--studies", type=int, default=None, help="synthetic studies (>= batch)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = paper_shape() if args.shape == "paper" else dict(TINY)
    if args.batch_size is not None:
        shape["batch_size"] = args.batch_size
    args.shape_spec = shape
    args.studies = args.studies or 2 * shape["batch_size"]
    if min(args.steps, args.loader_batches, shape["batch_size"]) < 1 or args.warmup < 0:
        parser.error("--steps, --loader-batches and the batch size must be >= 1")
    if args.studies < shape["batch_size"]:
        parser.error("--studies must be at least the batch size")
    return args


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak in TFLOP/s (``None``: unknown)."""
    if device.type != "cuda":
        return "CPU", override
    name = torch.cuda.get_device_name(device)
    known = next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return name, override if override is not None else known


def make_data(cache: Path, shape: dict, workers: int):  # noqa: ANN201 - lazy import
    """The real training data module of the recipe's crop over ``cache``."""
    from fvlm.data_modules import CTReportDataModule

    data = CTReportDataModule(
        str(cache),
        anatomy_table="paper",
        tokenizer="minilm",  # bert-base-uncased's vocabulary, installed offline
        crop_size=tuple(shape["crop_size"]),
        batch_size=shape["batch_size"],
        num_workers=workers,
        max_text_length=shape["max_text_length"],
        crop_check="off",  # synthetic studies: a crop-validity table says nothing here
    )
    data.setup("fit")
    return data


def build_module(kind: str, shape: dict, device: torch.device):  # noqa: ANN201 - lazy import
    """The training module of ``kind`` (co-teaching: an fVLM module plus its partner network)."""
    from fvlm.lit_modules import FineGrainedCLIPModule, GlobalCLIPModule
    from fvlm.models import VisionConfig

    common = {
        "num_anatomies": 35,
        "vision": VisionConfig(img_size=tuple(shape["crop_size"]), **shape["vision"]),
        "text_config": shape["text"],
        "embed_dim": shape["embed_dim"],
    }
    module = (
        GlobalCLIPModule(**common) if kind == "global CLIP" else FineGrainedCLIPModule(**common)
    )
    module = module.to(device).train()
    partner = module.build_network().to(device).eval() if kind == "co-teaching" else None
    return module, partner


def step_function(module, partner, optimizer, autocast) -> Callable[[dict], None]:  # noqa: ANN001
    """One optimiser step of the module (after the partner's soft targets, for co-teaching)."""

    def step(batch: dict) -> None:
        with autocast:
            out = module(batch)
            soft = None
            if partner is not None:
                with torch.no_grad():
                    teacher = partner(batch)
                soft = module.loss.teacher_targets(
                    teacher.image_emb, teacher.text_emb, out.valid, teacher.logit_scale
                )
            loss = module.contrastive_loss(out, soft)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _to_device(module, batch: dict, device: torch.device) -> dict:  # noqa: ANN001
    moved = {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }
    return module.on_after_batch_transfer(moved, 0)  # device-side conversion, as under a Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, args: argparse.Namespace, batches: list[dict]) -> dict[str, float]:
    """Step time, FLOPs and peak memory of one kind of training step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    module, partner = build_module(kind, args.shape_spec, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05)
    bf16 = args.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    step = step_function(module, partner, optimizer, autocast)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    device_batches = [_to_device(module, b, device) for b in batches]
    with FlopCounterMode(display=False) as counter:
        step(device_batches[0])
    flops = counter.get_total_flops()
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        step(device_batches[i % len(device_batches)])
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "step_s": seconds,
        "samples_per_s": args.shape_spec["batch_size"] / seconds,
        "tflop_per_step": flops / 1e12,
        "tflops": flops / seconds / 1e12,
        "peak_mib": _peak_mib(device),
    }
    del module, partner, optimizer, device_batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def report(args: argparse.Namespace, name: str, peak: float | None, results: dict) -> str:
    """The printed table."""
    memory = "peak CUDA MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    lines = [
        f"{'step':<14}{'ms':>9}{'samples/s':>11}{'TFLOP/step':>12}{'TFLOP/s':>9}{'MFU':>7}"
        f"{memory:>15}{'loader/step':>13}"
    ]
    loader = results["loader_samples_per_s"]
    for kind in args.kinds:
        r = results[kind]
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        lines.append(
            f"{kind:<14}{r['step_s'] * 1e3:>9.1f}{r['samples_per_s']:>11.1f}"
            f"{r['tflop_per_step']:>12.3g}{r['tflops']:>9.3g}{mfu:>7}{r['peak_mib']:>15.0f}"
            f"{loader / r['samples_per_s']:>12.2f}x"
        )
    lines.append(
        f"loader: {loader:.1f} samples/s with {args.workers} workers on {os.cpu_count()} CPUs "
        "(> 1x in the last column: it keeps one device busy)"
    )
    if "co-teaching" in results and "fine-grained" in results:
        ratio = results["co-teaching"]["step_s"] / results["fine-grained"]["step_s"]
        lines.append(f"co-teaching step / fVLM step: {ratio:.2f}x (target <= 1.5x)")
    lines.append(f"device: {name}, bf16 peak {peak or 'unknown (--peak-tflops)'} TFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results (also printed, and written with ``--json``)."""
    args = parse_args(argv)
    from bench_loader import loader_throughput
    from cache_factory import write_cache

    device = torch.device(args.device)
    name, peak = device_peak(device, args.peak_tflops)
    shape = args.shape_spec
    volume = tuple(int(c * 1.1) for c in shape["crop_size"])  # crops move; some overrun
    print(
        f"fvlm GPU benchmark: {args.shape} shapes on {name}, precision {args.precision}, batch "
        f"{shape['batch_size']}, crop {shape['crop_size']}, torch {torch.__version__}",
        flush=True,
    )
    results: dict[str, Any] = {"device": name, "peak_tflops": peak, "shape": args.shape}
    with tempfile.TemporaryDirectory(prefix="fvlm-bench-gpu-") as tmp:
        cache = write_cache(
            Path(tmp) / "cache", anatomies=None, n_train=args.studies, n_val=0, shape=volume
        )
        data = make_data(cache, shape, args.workers)
        results["loader_samples_per_s"] = loader_throughput(
            data.train_dataloader(), args.loader_batches
        )[0]
        loader = make_data(cache, shape, 0).train_dataloader()
        batches: list[dict] = []
        while len(batches) < min(args.warmup + args.steps, 4):
            batches += list(loader)
        batches = batches[:4]
        for kind in args.kinds:
            results[kind] = measure(kind, args, batches)
            print(f"  {kind}: {results[kind]['step_s'] * 1e3:.1f} ms/step", flush=True)
    print(report(args, name, peak, results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
