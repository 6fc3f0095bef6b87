"""Training objective of the VQ tokenizer ([`ARPGVQModel`]): reconstruction + codebook + commitment losses.

The quantizer is the one of [`ARPGVQModel`]: latents and codebook rows are l2-normalised and every latent takes its
nearest row. While training, [`register_codebook_normalization`] lets the optimizer move free rows that the model only
ever sees normalised (as LlamaGen normalises its rows at every use); [`remove_codebook_normalization`] stores the
normalised rows before saving. Training follows VQ-VAE (van den Oord et al., 2017):

* codebook loss `mean((e - sg[z])^2)` moves the chosen rows `e` towards the (normalised) encoder latents `z`;
* commitment loss `beta * mean((z - sg[e])^2)` (beta 0.25) keeps the encoder close to its codes;
* the decoder sees `z + sg[e - z]` (straight-through estimator): the forward value is `e`, the gradient of the
  reconstruction loss flows to the encoder as if quantization were the identity.

Unused codes can be restarted at random encoder latents of the current batch (`restart_dead_codes`), and the
codebook can be initialised from encoder latents (`init_codebook_from_latents`); both are common remedies against
codebook collapse on small codebooks. Every function here takes plain tensors and no Accelerator, so tests call them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .vq_model import L2_NORM_EPS, ARPGVQModel, l2_normalize_rows

DEFAULT_COMMITMENT_BETA = 0.25
RECONSTRUCTION_LOSSES = ("mse", "l1")


@dataclass
class QuantizerOutput:
    """Output of [`quantize_with_losses`].

    Args:
        quantized (`torch.FloatTensor` of shape `(B, D, h, w)`): `z + sg[e - z]`, the decoder's input (value `e`).
        indices (`torch.LongTensor` of shape `(B, h, w)`): the chosen codes.
        codebook_loss (`torch.FloatTensor`, scalar): `mean((e - sg[z])^2)`.
        commitment_loss (`torch.FloatTensor`, scalar): `beta * mean((z - sg[e])^2)`.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


@dataclass
class VQLossOutput:
    """Output of [`vq_training_loss`]: `loss = reconstruction_loss + codebook_loss + commitment_loss`.

    Args:
        loss (`torch.FloatTensor`, scalar): the total loss to back-propagate.
        reconstruction_loss (`torch.FloatTensor`, scalar): MSE or L1 between the reconstruction and the images.
        codebook_loss (`torch.FloatTensor`, scalar): see [`QuantizerOutput`].
        commitment_loss (`torch.FloatTensor`, scalar): see [`QuantizerOutput`] (beta included).
        reconstruction (`torch.FloatTensor` of shape `(B, C, H, W)`): the decoded images (not clamped).
        indices (`torch.LongTensor` of shape `(B, h, w)`): the chosen codes.
        latents (`torch.FloatTensor` of shape `(B, D, h, w)`): the (normalised) encoder latents `z`, detached.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    reconstruction: torch.Tensor
    indices: torch.Tensor
    latents: torch.Tensor


class _L2NormalizedRows(nn.Module):
    """A parametrization: the stored rows, l2-normalised."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return l2_normalize_rows(rows)


def register_codebook_normalization(vq: ARPGVQModel) -> None:
    """Makes the codebook rows free parameters that the model sees l2-normalised (a torch parametrization of
    `vq.quantize.embedding.weight`; gradients flow through the normalisation). Call it before building the optimizer;
    the free rows are then `codebook_rows(vq)`."""
    if not parametrize.is_parametrized(vq.quantize.embedding, "weight"):
        parametrize.register_parametrization(vq.quantize.embedding, "weight", _L2NormalizedRows())


def remove_codebook_normalization(vq: ARPGVQModel) -> None:
    """Stores the normalised rows as the codebook again (undoes [`register_codebook_normalization`]), e.g. before
    `save_pretrained`."""
    if parametrize.is_parametrized(vq.quantize.embedding, "weight"):
        parametrize.remove_parametrizations(vq.quantize.embedding, "weight", leave_parametrized=True)


def codebook_rows(vq: ARPGVQModel) -> torch.nn.Parameter:
    """The codebook parameter `(num_vq_embeddings, vq_embed_dim)`: the free rows while the normalisation is
    registered, the stored (normalised) rows otherwise."""
    embedding = vq.quantize.embedding
    if parametrize.is_parametrized(embedding, "weight"):
        return embedding.parametrizations.weight.original
    return embedding.weight


def normalized_latents(vq: ARPGVQModel, pre_quant: torch.Tensor) -> torch.Tensor:
    """`pre_quant` `(B, D, h, w)` l2-normalised over `D` (as the quantizer searches it), in `vq.compute_dtype`."""
    return F.normalize(pre_quant.to(vq.compute_dtype), p=2, dim=1, eps=L2_NORM_EPS)


