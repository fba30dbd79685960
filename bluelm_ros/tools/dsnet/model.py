"""DSNet real-time semantic segmentation network (PyTorch).

A re-implementation of DSNet ("Revisiting the design of atrous convolutions in
modern CNNs", arXiv 2406.03702). Module names, nesting and ``nn.Sequential``
ordering reproduce the official eval models (github.com/takaniwa/DSNet, MIT),
so their checkpoints load with strict key/shape checks (see ``checkpoint.py``).

Layout (C = ``planes``), everything after ``layer2`` stays at 1/8 resolution::

    conv1 (1/4) -> layer1 -+-> layer1_a ------------------------------+ (1/4 skip)
                           +-> layer2 (1/8) -+-> context: layer3 -> layer4 -> layer5
                                             +-> spatial: layer3_ -> layer4_ -> layer5_
    each spatial stage is fused with the compressed context stage by an MSAF,
    then SPASPP -> up8 -> x2 -> concat(1/4 skip) -> lastlayer -> input size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# The official code uses BatchNorm2d(momentum=0.1) with the default eps everywhere.
BN_MOMENTUM = 0.1

# Dilation rates of the three chained convs in each MFACB of the context branch.
LAYER3_DILATIONS = ((2, 2, 2), (2, 2, 2), (3, 3, 3))
LAYER4_DILATIONS = ((3, 3, 3), (5, 5, 5), (5, 5, 5))  # the 3rd MFACB only in DSNet-Base
SPASPP_RATES = (6, 12, 18, 24)
LAYER5_DILATION = 5


@dataclass(frozen=True)
class DSNetVariant:
    """Hyper-parameters of one DSNet variant; multipliers are in units of ``planes``."""

    name: str
    planes: int           # C: stem width
    m: int                # BasicBlocks in layer1 and layer2
    n: int                # BasicBlocks in layer3_ and layer4_ (spatial branch)
    layer4_mfacbs: int    # MFACBs in layer4 (2, or 3 for DSNet-Base)
    up8_out: int          # up8 conv output channels / C
    head_in: int          # lastlayer input channels / C (= up8_out + layer1_a_out)
    head_inter: int       # lastlayer hidden channels / C
    spp_in: int           # SPASPP input / C (always 4: the fused spatial branch)
    spp_inter: int        # SPASPP chained-conv width / C
    spp_out: int          # SPASPP output / C (= up8 input)
    layer1_a_out: int     # 1/4 skip (layer1_a) output channels / C
    official: bool = True  # False: our own variant, no official checkpoint exists
    note: str = ''

    def __post_init__(self):
        """Reject combinations the network wiring cannot satisfy."""
        if self.head_in != self.up8_out + self.layer1_a_out:
            raise ValueError(f'{self.name}: head_in must equal up8_out + layer1_a_out')
        if self.spp_in != 4:
            raise ValueError(f'{self.name}: spp_in must be 4 (SPASPP follows the 4C branch)')
        if not 1 <= self.layer4_mfacbs <= len(LAYER4_DILATIONS):
            raise ValueError(f'{self.name}: layer4_mfacbs must be in 1..{len(LAYER4_DILATIONS)}')
        if self.planes % 4 or self.planes < 4:
            raise ValueError(f'{self.name}: planes must be a positive multiple of 4')


VARIANTS: Dict[str, DSNetVariant] = {
    v.name: v for v in (
        DSNetVariant('dsnet_head64', planes=32, m=2, n=2, layer4_mfacbs=2, up8_out=2,
                     head_in=3, head_inter=2, spp_in=4, spp_inter=4, spp_out=4,
                     layer1_a_out=1, note='official; BDD10K'),
        DSNetVariant('dsnet_head128', planes=32, m=2, n=2, layer4_mfacbs=2, up8_out=4,
                     head_in=5, head_inter=4, spp_in=4, spp_inter=4, spp_out=4,
                     layer1_a_out=1, note='official; Cityscapes'),
        DSNetVariant('dsnet_head256', planes=32, m=2, n=2, layer4_mfacbs=2, up8_out=8,
                     head_in=10, head_inter=8, spp_in=4, spp_inter=8, spp_out=8,
                     layer1_a_out=2, note='official; ADE20K'),
        DSNetVariant('m', planes=64, m=2, n=3, layer4_mfacbs=3, up8_out=4,
                     head_in=5, head_inter=4, spp_in=4, spp_inter=4, spp_out=4,
                     layer1_a_out=1, note='official DSNet-Base; all datasets'),
        # NOT an official DSNet variant: dsnet_head64 at half width (planes=16). The project
        # trains it itself and ships it as the offline default; no upstream weights exist.
        DSNetVariant('dsnet_tiny', planes=16, m=2, n=2, layer4_mfacbs=2, up8_out=2,
                     head_in=3, head_inter=2, spp_in=4, spp_inter=4, spp_out=4,
                     layer1_a_out=1, official=False,
                     note='NOT official: dsnet_head64 layout at planes=16 (project-trained)'),
    )
}

# Friendlier spellings accepted by get_variant(); VARIANTS keeps the official names only.
VARIANT_ALIASES = {'dsnet_base': 'm', 'dsnet_m': 'm', 'head64': 'dsnet_head64',
                   'head128': 'dsnet_head128', 'head256': 'dsnet_head256'}


def get_variant(variant: Union[str, DSNetVariant]) -> DSNetVariant:
    """Return the variant for a name (or alias), or the variant itself."""
    if isinstance(variant, DSNetVariant):
        return variant
    key = VARIANT_ALIASES.get(variant, variant)
    if key not in VARIANTS:
        raise KeyError(f'unknown DSNet variant {variant!r}; known: {sorted(VARIANTS)}')
    return VARIANTS[key]


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, relu: bool = True,
            bias: bool = False, stride: int = 1, dilation: int = 1) -> List[nn.Module]:
    """Return [Conv2d, BatchNorm2d(, ReLU)] for splicing into an ``nn.Sequential``.

    A list rather than a module: the official keys index the layers of the
    enclosing Sequential directly (``process1.0.weight``, ``process1.1.bias``).
    """
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=dilation * (kernel // 2),
                        dilation=dilation, bias=bias),
              _bn(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ConvBNReLU(nn.Module):
    """3x3 (dilated) conv -> BN -> ReLU, with named children ``conv``/``bn``."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = _bn(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and ReLU."""
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; ``no_relu`` leaves the sum un-activated (stage outputs)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, no_relu: bool = False,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = _bn(planes)
        self.downsample = downsample
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two 3x3 convs plus the (projected) shortcut."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        out = out + shortcut
        return out if self.no_relu else self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (dilated) -> 1x1 bottleneck with expansion 2; no final ReLU by default."""

    expansion = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, no_relu: bool = True,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck convs plus the (projected) shortcut."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        out = out + shortcut
        return out if self.no_relu else self.relu(out)


def make_stage(block, inplanes: int, planes: int, blocks: int, stride: int = 1,
               dilation: int = 1) -> nn.Sequential:
    """Stack ``blocks`` residual blocks the way the official ``_make_layer`` does.

    The first block carries the stride and a 1x1 projection when the shape
    changes and keeps the block's default ``no_relu``; of the later blocks the
    last one skips its ReLU, because the caller applies (or omits) it itself.
    """
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(*conv_bn(inplanes, planes * block.expansion, 1,
                                            relu=False, stride=stride))
    layers = [block(inplanes, planes, stride, downsample, dilation=dilation)]
    inplanes = planes * block.expansion
    for i in range(1, blocks):
        layers.append(block(inplanes, planes, no_relu=(i == blocks - 1), dilation=dilation))
    return nn.Sequential(*layers)


class MFACB(nn.Module):
    """Multi-scale Feature Aggregation Conv Block.

    Three chained dilated 3x3 convs grow the receptive field quickly; all three
    outputs are concatenated (so every intermediate scale is kept), fused by a
    1x1 conv and added to a 1x1 shortcut.
    """

    def __init__(self, in_planes: int, inter_planes: int, out_planes: int,
                 dilation: Sequence[int] = (2, 2, 2)):
        super().__init__()
        self.conv_list = nn.ModuleList([
            ConvBNReLU(in_planes, inter_planes, dilation[0]),
            ConvBNReLU(inter_planes, inter_planes, dilation[1]),
            ConvBNReLU(inter_planes, inter_planes, dilation[2]),
        ])
        self.process1 = nn.Sequential(*conv_bn(in_planes, out_planes))         # shortcut
        self.process2 = nn.Sequential(*conv_bn(inter_planes * 3, out_planes))  # fuse concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregate the chained dilated convs and add the shortcut."""
        outs = []
        out = x
        for conv in self.conv_list:
            out = conv(out)
            outs.append(out)
        return self.process2(torch.cat(outs, dim=1)) + self.process1(x)


