"""BatchNorm folding for fair eager timings (bluelm_ros/tools/dsnet/fold.py)."""
import torch

from bluelm_ros.tools.dsnet.fold import fold_batchnorm
from bluelm_ros.tools.dsnet.model import DSNet


def test_folded_dsnet_gives_the_same_logits_with_no_batchnorm_left():
    torch.manual_seed(0)
    model = DSNet('dsnet_tiny', 19)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(2):
            model(torch.randn(2, 3, 96, 128))
    model.eval()
    folded, count = fold_batchnorm(model)
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.999
    # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