def quantize_with_losses(
    vq: ARPGVQModel, pre_quant: torch.Tensor, beta: float = DEFAULT_COMMITMENT_BETA
) -> QuantizerOutput:
    """Quantizes `pre_quant` `(B, D, h, w)` with `vq`'s codebook and returns the straight-through codes and losses."""
    if beta < 0:
        raise ValueError(f"The commitment weight beta must be >= 0, got {beta!r}.")
    codes, indices = vq.quantize_latents(pre_quant)  # (B, D, h, w), differentiable w.r.t. the codebook rows
    latents = normalized_latents(vq, pre_quant)  # (B, D, h, w), differentiable w.r.t. the encoder
    codebook_loss = F.mse_loss(codes, latents.detach())
    commitment_loss = beta * F.mse_loss(latents, codes.detach())
    quantized = latents + (codes - latents).detach()  # value: codes; gradient: identity to the encoder
    return QuantizerOutput(quantized, indices, codebook_loss, commitment_loss)


def vq_training_loss(
    vq: ARPGVQModel,
    images: torch.Tensor,
    beta: float = DEFAULT_COMMITMENT_BETA,
    reconstruction: str = "mse",
    decoder_only: bool = False,
) -> VQLossOutput:
    """The VQ-VAE objective on a batch.

    Args:
        vq ([`ARPGVQModel`]): the tokenizer being trained.
        images (`torch.FloatTensor` of shape `(B, C, H, W)`): images in [-1, 1].
        beta (`float`, *optional*, defaults to 0.25): weight of the commitment loss.
        reconstruction (`str`, *optional*, defaults to `"mse"`): `"mse"` or `"l1"`.
        decoder_only (`bool`, *optional*, defaults to `False`): train the decoder side alone: the codes come from
            `vq.encode` without gradients (a frozen encoder and codebook give every image its tokens of inference),
            and the loss is the reconstruction loss alone (codebook and commitment losses are 0).
    """
    if reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction!r}.")
    vq._check_images(images)
    if decoder_only:
        with torch.no_grad():
            encoded = vq.encode(images)
        pre_quant, quantized, indices = encoded.pre_quant_latents, encoded.latents, encoded.indices
        codebook_loss = commitment_loss = quantized.new_zeros(())
    else:
        pre_quant = vq.quant_conv(vq.encoder(images.to(vq.dtype)))  # (B, D, h, w)
        quantizer = quantize_with_losses(vq, pre_quant, beta)
        quantized, indices = quantizer.quantized, quantizer.indices
        codebook_loss, commitment_loss = quantizer.codebook_loss, quantizer.commitment_loss
    decoded = vq.decode(quantized).sample  # (B, C, H, W)
    target = images.to(decoded.dtype)
    if reconstruction == "mse":
        reconstruction_loss = F.mse_loss(decoded, target)
    else:
        reconstruction_loss = F.l1_loss(decoded, target)
    loss = reconstruction_loss + codebook_loss + commitment_loss
    return VQLossOutput(
        loss=loss,
        reconstruction_loss=reconstruction_loss,
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
        reconstruction=decoded,
        indices=indices,
        latents=normalized_latents(vq, pre_quant).detach(),
    )


# ------------------------------------------------------------------------------------------- codebook upkeep


def _random_latent_rows(latents: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` rows `(count, D)` drawn (with replacement) from the latents `(B, D, h, w)`."""
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
    picks = torch.randint(flat.shape[0], (count,), generator=generator, device=generator.device if generator else None)
    return flat[picks.to(flat.device)]


@torch.no_grad()
def init_codebook_from_latents(
    vq: ARPGVQModel, latents: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Sets every codebook row to a random (normalised) encoder latent of `latents` `(B, D, h, w)`."""
    rows = codebook_rows(vq)
    rows.copy_(_random_latent_rows(latents, vq.config.num_vq_embeddings, generator).to(rows.dtype))


@torch.no_grad()
def restart_dead_codes(
    vq: ARPGVQModel, usage_counts: torch.Tensor, latents: torch.Tensor, generator: torch.Generator | None = None
) -> int:
    """Moves every code with `usage_counts == 0` to a random encoder latent of `latents` `(B, D, h, w)`.

    Args:
        usage_counts (`torch.LongTensor` of shape `(num_vq_embeddings,)`): how often each code was chosen recently.

    Returns:
        `int`: the number of codes restarted.
    """
    dead = torch.nonzero(usage_counts == 0).flatten()
    if dead.numel():
        rows = codebook_rows(vq)
        rows[dead.to(rows.device)] = _random_latent_rows(latents, dead.numel(), generator).to(rows.dtype)
    return int(dead.numel())


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in `indices` (any shape): `(codebook_size,)` int64."""
    return torch.bincount(indices.flatten().long(), minlength=codebook_size)


def codebook_perplexity(usage_counts: torch.Tensor) -> float:
    """`exp(entropy)` of the code distribution: the effective number of codes in use."""
    probabilities = usage_counts.double() / usage_counts.sum().clamp(min=1)
    entropy = -(probabilities * probabilities.clamp(min=1e-30).log()).sum()
    return float(entropy.exp())


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of every image, `(B,)`, for images in [-1, 1] (measured on [0, 1], after
    clamping the reconstruction)."""
    error = (reconstruction.float().clamp(-1, 1) - images.float()).div(2).pow(2).flatten(1).mean(dim=1)  # (B,)
    return -10.0 * torch.log10(error.clamp(min=1e-12))
