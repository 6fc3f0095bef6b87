"""The FID Inception-v3: the TensorFlow "2015-12-05" graph that FID, IS and the ADM suite are defined with, in PyTorch.

Architecture and weights are those of pytorch-fid / torch-fidelity (`pt_inception-2015-12-05-6726825d.pth`, converted
from TensorFlow; Apache-2.0), whose parameter names this module keeps so that the same state dict loads unchanged.
The network is written here rather than imported because both libraries import torchvision, which this project cannot
install beside its torch (see docs/evaluation.md). Input handling follows the TF graph (and
torch-fidelity): uint8 images, TF1 bilinear resize (align_corners=False, no half-pixel centres) to 299x299, then
(x - 128) / 128.

Weights: `weights_path` (or the environment variable `ARPG_HF_INCEPTION_WEIGHTS`) names a local file; otherwise the
file is taken from torch's hub cache (`$TORCH_HOME/hub/checkpoints`, shared with pytorch-fid) or downloaded into it,
unless the process is offline (`HF_HUB_OFFLINE=1`), which is then a clear error.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)

INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_ENV = "ARPG_HF_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
NUM_POOL_FEATURES = 2048
NUM_LOGITS = 1008


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False): source coordinate = destination * in / out.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`, float): the images.
    Returns:
        `torch.Tensor` of shape `(B, C, size, size)`.
    """

    def grid(in_size: int):
        coords = torch.arange(size, dtype=torch.float32, device=images.device) * (in_size / size)
        low = coords.long()
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, (coords - low.float()).to(images.dtype)

    y_low, y_high, dy = grid(images.shape[2])
    x_low, x_high, dx = grid(images.shape[3])
    top, bottom = images[:, :, y_low], images[:, :, y_high]  # (B, C, size, W)
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * dx  # (B, C, size, size)
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * dx
    return top + (bottom - top) * dy[:, None]


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """TensorFlow's 3x3 average pool ignores the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """`max_pool`: the last block of the TF graph pools with a max where the paper (and the first block) average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionV3FeatureExtractor(nn.Module):
    """FID Inception-v3 with the feature-extractor interface of `arpg_hf.metrics`.

    `forward(images)` takes `(B, 3, H, W)` uint8 images and returns `{"pool": (B, 2048), "logits": (B, 1008)}` float32:
    the pool3 features (FID, precision/recall) and the unbiased logits (pool features times the softmax weights, no
    bias: the Inception score as ADM and improved-gan compute it). Build it with [`load_inception_v3`].
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(NUM_POOL_FEATURES, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}.")
        x = resize_bilinear_tf1(images.to(self.fc.weight.dtype), INPUT_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)  # ends at (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        logits = pool @ self.fc.weight.T  # (B, 1008), no bias
        return {"pool": pool.float(), "logits": logits.float()}


def inception_weights_file(weights_path: str | os.PathLike | None = None) -> str:
    """The local path of the FID Inception weights: `weights_path`, else `$ARPG_HF_INCEPTION_WEIGHTS`, else torch's hub
    cache (downloaded there first when online)."""
    weights_path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights file {weights_path} does not exist.")
        return os.fspath(weights_path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_WEIGHTS_URL))
    if os.path.isfile(cached):
        return cached
    how_to = (
        f"Download {INCEPTION_WEIGHTS_URL} on a machine with internet access and pass it as weights_path "
        f"(--inception_weights in the pipelines) or set {INCEPTION_WEIGHTS_ENV}=/path/to/file, or place it at {cached}."
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"The FID Inception weights are not cached and the process is offline. {how_to}")
    logger.info(f"Downloading the FID Inception weights to {cached}")
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, cached, hash_prefix="6726825d", progress=False)
    except Exception as error:  # URLError, hash mismatch, ...
        raise FileNotFoundError(f"Could not download the FID Inception weights ({error}). {how_to}") from error
    return cached


def load_inception_v3(weights_path: str | os.PathLike | None = None, device=None) -> InceptionV3FeatureExtractor:
    """The FID Inception-v3 with the standard weights, in eval mode (see [`inception_weights_file`])."""
    model = InceptionV3FeatureExtractor()
    state_dict = torch.load(inception_weights_file(weights_path), map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.requires_grad_(False).eval().to(device or "cpu")
