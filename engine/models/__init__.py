"""Model registry: ``build_model(name, in_channels, num_classes, image_size)``.

Every entry is a factory ``(in_channels, num_classes, image_size, **options) -> nn.Module``;
the channel count and number of classes always come from the data, never from the name.
``torchvision:<name>`` builds any torchvision classifier (weights are never downloaded: users
on air-gapped clusters, and our CI, have no network).

``small-cnn`` and ``resnet18-cifar`` take the LCNN model options (``engine.models.lcnn``):
``activation`` ("relu" or "centered_softplus"), ``beta``, ``spectral_norm``, ``bn_gamma``,
``trainable_beta_gamma`` and ``lcnn=True`` (all of the paper's choices at once). With none
given they build exactly the plain networks (same modules, same initialisation draws).
torchvision models take no options.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.lcnn import LayerOptions
from engine.registry import Registry, import_submodules

MODELS: Registry = Registry("model")


@MODELS.register("small-cnn")
def small_cnn(in_channels: int, num_classes: int, image_size: int = 28, width: int = 32, **options) -> nn.Module:
    """Two conv blocks (conv-BN-ReLU-pool) and a linear head on a 4x4 pooled map; for 8x8 to
    32x32 inputs. About 30k parameters at width 32 (plus 10k per class in the head): cheap
    enough to train several proxies on a laptop. The 4x4 map keeps coarse spatial layout,
    which global average pooling throws away (test accuracy 0.763 vs 0.811 on fashion-mnist-mini after 8 epochs).
    LCNN options (module docstring) swap the conv, BN, activation and linear layers.
    """
    o = LayerOptions(**options)
    w = width
    pool2 = image_size >= 16  # 8x8 digits keep their resolution for the second block
    model = nn.Sequential(
        o.conv(in_channels, w, 3, padding=1),
        o.bn(w),
        o.act(inplace=True),
        nn.MaxPool2d(2),
        o.conv(w, 2 * w, 3, padding=1),
        o.bn(2 * w),
        o.act(inplace=True),
        nn.MaxPool2d(2) if pool2 else nn.Identity(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        o.linear(2 * w * 16, num_classes),
    )
    return o.finish(model, in_channels, image_size)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, identity or 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, o: LayerOptions | None = None):
        super().__init__()
        o = o or LayerOptions()
        self.conv1 = o.conv(cin, cout, 3, stride, 1)
        self.bn1 = o.bn(cout)
        self.conv2 = o.conv(cout, cout, 3, 1, 1)
        self.bn2 = o.bn(cout)
        self.act = o.act()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(o.conv(cin, cout, 1, stride), o.bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 for small images: 3x3 stem, stride 1, no max-pool (He et al. CIFAR variant)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, o: LayerOptions | None = None):
        super().__init__()
        o = o or LayerOptions()
        self.stem = nn.Sequential(o.conv(in_channels, width, 3, 1, 1), o.bn(width), o.act())
        layers, cin = [], width
        for i, blocks in enumerate([2, 2, 2, 2]):
            cout = width * 2**i
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1, o))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = o.linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@MODELS.register("resnet18-cifar")
def resnet18_cifar(in_channels: int, num_classes: int, image_size: int = 32, width: int = 64, **options) -> nn.Module:
    o = LayerOptions(**options)
    return o.finish(ResNetCifar(in_channels, num_classes, width, o), in_channels, image_size)


def _torchvision(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision classifier with random weights, first conv adapted to ``in_channels``."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        known = ", ".join(sorted(torchvision.models.list_models(torchvision.models)))
        raise ConfigError(f"unknown torchvision model {name!r}; known: {known}") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
            )
            parent = model.get_submodule(module_name.rsplit(".", 1)[0]) if "." in module_name else model
            setattr(parent, module_name.rsplit(".", 1)[-1], new)
            return
    raise ConfigError(f"cannot adapt {type(model).__name__} to {in_channels} input channels")


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options) -> nn.Module:
    """Build a freshly initialised model.

    ``name`` is a registry key or ``torchvision:<model name>`` (e.g. ``torchvision:resnet50``).
    The caller seeds torch before calling for reproducible initialisation.
    """
    if name.startswith("torchvision:"):
        if options:
            raise ConfigError(f"model {name} takes no model options (got {', '.join(sorted(options))}); "
                              "the LCNN options need small-cnn or resnet18-cifar")
        return _torchvision(name.split(":", 1)[1], in_channels, num_classes)
    factory = MODELS[name]
    try:
        return factory(in_channels, num_classes, image_size, **options)
    except TypeError as e:  # an option this factory does not know
        known = "activation, beta, spectral_norm, bn_gamma, trainable_beta_gamma, lcnn, width"
        raise ConfigError(f"model {name}: bad model options {sorted(options)} ({e}); known: {known}") from None


def check_model_name(name: str) -> None:
    """Raise ConfigError early (before any Ray work) when ``name`` cannot be built."""
    if name.startswith("torchvision:"):
        import torchvision

        tv = name.split(":", 1)[1]
        if tv not in torchvision.models.list_models(torchvision.models):
            _torchvision(tv, 3, 2)  # raises with the list of names
        return
    MODELS[name]


# models defined in other modules of this package register themselves on import (any new file)
import_submodules(__name__, __path__)
