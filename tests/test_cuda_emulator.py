"""The CUDA emulator itself (lowbit._cuda_emu, csrc/cuda_emu): kernels with planted bugs must fail under it, their
correct twins must pass under every thread order, and the real kernels must go through its barriers, shuffles and
cp.async pipeline. Skipped in a build without the emulator."""
import numpy as np
import pytest
import torch
from torch.utils.dlpack import to_dlpack

from lowbit.ops import cuda_emulation as emu
from lowbit.ops._native import is_cuda

pytestmark = pytest.mark.skipif(not emu.available(), reason="this build has no CUDA emulator")

X = torch.arange(64, dtype=torch.float32) * 0.5 + 1.0
EXPECTED = {
    "barrier": X.roll(-1),
    "cp_async_wait": X,
    "stage_reuse": X.reshape(4, 16).flip(1).reshape(64),
    "shuffle": X + X.reshape(2, 2, 16).flip(1).reshape(64),
    "in_bounds": X,
}


def run(name: str, order: str = "forward", seed: int = 0) -> torch.Tensor:
    out = torch.zeros(64)
    with emu.cuda_emulation(order, seed):
        from lowbit.ops._native import _C
        _C.run_selftest(name, to_dlpack(X), to_dlpack(out))
    return out


@pytest.mark.parametrize("order", emu.ORDERS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_correct_kernels_pass_under_every_order(name, order):
    for seed in range(3):
        assert torch.equal(run(name, order, seed), EXPECTED[name])


def shuffle_reference(op: str, v: np.ndarray) -> np.ndarray:
    """CUDA's rules, lane by lane: up/down stay inside segments of `width` lanes (out of range: own value), idx
    reads lane src mod width of the segment, xor reads lane ^ mask unless that lies in a later segment."""
    out = np.empty_like(v)
    for t in range(64):
        warp, lane = divmod(t, 32)
        width, src = {"shfl_up": (16, lane - 3), "shfl_down": (8, lane + 5), "shfl_idx": (4, None),
                      "shfl_xor": (16, lane ^ 20)}[op]
        segment = lane // width * width
        if op == "shfl_idx":
            src = segment + 9 % width
        elif not segment <= src < segment + width and not (op == "shfl_xor" and src < segment):
            src = lane
        out[t] = v[32 * warp + src]
    return out


@pytest.mark.parametrize("order", emu.ORDERS)
@pytest.mark.parametrize("op", ["shfl_up", "shfl_down", "shfl_idx", "shfl_xor"])
def test_shuffles_follow_cudas_lane_rules(op, order):
    assert torch.equal(run(op, order), torch.from_numpy(shuffle_reference(op, X.numpy())))


def test_pure_intrinsics_match_their_documented_semantics():
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    words[32:48] = np.array([0x0000, 0x0001, 0x03ff, 0x0400, 0x3c00, 0xbc00, 0x7bff, 0x7c00, 0xfc00, 0x7e00,
                             0x8001, 0x3555, 0xc000, 0x5640, 0x1234, 0xabcd], dtype=np.uint32)
    floats = np.array([0.0, -0.0, 1e-8, 6e-8, 3e-8, 65504.0, 65520.0, 1e6, -2.5, 0.1, 1 / 3, 2049.0, 2051.0, 5.96e-8,
                       np.inf, 1.00048828125], dtype=np.float32)
    words[48:] = floats.view(np.uint32)
    x = torch.from_numpy(words.view(np.float32).copy())
    out = torch.zeros(64)
    with emu.cuda_emulation():
        from lowbit.ops._native import _C
        _C.run_selftest("intrinsics", to_dlpack(x), to_dlpack(out))
    got = out.numpy().view(np.uint32)
    b = words.view(np.uint8).reshape(64, 4)
    for t in range(16):  # dp4a: signed bytes
        dot = t + int((b[t].view(np.int8).astype(np.int64) * b[t + 1].view(np.int8).astype(np.int64)).sum())
        assert got[t] == np.uint32(dot & 0xffffffff)
    for t in range(16, 32):  # byte_perm: byte i = byte (sel >> 4i) & 7 of y:x
        pool = np.concatenate([b[t], b[t + 1]])
        sel = int(words[t + 2]) & 0x7777
        assert got[t] == int.from_bytes(bytes(pool[(sel >> (4 * i)) & 7] for i in range(4)), "little")
    halves = (words[32:48] & 0xffff).astype(np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got[32:48], halves.view(np.uint32))  # exact, NaN payload included
    with np.errstate(over="ignore"):  # 65520 and 1e6 round to inf
        expected = floats.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got[48:] & 0xffff, expected)  # round to nearest even


@pytest.mark.parametrize("order", emu.ORDERS)
def test_atomics(order):
    out = run("atomics", order)
    words = out.numpy().view(np.uint32)
    assert out[0] == X.sum()  # the halves and integers of X sum exactly in any order
    assert list(words[1:4]) == [64, 5, 63]


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_missing_barrier_changes_the_result(order):
    out = run("missing_barrier", order)
    assert not torch.equal(out, EXPECTED["barrier"])
    assert torch.isnan(out).any()  # it read shared memory no thread had written: the poison


