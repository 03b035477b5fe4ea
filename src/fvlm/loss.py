"""Anatomy-level contrastive loss of fVLM, with false-negative correction and soft targets.

The loss aligns, for every anatomy ``j`` separately, the visual embedding ``V[i, j]`` of sample
``i`` with the textual embedding ``T[i, j]`` of the same sample's report description (Eq. 1-2 of
the paper), over the ``N_j`` samples of the global batch whose crop holds anatomy ``j`` wholly.
Two corrections of the one-hot targets reduce false negatives (Sec. 3.3):

* **False-negative correction of normals (FNCN)**: samples that are both normal for anatomy ``j``
  (the anatomy is not mentioned in the impression) are positives of each other; the target rows
  are renormalised to sum to one. Identical description texts can be made positives as well.
* **Label correction by soft targets** (Eq. 3): ``y <- alpha * y + (1 - alpha) * p_other``, where
  ``p_other`` are the image-to-text / text-to-image probabilities predicted by another network
  (co-teaching), by a momentum copy, or by the training network itself (Tab. 5).

Everything is computed densely on ``(B, A, E)`` embeddings plus a ``(B, A)`` validity mask, so
that features can be all-gathered across DDP ranks with fixed shapes and the per-anatomy softmax is
one batched ``(A, N, N)`` computation, with no Python loop over anatomies.

Layout of the ``(A, N, N)`` tensors: ``x[j, i, k]`` relates sample ``i`` (the row: the image for
``i2t``, the text for ``t2i``) to sample ``k`` (the column) for anatomy ``j``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "AnatomyReduction",
    "FineGrainedContrastiveLoss",
    "LabelCorrection",
    "fncn_targets",
    "gather_features",
    "similarity_probabilities",
    "soften_targets",
]

AnatomyReduction = Literal["sum", "mean"]
"""How the per-anatomy losses are combined: ``"sum"`` as in Eq. 2, or ``"mean"`` over the
anatomies with at least one valid (image, text) pair in the global batch."""

LabelCorrection = Literal["none", "self", "momentum", "co-teaching"]
"""Which network supplies ``p_other`` for the soft targets of Eq. 3 (the options of Tab. 5).

* ``"none"``: hard (FNCN) targets only; the paper's "Baseline" column of Tab. 5.
* ``"self"``: the training network's own detached predictions; the paper finds this degrades
  performance (error accumulation), it is kept for the ablation.
* ``"momentum"``: an exponential-moving-average copy of the training network.
* ``"co-teaching"``: a second network with another seed, data order and augmentation, trained
  alternately; each network's predictions on the other's batch soften the other's targets (the
  paper's method, after a burn-in of 5 epochs; A.2).

