"""Two-process gloo run: the gathered loss equals the single-process loss on the whole batch.

Gradient convention checked here (see ``fvlm.loss.gather_features``): with
``gather_with_grad=True`` the gradient w.r.t. a rank's local embeddings is ``world_size`` times the
matching slice of the single-process gradient (DDP's averaging then yields the exact gradient);
with ``gather_with_grad=False`` it equals the slice. The temperature is not gathered, so its
gradient equals the single-process one on every rank in both modes.
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fvlm.loss import FineGrainedContrastiveLoss

WORLD_SIZE = 2
LOCAL_BATCH = 3
CASES = [  # (gather_with_grad, fncn, soft targets from a teacher)
    (True, True, False),
    (False, True, False),
    (True, False, False),
    (True, True, True),
]


def _full_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, a, e = WORLD_SIZE * LOCAL_BATCH, 4, 8
    valid = torch.rand(n, a, generator=g) > 0.25
    valid[:, 3] = False
    valid[4, 3] = True  # one valid sample, on rank 1
    valid[:, 2] = False  # no valid sample anywhere
    normal = torch.rand(n, a, generator=g) > 0.4
    text_key = torch.randint(0, 3, (n, a), generator=g)
    mask = valid[..., None]
    return {
        "image": F.normalize(torch.randn(n, a, e, generator=g), dim=-1) * mask,
        "text": F.normalize(torch.randn(n, a, e, generator=g), dim=-1) * mask,
        "teacher_image": F.normalize(torch.randn(n, a, e, generator=g), dim=-1) * mask,
        "teacher_text": F.normalize(torch.randn(n, a, e, generator=g), dim=-1) * mask,
        "valid": valid,
        "normal": normal,
        "text_key": text_key,
    }


def _run(batch, rank, world_size, gather_with_grad, fncn, soft):
    """Loss, and gradients w.r.t. the (local) embeddings and the log-temperature."""
    image = batch["image"].clone().requires_grad_(True)
    text = batch["text"].clone().requires_grad_(True)
    log_scale = torch.tensor(2.5, requires_grad=True)
    loss = FineGrainedContrastiveLoss(
        fncn=fncn, rank=rank, world_size=world_size, gather_with_grad=gather_with_grad
    )
    soft_targets = None
    if soft:
        soft_targets = loss.teacher_targets(
            batch["teacher_image"], batch["teacher_text"], batch["valid"], 4.0
        )
    out = loss(
        image,
        text,
        batch["valid"],
        batch["normal"],
        batch["text_key"],
        log_scale.exp(),
        soft_targets=soft_targets,
    )
    out["loss"].backward()
    return {
        "loss": out["loss"].detach(),
        "image_grad": image.grad,
        "text_grad": text.grad,
        "scale_grad": log_scale.grad,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        chunk = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {k: v[chunk] for k, v in _full_batch().items()}
        results = [_run(local, rank, WORLD_SIZE, *case) for case in CASES]
        with warnings.catch_warnings(record=True) as caught:  # forgot to set world_size
            warnings.simplefilter("always")
            _run(local, 0, 1, True, True, False)
        results.append(any("world_size=1" in str(w.message) for w in caught))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_rank_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    full = _full_batch()
    for c, case in enumerate(CASES):
        gather_with_grad = case[0]
        want = _run(full, 0, 1, *case)
        grad_factor = WORLD_SIZE if gather_with_grad else 1
        for rank in range(WORLD_SIZE):
            got = ranks[rank][c]
            chunk = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=1e-5)
            for key in ("image_grad", "text_grad"):
                torch.testing.assert_close(
                    got[key], grad_factor * want[key][chunk], rtol=1e-5, atol=1e-6
                )
            torch.testing.assert_close(got["scale_grad"], want["scale_grad"], rtol=1e-5, atol=1e-6)
        assert want["image_grad"].abs().sum() > 0
    assert all(r[len(CASES)] for r in ranks), "no warning for a loss left at world_size=1"
