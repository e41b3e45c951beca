"""The `speedrun` network: what makes the airbench class of CIFAR-10 nets train fast.

- a frozen 2×2 patch-whitening first layer, initialised from training-image patches
  (`WhiteningConv.init_from_images`): its first half of filters projects every 2×2×C patch
  onto the eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), so its output
  is white; the second half is the negation, so the GELU after it loses no information;
- identity (dirac) init of every 3×3 convolution: each starts as a pass-through of its first
  input channels, so the untrained net is a shallow, well-conditioned function;
- BatchNorm (the recipe freezes its scale at 1, `freeze_bn_scale`, and trains its bias at
  a higher lr, `bias_lr_scale`), GELU, three conv groups (conv, max pool, BN, GELU, conv,
  BN, GELU);
- a global max pool and a linear head scaled by 1/9.

The registered builder is in toolkit.models; this module needs nothing from it. The trainer
calls `prepare(images)` with normalised training images before the first epoch of a new run
(toolkit.train.setup.build) and `start_epoch(epoch)` at every epoch, so the whitening bias
trains for WHITEN_BIAS_EPOCHS epochs and is then frozen, as in airbench.
"""

from __future__ import annotations

import torch
from torch import nn

WHITEN_KERNEL = 2
# Eigenvalue floor: patches have a few near-zero-variance directions; whitening them fully
# would amplify noise without bound.
WHITEN_EPS = 5e-4
WHITEN_SAMPLE = 5000  # training images whose patches estimate the covariance
WHITEN_BIAS_EPOCHS = 3  # the whitening layer's bias trains this long, then stays
HEAD_SCALE = 1 / 9
BN_MOMENTUM = 0.4  # torch's convention (airbench's 0.6 is 1 - this)
BN_EPS = 1e-12


class WhiteningConv(nn.Conv2d):
    """2×2 conv, no padding, 2·C·k² filters: ±the whitening transform of the image patches.

    The filters are a buffer, not a parameter: set from data, never trained (they are in the
    state_dict, so checkpoints and the export carry them); the bias trains.
    """

    def __init__(self, in_channels: int, kernel: int = WHITEN_KERNEL):
        out = 2 * in_channels * kernel * kernel
        super().__init__(in_channels, out, kernel, padding=0, bias=True)
        del self.weight  # the parameter Conv2d made: replaced by a buffer of the same shape
        self.register_buffer("weight", torch.zeros(out, in_channels, kernel, kernel))
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_images(self, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
        """Set the filters from normalised N×C×H×W float images (fp32 arithmetic)."""
        c, (kh, kw) = self.in_channels, self.kernel_size
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N C H' W' kh kw
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        # Largest variance first; row i of `filters` is eigenvector i / sqrt(lambda_i).
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.reshape(-1, c, kh, kw)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    # The recipe freezes the scale at 1 (--freeze-bn-scale): only the shift trains.
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _identity_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """conv, 2× max pool, BN, GELU, conv, BN, GELU (pooling before the BN is cheaper)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _identity_conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batch_norm(cout)
        self.conv2 = _identity_conv(cout, cout)
        self.norm2 = _batch_norm(cout)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class SpeedrunNet(nn.Module):
    """whiten, GELU, 3 conv groups (w, 4w, 4w), global max pool, linear head × 1/9."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.whiten = WhiteningConv(in_channels)
        widths = [self.whiten.out_channels, width, 4 * width, 4 * width]
        self.groups = nn.Sequential(
            *(ConvGroup(cin, cout) for cin, cout in zip(widths, widths[1:], strict=False))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)  # global: any input size gives one vector
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.head_scale = HEAD_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The whitening layer is fp32 even under autocast: its filters are 1/sqrt(lambda)
        # large, and bf16's 8-bit mantissa would round away the small-variance directions.
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                x = nn.functional.gelu(self.whiten(x.float()))
        else:  # no autocast region in the graph the ONNX exporter traces
            x = nn.functional.gelu(self.whiten(x))
        x = self.pool(self.groups(x)).flatten(1)
        return self.head(x) * self.head_scale

    def prepare(self, images: torch.Tensor) -> None:
        """Before the first epoch: whiten with the patch statistics of these normalised
        training images (at most WHITEN_SAMPLE of them)."""
        self.whiten.init_from_images(images[:WHITEN_SAMPLE])

    def start_epoch(self, epoch: int) -> None:
        """The whitening bias trains in epochs 1..WHITEN_BIAS_EPOCHS, then is frozen."""
        self.whiten.bias.requires_grad_(epoch <= WHITEN_BIAS_EPOCHS)
