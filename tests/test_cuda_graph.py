"""CUDA-graph replay of the denoiser in sampling: same images, refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_cuda
from wdmctl.cli.bench import parse_cuda_graphs
from wdmctl.diffusion import make_noise_scheduler
from wdmctl.errors import WdmError
from wdmctl.models import build_model
from wdmctl.apps.sample import SampleRequest, run_sample
from wdmctl.diffusion.sampler import CudaGraphDenoiser, model_denoiser, sample_images


def tiny_model(device="cpu"):
    return build_model("WDM-S/2", width=32, depth=1, d_state=4, sample_size=8, in_channels=3,
                       num_classes=4).to(device).eval()


def test_cuda_graph_refused_on_cpu():
    with pytest.raises(WdmError, match="--cuda-graph needs the model on a CUDA device, not cpu"):
        model_denoiser(tiny_model(), "fp32", cuda_graph=True)


def test_cuda_graph_refused_for_exported_backends():
    with pytest.raises(WdmError, match="--cuda-graph is for --backend torch"):
        run_sample(SampleRequest(backend="onnx", cuda_graph=True))


def test_cuda_graph_refused_on_cpu_before_anything_is_written(tmp_path):
    with pytest.raises(WdmError, match="--cuda-graph needs a CUDA device, not cpu"):
        run_sample(SampleRequest(cuda_graph=True, device="cpu", out=str(tmp_path / "samples")))
    assert list(tmp_path.iterdir()) == []


def test_parse_cuda_graphs():
    assert parse_cuda_graphs("off") == [False]
    assert parse_cuda_graphs("off, on") == [False, True]
    with pytest.raises(WdmError, match="--cuda-graphs takes off, on or off,on, not 'yes'"):
        parse_cuda_graphs("yes")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replay_gives_the_same_images(precision):
    needs_cuda()
    model = tiny_model("cuda")
    config = dict(make_noise_scheduler().config)
    kwargs = dict(seeds=list(range(6)), labels=[0, 1, 2, 3, 0, 1], steps=8, cfg=2.0, batch_size=4, device="cuda",
                  precision=precision)
    eager = sample_images(model, config, None, **kwargs)
    graphed = model_denoiser(model, precision, cuda_graph=True)
    replayed = sample_images(model, config, None, denoiser=graphed, **kwargs)
    assert isinstance(graphed, CudaGraphDenoiser)
    assert len(graphed.graphs) == 2          # batch 4 and the last batch of 2, each doubled by guidance
    assert (eager.astype(int) - replayed.astype(int)).__abs__().max() <= 1   # uint8 rounding at most
    x = torch.randn(3, 3, 8, 8, device="cuda")
    t = torch.full((3,), 500.0, device="cuda")
    y = torch.tensor([0, 1, 2], device="cuda")
    first = graphed(x, t, y)
    graphed(torch.randn_like(x), t, y)       # the graph's buffer is overwritten, the returned tensor is not
    torch.testing.assert_close(first, model_denoiser(model, precision)(x, t, y), rtol=1e-3, atol=1e-3)