The loss itself only receives ``soft_targets``; the Lightning modules own the teacher networks and
call :meth:`FineGrainedContrastiveLoss.teacher_targets` on the teacher's embeddings.
"""


class _AllGatherWithGrad(torch.autograd.Function):
    """Differentiable all-gather: backward sums every rank's gradient of the local chunk.

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather``, which is
    deprecated and whose non-NCCL backward (an all-to-all emulation) gave rank 1 a zero gradient
    and sometimes aborted with gloo in torch 2.15 (seen in tests/test_loss_ddp.py). An all-reduce
    of the ``(world_size * B, ...)`` gradient works on every backend; the tensors are small
    ``(N, A, E)`` embeddings, so its cost over a reduce-scatter does not matter.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, rank: int, world_size: int) -> tuple[Tensor, ...]:  # noqa: D102
        ctx.rank = rank
        tensor = tensor.contiguous()
        chunks = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(chunks, tensor)
        return tuple(chunks)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        grad = torch.stack(grads).contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def gather_features(
    *tensors: Tensor, rank: int, world_size: int, gather_with_grad: bool = False
) -> tuple[Tensor, ...]:
    """All-gather fixed-shape ``(B, ...)`` tensors from every rank, concatenated along dim 0.

    The contrastive softmax of Eq. 1 runs over the *global* batch, so each rank needs every rank's
    embeddings. The local chunk always keeps its autograd graph:

    * ``gather_with_grad=False``: the other ranks' chunks are constants and the local chunk is put
      back in place, so the gradient w.r.t. the local embeddings equals the corresponding slice of
      the gradient of the (identical) global loss. DDP then averages parameter gradients over
      ranks, which scales the embedding path by ``1 / world_size`` (open_clip's convention).
    * ``gather_with_grad=True`` (for floating tensors that require grad): a differentiable
      all-gather sums the gradients that every rank's loss sends to the local chunk, i.e.
      ``world_size`` times the slice above; after DDP's averaging, parameters get exactly the
      gradient of the single-process loss on the concatenated batch (recommended).

    Every rank must have the same batch size (use ``drop_last=True`` or a padding sampler).
    Boolean tensors are sent as ``uint8`` because not every backend gathers ``bool``.

    Args:
        *tensors: tensors whose first dimension is the local batch.
        rank: this process's rank; its chunk is kept with its gradient.
        world_size: number of ranks; ``1`` returns the inputs unchanged.
        gather_with_grad: back-propagate through the gather (see above).

    Returns:
        The gathered tensors, each of shape ``(world_size * B, ...)``, in rank order.

    Raises:
        RuntimeError: ``world_size > 1`` without an initialised process group.
    """
    if world_size == 1:
        return tensors
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs an initialised torch.distributed group")
    gathered = []
    for tensor in tensors:
        if gather_with_grad and tensor.requires_grad:
            chunks = list(_AllGatherWithGrad.apply(tensor, rank, world_size))
        else:
            send = tensor.detach()
            if send.dtype == torch.bool:
                send = send.to(torch.uint8)
            send = send.contiguous()
            chunks = [torch.empty_like(send) for _ in range(world_size)]
            dist.all_gather(chunks, send)
            chunks = [chunk.to(tensor.dtype) for chunk in chunks]
            chunks[rank] = tensor
        gathered.append(torch.cat(chunks, dim=0))
    return tuple(gathered)


def _pair_mask(valid: Tensor) -> Tensor:
    """``(N, A)`` validity -> ``(A, N, N)``: both samples hold anatomy ``j`` wholly."""
    valid_t = valid.t()
    return valid_t[:, :, None] & valid_t[:, None, :]


def fncn_targets(
    valid: Tensor, normal: Tensor, text_key: Tensor, fncn: bool = True, identical_text: bool = True
) -> Tensor:
    """Contrastive targets per anatomy with the false-negative correction of normals (Sec. 3.3).

    Without corrections the target of Eq. 2 is one-hot (the sample's own pair). FNCN also marks
    ``(i, k)`` positive when both samples are normal for the anatomy, because their descriptions
    ("no significant abnormalities", in varied wording) are semantically equivalent and pushing
    them apart is a false negative. Identical description texts (equal ``text_key``, not ``-1``)
    are positives too when ``identical_text`` is set: their text embeddings are identical, so a
    one-hot text-to-image target would contradict itself. Rows are renormalised to sum to one
    ("to stabilize model training"). The targets are symmetric, so they serve both directions.

    For the paper's "FGA without FNCN" ablation (Tab. 4) set both flags to ``False``.

    Args:
        valid: ``(N, A)`` bool, anatomy wholly inside the crop.
        normal: ``(N, A)`` bool, anatomy not mentioned in the impression.
        text_key: ``(N, A)`` int64, equal keys for identical texts, ``-1`` for none.
        fncn: mark normal-normal pairs positive.
        identical_text: mark identical-text pairs positive.

    Returns:
        ``(A, N, N)`` float targets; valid rows sum to one, rows and columns of invalid samples
        are zero.
    """
    if not (valid.shape == normal.shape == text_key.shape) or valid.dim() != 2:
        raise ValueError(
            "valid, normal and text_key must share one (N, A) shape, got "
            f"{tuple(valid.shape)}, {tuple(normal.shape)}, {tuple(text_key.shape)}"
        )
    valid = valid.bool()
    n = valid.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    positive = eye.expand(valid.shape[1], n, n)
    if fncn:
        normal_t = (normal.bool() & valid).t()
        positive = positive | (normal_t[:, :, None] & normal_t[:, None, :])
    if identical_text:
        key_t = text_key.t()
        same = (key_t[:, :, None] == key_t[:, None, :]) & (key_t >= 0)[:, :, None]
        positive = positive | same
    targets = (positive & _pair_mask(valid)).float()
    return targets / targets.sum(dim=-1, keepdim=True).clamp_min(1.0)


