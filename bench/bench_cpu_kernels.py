"""CPU inference kernels against their PyTorch twins on the encoder's shapes (base preset, float32):

    pytest bench/bench_cpu_kernels.py --benchmark-only --benchmark-group-by=group

- ``stem``: the patch embedding's conv stack (three conv + GroupNorm + GELU), ``cpu.patch_stem`` vs the
  modules (oneDNN convolutions).
- ``posconv``: the positional depthwise conv (19x7) plus its residual, ``cpu.positional_conv`` vs the module
  (oneDNN) and an add; ``magnitude``: the patch spectra's |z|, ``cpu.magnitude`` vs ``Tensor.abs``.
- ``ffn``: the feed-forward block of one layer, ``cpu.feed_forward`` (LayerNorm + both GEMMs per block of
  rows) vs ``F.layer_norm`` -> ``F.linear`` -> ``F.gelu`` -> ``F.linear`` + residual.

Read a ratio within one group of one run (same process, same inputs); the encoder as a whole is timed by
``cbramod-fast bench``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbramod_fast import CBraMod
from cbramod_fast.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.stem_available(), reason="the C++ extension is not built")

SHAPES = {"12x10 B=1": (1, 12, 10), "12x10 B=8": (8, 12, 10), "19x30 B=1": (1, 19, 30), "19x30 B=8": (8, 19, 30)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CBraMod().eval()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_stem(benchmark, model, impl, shape):
    x = torch.randn(*SHAPES[shape], 200)
    benchmark.group = f"stem {shape}"
    with torch.no_grad():
        benchmark(model.patch_embedding.stem, x, impl)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_ffn(benchmark, model, impl, shape):
    layer = model.encoder.layers[0]
    x = torch.randn(*SHAPES[shape], 200).view(-1, 200)
    ln, l1, l2 = layer.norm2, layer.linear1, layer.linear2
    benchmark.group = f"ffn {shape}"
    if impl == "cpp":
        p1, p2 = cpu.pack_weight(l1.weight.detach()), cpu.pack_weight(l2.weight.detach())
        args = (ln.weight.detach(), ln.bias.detach(), ln.eps, p1, l1.bias.detach(), p2, l2.bias.detach())
        fn = lambda: cpu.feed_forward(x, *args)
    else:
        fn = lambda: x + l2(F.gelu(l1(F.layer_norm(x, (200,), ln.weight, ln.bias, ln.eps))))
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_posconv(benchmark, model, impl, shape):
    h = torch.randn(*SHAPES[shape], 200)
    conv = model.patch_embedding.positional_encoding[0]
    benchmark.group = f"posconv {shape}"
    threads = torch.get_num_threads()
    fn = (lambda: cpu.positional_conv(h, conv, threads)) if impl == "cpp" else \
        (lambda: h + conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_magnitude(benchmark, impl, shape):
    z = torch.fft.rfft(torch.randn(*SHAPES[shape], 200), dim=-1, norm="forward")
    benchmark.group = f"magnitude {shape}"
    threads = torch.get_num_threads()
    benchmark((lambda: cpu.magnitude(z, threads)) if impl == "cpp" else z.abs)
