"""Tests for the DSNet model family and the strict official-checkpoint loader."""

import dataclasses

import pytest
import torch

from bluelm_ros.tools.dsnet.checkpoint import (CheckpointError, infer_variant, load_dsnet,
                                               load_official_state_dict)
from bluelm_ros.tools.dsnet.model import DSNet, VARIANTS, count_parameters, get_variant

# Eval-model key counts and parameter counts (19 classes) of the official variants.
OFFICIAL = {
    'dsnet_head64': (611, 6.55e6),
    'dsnet_head128': (611, 6.76e6),
    'dsnet_head256': (617, 9.99e6),
    'm': (665, 37.5e6),
}
H, W = 64, 128


def meta_model(variant, num_classes=19, aux_heads=False):
    """Build a shape-only model (no memory, instant even for DSNet-Base)."""
    with torch.device('meta'):
        return DSNet(variant, num_classes, aux_heads=aux_heads)


def randomized(model, seed=0):
    """Give BN layers non-trivial statistics so a wrong or missing load shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
    return model


def calibrated(model, size=(H, W), seed=0):
    """Set BN running stats from a few batches, so eval activations stay O(1)."""
    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, *size))
    return model.eval()


@pytest.fixture(scope='module')
def tiny():
    """Build a dsnet_tiny with aux heads and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    return randomized(DSNet('dsnet_tiny', 19, aux_heads=True)).eval()


def official_training_dict(model):
    """Return ``model``'s weights laid out like upstream FullModel.state_dict()."""
    sd = {'model.' + k: v.clone() for k, v in model.state_dict().items()}
    sd['sem_loss.criterion.weight'] = torch.rand(model.num_classes)
    return sd


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_official_key_and_param_counts(name):
    """Eval key counts are exact; parameter counts match the paper table within 2%."""
    keys, params = OFFICIAL[name]
    model = meta_model(name)
    assert len(model.state_dict()) == keys
    assert count_parameters(model) == pytest.approx(params, rel=0.02)
    assert get_variant(name).official


def test_key_names_match_upstream():
    """Spot-check state_dict key names against the official model."""
    sd = meta_model('dsnet_head128').state_dict()
    for key in ('conv1.0.weight', 'conv1.0.bias', 'conv1.4.running_var',
                'layer1.1.bn2.weight', 'layer2.0.downsample.0.weight',
                'layer3.0.conv_list.0.conv.weight', 'layer3.2.process2.1.bias',
                'layer5.0.conv3.weight', 'layer5_.0.bn3.weight', 'compression5.1.weight',
                'aff1.context1.1.weight', 'aff3.global_att.5.running_mean',
                'aff2.local_att.3.bias', 'spp.pooling.1.weight', 'spp.process3.0.bias',
                'layer1_a.0.conv1.weight', 'up8.1.weight', 'lastlayer.conv1.weight',
                'lastlayer.bn2.weight', 'lastlayer.conv2.bias'):
        assert key in sd, key
    assert 'layer4.2.process1.0.weight' not in sd
    assert 'layer4.2.process1.0.weight' in meta_model('m').state_dict()
    assert 'layer1_a.0.downsample.0.weight' in meta_model('dsnet_head256').state_dict()


def test_tiny_is_unofficial_head64_layout():
    """dsnet_tiny is dsnet_head64 at planes=16 and is flagged as unofficial."""
    tiny, head64 = VARIANTS['dsnet_tiny'], VARIANTS['dsnet_head64']
    assert not tiny.official and tiny.planes == 16
    assert dataclasses.replace(tiny, name=head64.name, planes=32, official=True,
                               note=head64.note) == head64
    assert len(meta_model('dsnet_tiny').state_dict()) == 611
    with pytest.raises(ValueError):
        dataclasses.replace(head64, head_in=4)
    with pytest.raises(KeyError):
        get_variant('dsnet_huge')


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_aux_heads_add_only_seghead_keys(name):
    """aux_heads=True adds the seghead_p/seghead_d keys and nothing else."""
    plain = set(meta_model(name).state_dict())
    aux = set(meta_model(name, aux_heads=True).state_dict())
    assert plain < aux
    extra = aux - plain
    assert len(extra) == 26
    assert all(k.startswith(('seghead_p.', 'seghead_d.')) for k in extra)


def test_forward_shapes(tiny):
    """Training with aux heads gives 3 outputs; eval gives N x K x H x W logits."""
    x = torch.randn(2, 3, H, W)
    tiny.train()
    try:
        with torch.no_grad():
            outs = tiny(x)
    finally:
        tiny.eval()
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 19, H, W) for o in outs)
    with torch.no_grad():
        assert tiny(x).shape == (2, 19, H, W)
        # Sizes that are not multiples of 8 still run (upstream would crash).
        assert tiny(torch.randn(1, 3, 60, 100)).shape == (1, 19, 60, 100)
    head = DSNet('dsnet_head64', 7).eval()
    with torch.no_grad():
        assert head(x[:1]).shape == (1, 7, H, W)