def test_a_random_schedule_replays_from_its_seed():
    first, again, other = (run("missing_barrier", "random", seed) for seed in (11, 11, 12))
    assert torch.equal(first.isnan(), again.isnan()) and torch.equal(first.nan_to_num(), again.nan_to_num())
    assert not torch.equal(first.isnan(), other.isnan())  # another seed, another interleaving


def test_missing_barrier_is_caught_by_random_orders():
    assert any(not torch.equal(run("missing_barrier", "random", seed), EXPECTED["barrier"]) for seed in range(4))


def test_stage_read_before_its_cp_async_wait_reads_poison():
    assert torch.isnan(run("read_before_wait", "forward")).all()  # copies land at their wait
    assert not torch.isnan(run("read_before_wait", "reverse")).any()  # copies land when issued
    assert any(torch.isnan(run("read_before_wait", "random", seed)).any() for seed in range(4))


@pytest.mark.parametrize("order", emu.ORDERS)
def test_stage_refilled_while_others_read_it_changes_the_result(order):
    assert any(not torch.equal(run("stage_refilled_while_read", order, seed), EXPECTED["stage_reuse"])
               for seed in range(4))


@pytest.mark.parametrize("order", emu.ORDERS)
def test_shuffle_mask_not_naming_the_caller_is_an_error(order):
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync with mask 0x0000ffff called by lane \d+, which the mask "
                                           r"does not name \(kernel xor_shuffle_kernel"):
        run("wrong_mask", order)


@pytest.mark.parametrize("order", emu.ORDERS)
def test_shuffle_mask_naming_an_absent_lane_is_an_error(order):
    with pytest.raises(RuntimeError, match="mask 0xffffffff can never complete: lane 16 of warp 0 has exited"):
        run("half_warp_shuffle", order)


@pytest.mark.parametrize("order", emu.ORDERS)
@pytest.mark.parametrize("name,reached", [("divergent_barrier", "32 of 64"), ("early_return", "60 of 64")])
def test_barrier_not_reached_by_every_thread_is_an_error(name, reached, order):
    with pytest.raises(RuntimeError, match=f"__syncthreads at .*selftest_kernels.cu:\\d+ is reached by {reached}"):
        run(name, order)


@pytest.mark.parametrize("name,message", [
    ("read_past_end", r"read past the end of run_selftest argument 'x' \(256 bytes\), at its end \+ 0 bytes"),
    ("write_past_end", r"wrote past the end of run_selftest argument 'out' \(256 bytes\), at its end \+ 0 bytes"),
])
def test_one_element_past_a_tensor_is_caught(name, message):
    with pytest.raises(RuntimeError, match=message + r" \(kernel shifted_copy_kernel, block \(0, 0, 0\), thread "
                                                     r"\(63, 0, 0\)\)"):
        run(name)
    assert torch.equal(run("in_bounds"), X)  # the emulator runs on after a fault


def test_errors_leave_outputs_untouched_and_the_emulator_usable():
    out = torch.full((64,), 7.0)
    with emu.cuda_emulation():
        from lowbit.ops._native import _C
        with pytest.raises(RuntimeError):
            _C.run_selftest("early_return", to_dlpack(X), to_dlpack(out))
    assert torch.equal(out, torch.full((64,), 7.0))  # a failed call copies nothing back
    assert torch.equal(run("barrier"), EXPECTED["barrier"])


def test_real_kernels_use_barriers_shuffles_and_cp_async():
    from lowbit.ops import async_dequant_gemm, pack_uniform, prepare_async_dequant
    from lowbit.ops._native import _C
    n, k = 40, 600
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, -(-k // 128)).half() + 0.5
    x = torch.randn(3, k)
    packed = prepare_async_dequant(pack_uniform(codes, 2), k, 2)
    ref = async_dequant_gemm(x, packed, scales, None, 128, 2)
    with emu.cuda_emulation("random", 5):
        _C.reset_counters()
        y = async_dequant_gemm(x, packed, scales, None, 128, 2)
        counters = _C.counters()
    assert counters["launches"] == 2  # activation quantization, then the GEMM
    assert counters["cp_async_copies"] > 0 and counters["barriers"] > 0 and counters["warp_ops"] > 0
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-3)


def test_emulation_switches_the_native_functions_and_back():
    x = torch.zeros(2)
    assert not emu.active() and not is_cuda(x)
    with emu.cuda_emulation("reverse", 9):
        assert emu.active() and is_cuda(x)
        with emu.host_kernels():
            assert not emu.active() and not is_cuda(x)
        assert emu.active()
    assert not emu.active() and not is_cuda(x)


def test_unknown_order_is_a_value_error():
    with pytest.raises(ValueError, match="order must be one of"):
        with emu.cuda_emulation("sideways"):
            pass