def _masked_log_probabilities(
    image_emb: Tensor, text_emb: Tensor, valid: Tensor, logit_scale: Tensor | float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scaled similarities and the log of Eq. 1 in both directions, batched over anatomies.

    Columns of invalid samples are filled with the dtype's most negative value before the softmax
    (never ``-inf``: a row without any valid column would turn into NaNs and poison gradients), so
    they get probability zero; rows of invalid samples are meaningless and must be masked by the
    caller. Computed in at least float32 with autocast off: at ``1 / tau`` up to 100, bf16
    cosine similarities would shift logits by tenths.

    Returns:
        ``(logits, log_p_i2t, log_p_t2i, pair_mask)``, each ``(A, N, N)``; ``logits[j, i, k]`` is
        ``<V[i, j], T[k, j]> / tau``.
    """
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    with torch.autocast(device_type=image_emb.device.type, enabled=False):
        logits = torch.einsum("iae,kae->aik", image_emb.to(dtype), text_emb.to(dtype))
        logits = logits * logit_scale
    pair_mask = _pair_mask(valid.bool())
    fill = torch.finfo(dtype).min
    log_p_i2t = logits.masked_fill(~pair_mask, fill).log_softmax(dim=-1)
    log_p_t2i = logits.transpose(-1, -2).masked_fill(~pair_mask, fill).log_softmax(dim=-1)
    return logits, log_p_i2t, log_p_t2i, pair_mask


def similarity_probabilities(
    image_emb: Tensor, text_emb: Tensor, valid: Tensor, logit_scale: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Image-to-text and text-to-image probabilities of Eq. 1 for every anatomy at once.

    For anatomy ``j`` the softmax runs only over the ``N_j`` samples whose crop holds ``j`` wholly
    (truncated anatomies are left out of the alignment, Sec. 3.2).

    Args:
        image_emb: ``(N, A, E)`` L2-normalised visual embeddings ``V``.
        text_emb: ``(N, A, E)`` L2-normalised textual embeddings ``T``.
        valid: ``(N, A)`` bool validity of each (sample, anatomy) pair.
        logit_scale: ``1 / tau``, already exponentiated and clamped.

    Returns:
        ``(p_i2t, p_t2i)``, each ``(A, N, N)``: ``p_i2t[j, i, k]`` is the probability of text ``k``
        given image ``i`` and ``p_t2i[j, i, k]`` that of image ``k`` given text ``i``. Valid rows
        sum to one; rows and columns of invalid samples are zero.
    """
    _, log_p_i2t, log_p_t2i, pair_mask = _masked_log_probabilities(
        image_emb, text_emb, valid, logit_scale
    )
    return log_p_i2t.exp() * pair_mask, log_p_t2i.exp() * pair_mask


def soften_targets(targets: Tensor, p_other: Tensor, alpha: float = 0.5) -> Tensor:
    """Label correction of Eq. 3: ``alpha * targets + (1 - alpha) * p_other``.

    ``p_other`` is another network's prediction (co-teaching), a momentum copy's, or the training
    network's own; it is detached so that no gradient reaches it. Rows and columns of invalid
    samples (recognised by a zero diagonal of ``targets``) stay zero, so a valid row still sums to
    one when ``p_other`` is a distribution over the same valid samples.

    Args:
        targets: ``(A, N, N)`` hard targets, e.g. from :func:`fncn_targets`.
        p_other: ``(A, N, N)`` probabilities in the same direction (``i2t`` for ``i2t`` targets).
        alpha: weight of the hard targets; the paper uses 0.5.

    Returns:
        ``(A, N, N)`` soft targets.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if p_other.shape != targets.shape:
        raise ValueError(
            f"p_other has shape {tuple(p_other.shape)}, targets {tuple(targets.shape)}"
        )
    valid = targets.diagonal(dim1=-2, dim2=-1) > 0
    pair_mask = valid[:, :, None] & valid[:, None, :]
    soft = alpha * targets + (1.0 - alpha) * p_other.detach().to(targets.dtype)
    return soft * pair_mask


class FineGrainedContrastiveLoss(nn.Module):
    """fVLM's anatomy-level contrastive loss (Eq. 1-2) with FNCN and soft targets (Eq. 3).

    Each rank computes the loss over the global batch gathered from all ranks (as open_clip's
    ``ClipLoss`` with ``local_loss=False``), so the loss value is the same on every rank and
    equals the single-process loss on the concatenated batch.

    Args:
        fncn: false-negative correction between normals (Tab. 4 "FNCN").
        identical_text_positive: identical description texts are positives of each other.
        anatomy_reduction: ``"sum"`` adds the per-anatomy losses as in Eq. 2, so the loss scale
            grows with the number of anatomies in a batch; ``"mean"`` divides that sum by the
            number of anatomies in the loss (``N_j >= 1``), which keeps the scale independent of
            the anatomy preset (4 chest anatomies vs. the paper's groups).
        skip_all_normal_anatomies: leave out the anatomies none of whose valid samples in the
            global batch is abnormal (the authors' release does; the paper is silent). With FNCN
            such an anatomy's targets are nearly uniform, so it mostly teaches "all normal texts
            look alike". Skipped anatomies count neither in the sum nor in the ``"mean"``.
        rank: this process's rank (set it once the process group exists, e.g. in ``setup()``).
        world_size: number of ranks; ``1`` disables gathering.
        gather_with_grad: back-propagate through the all-gather; with DDP's gradient averaging
            this gives the exact gradient of the global-batch loss (see :func:`gather_features`).
    """

    def __init__(
        self,
        fncn: bool = True,
        identical_text_positive: bool = True,
        anatomy_reduction: AnatomyReduction = "sum",
        skip_all_normal_anatomies: bool = False,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if anatomy_reduction not in ("sum", "mean"):
            raise ValueError(
                f"anatomy_reduction must be 'sum' or 'mean', got {anatomy_reduction!r}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.fncn = fncn
        self.identical_text_positive = identical_text_positive
        self.anatomy_reduction = anatomy_reduction
        self.skip_all_normal_anatomies = skip_all_normal_anatomies
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self._warned_world = False

    def extra_repr(self) -> str:
        """Show the options in ``print(module)``."""
        return (
            f"fncn={self.fncn}, identical_text_positive={self.identical_text_positive}, "
            f"anatomy_reduction={self.anatomy_reduction!r}, "
            f"skip_all_normal_anatomies={self.skip_all_normal_anatomies}, rank={self.rank}, "
            f"world_size={self.world_size}, gather_with_grad={self.gather_with_grad}"
        )

    def _check_world(self) -> None:
        """Warn once when DDP runs but the loss was left at ``world_size=1`` (local-only loss)."""
        if self._warned_world or self.world_size != 1:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn(
                "FineGrainedContrastiveLoss has world_size=1 inside a process group of "
                f"{dist.get_world_size()} ranks: the softmax runs over the local batch only. "
                "Set loss.rank and loss.world_size.",
                stacklevel=3,
            )
            self._warned_world = True

    def _gather(self, *tensors: Tensor, with_grad: bool) -> tuple[Tensor, ...]:
        self._check_world()
        return gather_features(
            *tensors, rank=self.rank, world_size=self.world_size, gather_with_grad=with_grad
        )

    @torch.no_grad()
    def teacher_targets(
        self, image_emb: Tensor, text_emb: Tensor, valid: Tensor, logit_scale: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """``(p_i2t, p_t2i)`` of a teacher network, gathered like the student's features.

        Pass the result as ``soft_targets`` of :meth:`forward`. The teacher (co-teaching partner,
        momentum copy, or the student's own detached outputs for ``"self"``) must have encoded
        the student's batch, so that ``valid`` and the sample order match.

        Args:
            image_emb: ``(B, A, E)`` teacher visual embeddings of the local batch.
            text_emb: ``(B, A, E)`` teacher textual embeddings of the local batch.
            valid: ``(B, A)`` validity, the same as the student's.
            logit_scale: the teacher's ``1 / tau``.

        Returns:
            Two detached ``(A, N, N)`` tensors over the global batch ``N = world_size * B``.
        """
        image_emb, text_emb, valid = self._gather(image_emb, text_emb, valid, with_grad=False)
        p_i2t, p_t2i = similarity_probabilities(image_emb, text_emb, valid, logit_scale)
        return p_i2t.detach(), p_t2i.detach()

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        valid: Tensor,
        normal: Tensor,
        text_key: Tensor,
        logit_scale: Tensor | float,
        soft_targets: tuple[Tensor, Tensor] | None = None,
        alpha: float = 0.5,
    ) -> dict[str, Tensor]:
        """Compute ``L_itc`` (Eq. 2) over the global batch.

        ``loss = 1/2 * reduce_j [ 1/N_j * sum_i ( H(y_i2t, p_i2t) + H(y_t2i, p_t2i) ) ]`` over the
        anatomies with ``N_j >= 1`` (and, with ``skip_all_normal_anatomies``, an abnormal sample);
        an anatomy with a single valid sample contributes ``log 1 = 0``, one without valid
        samples nothing.

        Args:
            image_emb: ``(B, A, E)`` L2-normalised visual embeddings (zeros where invalid).
            text_emb: ``(B, A, E)`` L2-normalised textual embeddings (zeros where invalid).
            valid: ``(B, A)`` bool, anatomy wholly inside the crop.
            normal: ``(B, A)`` bool, anatomy not mentioned in the impression.
            text_key: ``(B, A)`` int64, equal for identical texts, ``-1`` for none.
            logit_scale: ``1 / tau`` (exponentiated and clamped), a scalar tensor or float.
            soft_targets: ``(p_i2t, p_t2i)`` from :meth:`teacher_targets`, each ``(A, N, N)``
                over the global batch, to soften the targets as in Eq. 3; ``None`` for hard ones.
            alpha: weight of the hard targets in Eq. 3.

        Returns:
            A dict with ``loss`` (scalar, differentiable); detached ``loss_i2t`` and ``loss_t2i``
            (the two directions, each including the 1/2, so they add up to ``loss``);
            ``per_anatomy`` ``(A,)`` (the reduced terms before the anatomy reduction, NaN for
            anatomies left out of the loss; with ``"sum"`` their ``nansum`` is ``loss``);
            ``in_loss`` ``(A,)`` bool, the anatomies that entered the loss;
            ``n_valid`` ``(A,)`` ``N_j``; ``logits`` ``(A, N, N)`` scaled image-to-text
            similarities; ``p_i2t``/``p_t2i`` ``(A, N, N)`` probabilities (invalid rows and
            columns zero); ``targets_i2t``/``targets_t2i`` the targets used.
        """
        _check_shapes(image_emb, text_emb, valid, normal, text_key)
        image_emb, text_emb = self._gather(image_emb, text_emb, with_grad=self.gather_with_grad)
        valid, normal, text_key = self._gather(
            valid.bool(), normal.bool(), text_key, with_grad=False
        )
        logits, log_p_i2t, log_p_t2i, pair_mask = _masked_log_probabilities(
            image_emb, text_emb, valid, logit_scale
        )
        targets_i2t, targets_t2i = self._targets(valid, normal, text_key, soft_targets, alpha)
        # Cross-entropy per row; masked entries have zero target, and masked_fill keeps their
        # (huge negative) log-probabilities out of both the value and the gradient.
        ce_i2t = -(targets_i2t * log_p_i2t.masked_fill(~pair_mask, 0.0)).sum(-1)  # (A, N)
        ce_t2i = -(targets_t2i * log_p_t2i.masked_fill(~pair_mask, 0.0)).sum(-1)
        return self._reduce(ce_i2t, ce_t2i, valid, normal) | {
            "logits": logits.detach(),
            "p_i2t": log_p_i2t.detach().exp() * pair_mask,
            "p_t2i": log_p_t2i.detach().exp() * pair_mask,
            "targets_i2t": targets_i2t.detach(),
            "targets_t2i": targets_t2i.detach(),
        }

    def _targets(
        self,
        valid: Tensor,
        normal: Tensor,
        text_key: Tensor,
        soft_targets: tuple[Tensor, Tensor] | None,
        alpha: float,
    ) -> tuple[Tensor, Tensor]:
        """FNCN targets of both directions, softened by Eq. 3 when ``soft_targets`` are given."""
        targets = fncn_targets(
            valid, normal, text_key, fncn=self.fncn, identical_text=self.identical_text_positive
        )
        targets_i2t, targets_t2i = targets, targets.transpose(-1, -2)
        if soft_targets is None:
            return targets_i2t, targets_t2i
        p_i2t_other, p_t2i_other = soft_targets
        return soften_targets(targets_i2t, p_i2t_other, alpha), soften_targets(
            targets_t2i, p_t2i_other, alpha
        )

    def anatomies_in_loss(self, valid: Tensor, normal: Tensor) -> Tensor:
        """``(A,)`` bool: anatomies with a valid sample (and an abnormal one, if so configured)."""
        used = valid.any(0)
        if self.skip_all_normal_anatomies:
            used = used & (valid & ~normal).any(0)
        return used

    def _reduce(
        self, ce_i2t: Tensor, ce_t2i: Tensor, valid: Tensor, normal: Tensor
    ) -> dict[str, Tensor]:
        """Mean over each anatomy's ``N_j`` rows, halved, then summed or averaged over anatomies."""
        n_valid = valid.t().sum(-1)  # (A,)
        used = self.anatomies_in_loss(valid, normal)
        # Skipped anatomies are multiplied by zero rather than indexed away, so every parameter
        # stays in the graph (DDP expects a gradient, possibly zero, for each).
        weight = used.to(ce_i2t.dtype) / (2.0 * n_valid.clamp_min(1).to(ce_i2t.dtype))
        term_i2t = ce_i2t.sum(-1) * weight  # invalid rows have zero targets -> zero CE
        term_t2i = ce_t2i.sum(-1) * weight
        per_anatomy = term_i2t + term_t2i
        scale = 1.0
        if self.anatomy_reduction == "mean":
            scale = 1.0 / used.sum().clamp_min(1).to(per_anatomy.dtype)
        nan = torch.full_like(per_anatomy, float("nan"))
        return {
            "loss": per_anatomy.sum() * scale,
            "loss_i2t": (term_i2t.sum() * scale).detach(),
            "loss_t2i": (term_t2i.sum() * scale).detach(),
            "per_anatomy": torch.where(used, per_anatomy, nan).detach(),
            "n_valid": n_valid,
            "in_loss": used,
        }


def _check_shapes(
    image_emb: Tensor, text_emb: Tensor, valid: Tensor, normal: Tensor, text_key: Tensor
) -> None:
    if image_emb.dim() != 3 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "image_emb and text_emb must share one (B, A, E) shape, got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    for name, mask in (("valid", valid), ("normal", normal), ("text_key", text_key)):
        if mask.shape != image_emb.shape[:2]:
            raise ValueError(
                f"{name} must have shape {tuple(image_emb.shape[:2])}, got {tuple(mask.shape)}"
            )