def test_round_trip_official_formats(tiny, tmp_path):
    """Weights saved in upstream formats load back to bit-identical outputs."""
    np = pytest.importorskip('numpy')
    x = torch.randn(2, 3, H, W)  # batch > 1: training-mode BN on the 1x1 global pool
    with torch.no_grad():
        want = tiny(x)
    sd = official_training_dict(tiny)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.01, momentum=0.9)
    wrapped = tmp_path / 'checkpoint.pth.tar'
    torch.save({'epoch': 5, 'best_mIoU': np.array([0.5, 0.7]).mean(), 'state_dict': sd,
                'optimizer': opt.state_dict()}, wrapped)
    plain = tmp_path / 'best.pt'
    torch.save({k: v for k, v in tiny.state_dict().items()
                if not k.startswith('seghead')}, plain)
    model_key = tmp_path / 'ours.pt'
    torch.save({'model': tiny.state_dict()}, model_key)

    state = load_official_state_dict(wrapped)
    assert len(state) == 611 and not any(k.startswith(('seghead', 'model.')) for k in state)
    assert len(load_official_state_dict(wrapped, keep_aux=True)) == 637

    for path in (wrapped, plain, model_key):
        model = load_dsnet(path, 'dsnet_tiny', 19)
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model(x), want)

    # The aux heads come back too when asked for (training-mode outputs match).
    model = load_dsnet(wrapped, 'dsnet_tiny', 19, aux_heads=True).train()
    tiny.train()
    try:
        with torch.no_grad():
            for got, ref in zip(model(x), tiny(x)):
                assert torch.equal(got, ref)
    finally:
        tiny.eval()
    with pytest.raises(CheckpointError, match='aux_heads=False'):
        load_dsnet(plain, 'dsnet_tiny', 19, aux_heads=True)


def test_mismatches_raise(tiny, tmp_path):
    """Wrong variant, class count, missing or extra keys raise CheckpointError."""
    sd = official_training_dict(tiny)
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': sd}, good)

    with pytest.raises(CheckpointError) as err:
        load_dsnet(good, 'dsnet_head64', 19)
    msg = str(err.value)
    assert 'good.pth' in msg and "variant='dsnet_tiny'" in msg
    assert 'aff1.context1.1.weight' in msg and 'more' in msg
    assert isinstance(err.value, ValueError)

    with pytest.raises(CheckpointError) as err:
        load_dsnet(good, 'dsnet_tiny', 150)
    assert 'lastlayer.conv2.weight' in str(err.value)
    assert 'num_classes=19' in str(err.value)

    missing = dict(sd)
    del missing['model.layer2.0.bn1.running_mean']
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(CheckpointError, match=r'missing keys 1: layer2\.0\.bn1\.running_mean'):
        load_dsnet(tmp_path / 'missing.pth', 'dsnet_tiny', 19)

    extra = dict(sd, **{'model.refiner.weight': torch.zeros(3)})
    torch.save(extra, tmp_path / 'extra.pth')
    with pytest.raises(CheckpointError, match=r'unexpected keys 1: refiner\.weight'):
        load_dsnet(tmp_path / 'extra.pth', 'dsnet_tiny', 19)

    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError):
        load_dsnet(tmp_path / 'junk.pth', 'dsnet_tiny', 19)


@pytest.mark.parametrize('name', sorted(VARIANTS))
@pytest.mark.parametrize('num_classes', [19, 150])
def test_infer_variant(name, num_classes):
    """infer_variant recovers variant and class count from shapes alone."""
    sd = meta_model(name, num_classes, aux_heads=True).state_dict()
    assert infer_variant(sd) == (name, num_classes)
    assert infer_variant({'model.' + k: v for k, v in sd.items()}) == (name, num_classes)


def test_infer_variant_failures(monkeypatch):
    """infer_variant raises on non-DSNet, unknown and ambiguous state dicts."""
    sd = meta_model('dsnet_tiny').state_dict()
    with pytest.raises(CheckpointError, match='class count'):
        infer_variant({'conv1.0.weight': sd['conv1.0.weight']})
    with pytest.raises(CheckpointError, match='no DSNet variant'):
        infer_variant({k: v for k, v in sd.items() if not k.startswith('aff3.')})
    monkeypatch.setitem(VARIANTS, 'tiny_copy',
                        dataclasses.replace(VARIANTS['dsnet_tiny'], name='tiny_copy'))
    with pytest.raises(CheckpointError, match='ambiguous'):
        infer_variant(sd)


def test_onnx_export_parity(tmp_path):
    """A static dynamo/opset-18 export matches PyTorch in onnxruntime."""
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    size = (96, 128)
    model = calibrated(DSNet('dsnet_tiny', 19), size)
    x = torch.randn(1, 3, *size)
    path = tmp_path / 'dsnet_tiny.onnx'
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18,
                      input_names=['image'], output_names=['logits'], verbose=False)
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = torch.from_numpy(sess.run(None, {'image': x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape == (1, 19, *size)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert (got - want).abs().max().item() < 1e-3
