"""Which SAE latents made the model choose a token (Goodfire-style attribution).

For a text (token ids) and a position ``p`` holding the token to explain, the metric is

    m = logit(token at p) - mean(logits)          (the logits the model computed at position p - 1)

and two scores per latent:

- contribution (the default ranking): activation x gradient, summed over positions 0..p-1 -- what the
  latent, as active as it was, added to m to first order. A latent that did not fire contributes 0.
- gradient: d m / d activation summed over positions: how much m would grow if the latent were raised by
  one everywhere, which is what steering it by +1 does. It exists for every latent, active or not (the
  decoder is linear), so by itself it ranks latents that were off.

The forward runs without the KV cache, with the session's steering spliced in (attribution explains
what the steered model did), and builds a graph only from the SAE's site onwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sae import Edit, steer_fn

from .engine import Engine


@dataclass
class Attribution:
    tokens: list[int]
    """The token ids read (position 0..p-1) plus the explained token at position p."""
    position: int
    """p: the index in ``tokens`` of the explained token."""
    token_text: str
    metric: float
    """logit(token) - mean logit at position p - 1."""
    scores: torch.Tensor
    """[n_latents] d metric / d activation, summed over positions 0..p-1 (float32, CPU)."""
    max_acts: torch.Tensor
    """[n_latents] each latent's largest activation over positions 0..p-1, read from the steered activations."""
    contributions: torch.Tensor
    """[n_latents] sum over positions of activation x gradient: what the latent, as it was active, added to
    the metric to first order (0 for a latent that never fired)."""

    def top(self, k: int = 10, *, by: str = "contribution", negative: bool = False
            ) -> list[tuple[int, float, float, float]]:
        """(latent, contribution, gradient score, max activation) of the k largest ``by`` values
        ("contribution" or "gradient"; the smallest with ``negative``)."""
        if by not in ("contribution", "gradient"):
            raise ValueError(f"rank by 'contribution' or 'gradient', not {by!r}")
        key = self.contributions if by == "contribution" else self.scores
        k = min(k, key.numel())
        _, idx = (-key if negative else key).topk(k)
        return [(int(i), float(self.contributions[i]), float(self.scores[i]), float(self.max_acts[i]))
                for i in idx.tolist()]


def attribute(engine: Engine, tokens: Sequence[int], position: int | None = None,
              edits: Sequence[Edit] = ()) -> Attribution:
    """Attribute the token at ``tokens[position]`` (default: the last one) to the SAE's latents."""
    sae, site = engine.sae, engine.site
    if sae is None or site is None:
        raise ValueError("attribution needs an SAE: start the app with --sae SAE_DIR")
    tokens = [int(t) for t in tokens]
    position = len(tokens) - 1 if position is None else int(position)
    if not 1 <= position < len(tokens):
        raise ValueError(f"position {position} cannot be explained: it must be in 1..{len(tokens) - 1} (a token "
                         "with at least one token before it)")
    if position > engine.max_seq_len:
        raise ValueError(f"position {position} is past the context of {engine.max_seq_len} tokens")
    engine.check_edits(edits)
    model = engine.llm.model
    steer = steer_fn(sae, tuple(edits))
    read: dict[str, torch.Tensor] = {}

    def at_site(x: torch.Tensor) -> torch.Tensor:
        # A fresh leaf: the gradient stops here, so nothing before the site is differentiated.
        y = steer(x).detach().requires_grad_(True)
        read["y"] = y
        return y

    device = model.tok_embeddings.weight.device
    ids = torch.tensor([tokens[:position]], dtype=torch.long, device=device)
    target = tokens[position]
    # Without the cache: a forward at start_pos=0 would write graph-carrying keys/values into its buffers.
    with engine.lock, engine.frozen_weights(), model.without_cache(), model.hooks(None, {site: at_site}), \
            torch.enable_grad():
        logits = model(ids, 0, last_only=True)[0, -1].float()  # [vocab]
        metric = logits[target] - logits.mean()
        (grad,) = torch.autograd.grad(metric, read["y"])
    y = read["y"].detach()[0].float()  # [T, d]
    g = grad[0].float()  # [T, d]
    with torch.no_grad():
        # d y_t / d h_{t,i} = W_dec[i] / out_scale_t (decode is linear in h), so the summed gradient is
        # W_dec @ sum_t g_t / out_scale_t.
        stats = sae.norm_stats(y)
        summed = (g / stats.out_scale).sum(0) if sae.cfg.normalization != "none" else g.sum(0)
        per_pos = g / stats.out_scale if sae.cfg.normalization != "none" else g  # [T, d] d metric / d x_hat
        scores = sae.W_dec.float() @ summed
        code = sae.encode(y, sparse=True)
        idx, vals = code.indices, code.values.float()  # [T, k]
        max_acts = torch.zeros(sae.cfg.n_latents, device=y.device)
        max_acts.scatter_reduce_(0, idx.reshape(-1), vals.reshape(-1), "amax")
        # Activation x gradient of each active (position, latent): h * (W_dec[latent] . gradient there).
        grads = (sae.W_dec.float()[idx] * per_pos[:, None, :]).sum(-1)  # [T, k]
        contributions = torch.zeros(sae.cfg.n_latents, device=y.device)
        contributions.index_add_(0, idx.reshape(-1), (vals * grads).reshape(-1))
    return Attribution(tokens=tokens[:position + 1], position=position,
                       token_text=engine.llm.tokenizer.decode([target]), metric=float(metric.detach()),
                       scores=scores.cpu(), max_acts=max_acts.cpu(), contributions=contributions.cpu())