def _attention_path(channels: int, inter: int, pool: Optional[int]) -> nn.Sequential:
    # 1x1 squeeze -> BN -> ReLU -> 1x1 excite -> BN (convs with bias, as upstream),
    # optionally after an adaptive average pool to a pool x pool grid.
    layers: List[nn.Module] = [] if pool is None else [nn.AdaptiveAvgPool2d(pool)]
    layers += [nn.Conv2d(channels, inter, 1), _bn(inter), nn.ReLU(inplace=True),
               nn.Conv2d(inter, channels, 1), _bn(channels)]
    return nn.Sequential(*layers)


class MSAF(nn.Module):
    """Multi-Scale Attention Fusion of the spatial and the context branch.

    Attention weights come from five views of ``x + residual``: pixel level
    (``local_att``), 4x4/8x8/16x16 region pools (``context1..3``, nearest
    upsampled back) and the global pool (``global_att``, broadcast). The output
    blends the two inputs: ``2*x*w + 2*residual*(1-w)``.
    """

    POOLS = (4, 8, 16)

    def __init__(self, channels: int, r: int = 4):
        super().__init__()
        inter = channels // r
        self.local_att = _attention_path(channels, inter, None)
        self.context1 = _attention_path(channels, inter, self.POOLS[0])
        self.context2 = _attention_path(channels, inter, self.POOLS[1])
        self.context3 = _attention_path(channels, inter, self.POOLS[2])
        self.global_att = _attention_path(channels, inter, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Fuse spatial features ``x`` with compressed context ``residual``."""
        # Plain ints (static under export) keep the ONNX Resize sizes constant.
        size = (int(x.shape[-2]), int(x.shape[-1]))
        xa = x + residual
        logits = self.local_att(xa) + self.global_att(xa)
        for ctx in (self.context1, self.context2, self.context3):
            logits = logits + F.interpolate(ctx(xa), size=size, mode='nearest')
        wei = self.sigmoid(logits)
        return 2 * x * wei + 2 * residual * (1 - wei)


class ImagePooling(nn.Sequential):
    """ASPP image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> broadcast."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool, project and broadcast back to the input's spatial size."""
        # Upstream bilinearly upsamples the 1x1 map; that is a broadcast, so expand.
        return super().forward(x).expand(-1, -1, x.shape[-2], x.shape[-1])


class SPASPP(nn.Module):
    """Serial-Parallel ASPP: four chained atrous convs (rates 6/12/18/24) + image pooling.

    Chaining (instead of parallel ASPP) lets later rates see the earlier
    rates' context; all four outputs and the pooled branch are concatenated,
    fused by a 1x1 conv, added to a 1x1 shortcut and refined by a 3x3 conv.
    """

    def __init__(self, in_planes: int, inter_planes: int, out_planes: int,
                 rates: Sequence[int] = SPASPP_RATES):
        super().__init__()
        chans = [in_planes] + [inter_planes] * len(rates)
        self.conv_list = nn.ModuleList(
            ConvBNReLU(chans[i], chans[i + 1], rate) for i, rate in enumerate(rates))
        self.pooling = ImagePooling(in_planes, inter_planes)
        self.process1 = nn.Sequential(*conv_bn(in_planes, out_planes))  # shortcut
        self.process2 = nn.Sequential(*conv_bn(inter_planes * (len(rates) + 1), out_planes))
        self.process3 = nn.Sequential(*conv_bn(out_planes, out_planes, 3, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregate the chained atrous convs and the pooled context."""
        outs = []
        out = x
        for conv in self.conv_list:
            out = conv(out)
            outs.append(out)
        outs.append(self.pooling(x))
        return self.process3(self.process2(torch.cat(outs, dim=1)) + self.process1(x))


class SegHead(nn.Module):
    """Segmentation head: [BN ->] ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv (classes, bias).

    ``pre_bn=True`` is the training-only aux head (``seghead_p``/``seghead_d``,
    which see un-normalised fused features); the final ``lastlayer`` has none.
    """

    def __init__(self, inplanes: int, interplanes: int, num_classes: int, pre_bn: bool):
        super().__init__()
        if pre_bn:
            self.bn1 = _bn(inplanes)
        self.conv1 = nn.Conv2d(inplanes, interplanes, 3, padding=1, bias=False)
        self.bn2 = _bn(interplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(interplanes, num_classes, 1, bias=True)
        self.pre_bn = pre_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits at the input's resolution."""
        if self.pre_bn:
            x = self.bn1(x)
        x = self.conv1(F.relu(x))
        return self.conv2(self.relu(self.bn2(x)))


class DSNet(nn.Module):
    """DSNet dual-branch segmentation network.

    ``forward`` returns logits upsampled bilinearly (align_corners=False) to the
    input size. With ``aux_heads=True`` and in training mode it returns
    ``[aux_p, main, aux_d]`` instead, all three at input size (as upstream):
    ``aux_p`` from the aff1 output, ``aux_d`` from the aff2 output. In eval mode
    the aux heads are unused, so eval models need no ``seghead_*`` weights.

    Input H and W should be multiples of 8 (upstream crashes otherwise; here the
    1/8 -> 1/4 upsample targets the skip's size so other sizes also run).
    """

    def __init__(self, variant: Union[str, DSNetVariant], num_classes: int,
                 aux_heads: bool = False):
        super().__init__()
        v = get_variant(variant)
        if num_classes < 1:
            raise ValueError('num_classes must be >= 1')
        self.variant = v
        self.num_classes = num_classes
        self.aux_heads = aux_heads
        c = v.planes

        # Stem: two stride-2 convs (with bias, unlike the rest) to 1/4.
        self.conv1 = nn.Sequential(*conv_bn(3, c, 3, bias=True, stride=2),
                                   *conv_bn(c, c, 3, bias=True, stride=2))
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = make_stage(BasicBlock, c, c, v.m)
        self.layer2 = make_stage(BasicBlock, c, 2 * c, v.m, stride=2)  # 1/8, final stride

        # Context branch: dilated MFACBs and a dilated bottleneck, no further downsampling.
        self.layer3 = nn.Sequential(
            MFACB(2 * c, 2 * c, 4 * c, LAYER3_DILATIONS[0]),
            MFACB(4 * c, 4 * c, 4 * c, LAYER3_DILATIONS[1]),
            MFACB(4 * c, 4 * c, 4 * c, LAYER3_DILATIONS[2]),
        )
        self.layer4 = nn.Sequential(
            MFACB(4 * c, 4 * c, 8 * c, LAYER4_DILATIONS[0]),
            *(MFACB(8 * c, 8 * c, 8 * c, LAYER4_DILATIONS[i])
              for i in range(1, v.layer4_mfacbs)),
        )
        self.layer5 = make_stage(Bottleneck, 8 * c, 4 * c, 1, dilation=LAYER5_DILATION)

        # Context -> spatial projections feeding the MSAF fusions.
        self.compression3 = nn.Sequential(*conv_bn(4 * c, 4 * c, relu=False))
        self.compression4 = nn.Sequential(*conv_bn(8 * c, 4 * c, relu=False))
        self.compression5 = nn.Sequential(*conv_bn(8 * c, 4 * c, relu=False))

        # Spatial (detail) branch at 1/8 with plain convs.
        self.layer3_ = make_stage(BasicBlock, 2 * c, 4 * c, v.n)
        self.layer4_ = make_stage(BasicBlock, 4 * c, 4 * c, v.n)
        self.layer5_ = make_stage(Bottleneck, 4 * c, 2 * c, 1)

        self.aff1 = MSAF(4 * c)
        self.aff2 = MSAF(4 * c)
        self.aff3 = MSAF(4 * c)

        # Decoder.
        self.spp = SPASPP(v.spp_in * c, v.spp_inter * c, v.spp_out * c)
        self.layer1_a = make_stage(BasicBlock, c, v.layer1_a_out * c, 1)  # 1/4 skip
        self.up8 = nn.Sequential(*conv_bn(v.spp_out * c, v.up8_out * c, 3, relu=False))
        self.lastlayer = SegHead(v.head_in * c, v.head_inter * c, num_classes, pre_bn=False)

        if aux_heads:
            self.seghead_p = SegHead(4 * c, 4 * c, num_classes, pre_bn=True)
            self.seghead_d = SegHead(4 * c, c, num_classes, pre_bn=True)

        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as upstream: He (fan_out) convs, unit/zero BN; conv biases default.
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Segment a normalised RGB batch (N, 3, H, W) into class logits (N, K, H, W)."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x = self.layer1(self.conv1(x))        # 1/4, layer1 ends without ReLU
        skip = self.layer1_a(x)               # upstream feeds the pre-ReLU features here
        x = self.relu(self.layer2(self.relu(x)))

        ctx = self.layer3(x)
        spatial = self.aff1(self.layer3_(x), self.compression3(ctx))
        aux_p_in = spatial
        ctx = self.layer4(ctx)
        spatial = self.aff2(self.layer4_(self.relu(spatial)), self.compression4(ctx))
        aux_d_in = spatial
        ctx = self.relu(self.layer5(ctx))
        spatial = self.aff3(self.layer5_(self.relu(spatial)), self.compression5(ctx))

        out = self.up8(self.spp(self.relu(spatial)))
        out = F.interpolate(out, size=(int(skip.shape[-2]), int(skip.shape[-1])),
                            mode='bilinear', align_corners=False)
        out = self.lastlayer(torch.cat((out, skip), dim=1))
        out = F.interpolate(out, size=size, mode='bilinear', align_corners=False)

        if self.aux_heads and self.training:
            aux_p = F.interpolate(self.seghead_p(aux_p_in), size=size, mode='bilinear',
                                  align_corners=False)
            aux_d = F.interpolate(self.seghead_d(aux_d_in), size=size, mode='bilinear',
                                  align_corners=False)
            return [aux_p, out, aux_d]
        return out


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters (BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=64)
def _expected_shapes(variant: DSNetVariant, num_classes: int,
                     aux_heads: bool) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    with torch.device('meta'):  # shapes only: no memory, no init cost
        model = DSNet(variant, num_classes, aux_heads=aux_heads)
    return tuple((k, tuple(t.shape)) for k, t in model.state_dict().items())


def expected_shapes(variant: Union[str, DSNetVariant], num_classes: int,
                    aux_heads: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Return ``{state_dict key: shape}`` of a variant without allocating weights."""
    return dict(_expected_shapes(get_variant(variant), num_classes, aux_heads))
