"""Anatomy-wise visual representations (paper Sec. 3.2, Fig. 3a).

A token belongs to an anatomy when its patch holds any voxel of it. Each anatomy has a learnable
query that attends over its own tokens plus itself; the updated query goes through a per-anatomy
linear projection and L2 normalisation. All anatomies of all samples are computed in one masked
attention call: the token keys and values are projected once and shared, and each query row of
the ``(B, A, A + N)`` mask admits its own query key plus the tokens of its anatomy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnatomyPooling", "token_membership"]


def token_membership(
    anatomy: torch.Tensor, num_anatomies: int, patch_size: tuple[int, int, int]
) -> torch.Tensor:
    """Which tokens cover which anatomy.

    Each patch's voxel labels are scattered into a ``(A + 1)``-wide presence row, so the cost is
    one pass over the voxels whatever the number of anatomies (a dense one-hot would hold
    ``A x D x H x W`` booleans, 340 MB per sample at the paper's crop with 36 anatomies).

    Args:
        anatomy: ``(B, D, H, W)`` integer label map; 0 is background and ``a + 1`` is anatomy
            index ``a``. Sides must be multiples of ``patch_size``.
        num_anatomies: ``A``; labels above it are an error (a table/model mismatch).
        patch_size: ``(pD, pH, pW)`` of the vision encoder.

    Returns:
        ``(B, A, N)`` bool, tokens in the encoder's row-major ``(d, h, w)`` order.
    """
    if anatomy.ndim != 4:
        raise ValueError(f"anatomy must be (B, D, H, W), got {tuple(anatomy.shape)}")
    if anatomy.is_floating_point() or anatomy.dtype == torch.bool:
        raise ValueError(f"anatomy must hold integer labels, got {anatomy.dtype}")
    batch, *shape = anatomy.shape
    if any(s % p for s, p in zip(shape, patch_size, strict=True)):
        raise ValueError(f"anatomy shape {tuple(shape)} is not divisible by patch {patch_size}")
    if anatomy.numel() and int(anatomy.max()) > num_anatomies:
        raise ValueError(
            f"anatomy map holds label {int(anatomy.max())} but the model has {num_anatomies} "
            "anatomies (labels must be 0..A)"
        )
    (pd, ph, pw), (d, h, w) = patch_size, (s // p for s, p in zip(shape, patch_size, strict=True))
    patches = anatomy.reshape(batch, d, pd, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4, 6)
    labels = patches.reshape(batch, d * h * w, pd * ph * pw).long()
    present = torch.zeros(
        batch, d * h * w, num_anatomies + 1, dtype=torch.bool, device=labels.device
    )
    present.scatter_(2, labels, True)
    return present[..., 1:].transpose(1, 2)


class AnatomyPooling(nn.Module):
    """Learnable per-anatomy queries updated by masked self-attention, then projected and normed.

    The layer is a pre-norm attention block restricted to each query's output row: the sequence
    ``[query_a; tokens of a]`` is LayerNorm-ed, the query attends over it, and the result is added
    back to the query. An anatomy with no token (absent or cropped away) attends only to itself,
    so its output is finite; the caller marks it invalid.
    """

    def __init__(
        self,
        hidden_size: int,
        num_anatomies: int,
        embed_dim: int,
        num_heads: int = 8,
        dropout: float = 0.0,
    ) -> None:
        """Create the queries, the attention and the per-anatomy projections.

        Args:
            hidden_size: Token width ``C`` of the vision encoder.
            num_anatomies: ``A``.
            embed_dim: Joint embedding width ``E``.
            num_heads: Attention heads; must divide ``hidden_size``.
            dropout: Attention-weight dropout (training only).
        """
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        if num_anatomies < 1 or embed_dim < 1:
            raise ValueError("num_anatomies and embed_dim must be positive")
        self.num_anatomies = num_anatomies
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Parameter(torch.empty(num_anatomies, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        # One projection per anatomy, held as a single (A, C, E) tensor so one einsum does all.
        self.proj_weight = nn.Parameter(torch.empty(num_anatomies, hidden_size, embed_dim))
        self.proj_bias = nn.Parameter(torch.zeros(num_anatomies, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        # Xavier (not ViT's 0.02) so that from the first step the pooled embedding depends on the
        # anatomy's tokens rather than being dominated by the constant query.
        for linear in (self.to_q, self.to_kv, self.out):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.proj_weight, std=1.0 / math.sqrt(hidden_size))

    def forward(self, tokens: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
        """Pool tokens into anatomy embeddings.

        Args:
            tokens: ``(B, N, C)`` vision tokens.
            membership: ``(B, A, N)`` bool from :func:`token_membership`.

        Returns:
            ``(B, A, E)`` float32 unit vectors (float32 so the contrastive logits are not computed
            from bf16 embeddings under autocast).
        """
        batch, n_tokens, width = tokens.shape
        anatomies = self.num_anatomies
        if membership.shape != (batch, anatomies, n_tokens):
            raise ValueError(
                f"membership {tuple(membership.shape)} does not match "
                f"(B, A, N) = {(batch, anatomies, n_tokens)}"
            )
        query = self.query.to(tokens.dtype).expand(batch, -1, -1)
        sequence = self.norm(torch.cat([query, tokens], dim=1))  # (B, A + N, C)
        q = self._heads(self.to_q(sequence[:, :anatomies]))
        k, v = (self._heads(t) for t in self.to_kv(sequence).chunk(2, dim=-1))
        self_key = torch.eye(anatomies, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([self_key.expand(batch, -1, -1), membership.bool()], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        attended = attended.transpose(1, 2).reshape(batch, anatomies, width)
        pooled = self.query + self.out(attended)
        embedding = torch.einsum("bac,ace->bae", pooled, self.proj_weight) + self.proj_bias
        return F.normalize(embedding.float(), dim=-1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)
