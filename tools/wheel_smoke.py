"""Smoke test of an installed lowbit wheel, run from outside the source tree by `make wheel`: the package imports
from site-packages, says what was built, and its kernels, QuantLinear and the CLI answer correctly on the CPU."""
import json
import pathlib
import subprocess
import sys

import torch

import lowbit
from lowbit.ops import hadamard_transform, pack_uniform, randomized_hadamard_transform, unpack

here = pathlib.Path(lowbit.__file__).resolve()
assert not list(here.parent.glob("_cuda_emu*")), "the wheel ships the test-only CUDA emulator"

assert "site-packages" in here.parts, f"lowbit imported from {here}, not from the installed wheel"
info = lowbit.build_info()
print(json.dumps({k: info[k] for k in ("version", "cuda", "cuda_archs", "cpu_features") if k in info}))

n = 1536  # 2^9 * 3: a non-power-of-two size
x = torch.randn(4, n)
h = torch.tensor([[1.0]])
while h.shape[0] < 512:
    h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
signs = torch.randint(0, 2, (n,)).float() * 2 - 1
y = randomized_hadamard_transform(x, signs)
assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-4), "the transform is not orthogonal"
assert torch.allclose(randomized_hadamard_transform(y, signs, inverse=True), x, atol=1e-4), "inverse failed"
assert torch.allclose(hadamard_transform(x[:, :512]), x[:, :512] @ h / 512**0.5, atol=1e-4), "H x != dense"

codes = torch.randint(0, 8, (33, 100), dtype=torch.uint8)
assert torch.equal(unpack(pack_uniform(codes, 3), 3, 100), codes), "3-bit pack/unpack round trip"

linear = torch.nn.Linear(256, 64)
layer = lowbit.quantize_linear(linear, "rtn", 4, 128)
xs = torch.randn(3, 256)
with torch.no_grad():
    ref = xs @ layer.dequantize().t() + linear.bias
    exact = lowbit.QuantLinear(layer.weight, linear.bias.detach(), float_activations=True)
    assert torch.allclose(exact(xs), ref, atol=1e-4), "QuantLinear forward (LUT kernel)"
    assert float((layer(xs) - ref).abs().max() / ref.abs().max()) < 3e-2, "QuantLinear forward (int8 activations)"

cli = pathlib.Path(sys.executable).with_name("lowbit")
out = json.loads(subprocess.run([str(cli), "info"], check=True, capture_output=True, text=True).stdout)
assert out["version"] == lowbit.__version__
print(f"wheel smoke test passed: lowbit {lowbit.__version__} from {here.parent}")
