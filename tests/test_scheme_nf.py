"""The paper's NF format: codebooks, storage, and the vectorised roundtrip against a
straightforward per-block numpy reference written from docs/PAPER.md."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import erfinv

from coalora_edge.errors import SchemeError
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.nf import CODEBOOKS, SCHEME

NF2 = [-1.0, 0.0, 0.3379152, 1.0]
NF3 = [-1.0, -0.4786292, -0.2171418, 0.0, 0.1609302, 0.3379152, 0.5626169, 1.0]
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # QLoRA's NF4


# ---------------------------------------------------------------- reference (numpy, float32)

def ref_codebook(bits: int) -> np.ndarray:
    delta = 0.9677083
    half = 2 ** (bits - 1)
    p = np.concatenate([np.linspace(1 - delta, 0.5, half)[:-1], np.linspace(0.5, delta, half + 1)])
    p = p.astype(np.float32).astype(np.float64)
    sigma = -1 / (math.sqrt(2) * erfinv(1 - 2 * delta))
    values = (sigma * math.sqrt(2) * erfinv(2 * p - 1)).astype(np.float32)
    values[0], values[-1] = -1, 1
    return values


def ref_cast(x: np.float32, dtype: str) -> np.float32:
    """Round an fp32 to the scale dtype and back, to nearest even, without torch."""
    if dtype == "fp16":
        return np.float32(np.float16(x))
    if dtype == "bf16":
        u = int(np.array(x, dtype=np.float32).view(np.uint32))
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return np.array(u, dtype=np.uint32).view(np.float32)[()]
    return np.float32(x)


def ref_quantize(
    w: np.ndarray, bits: int, b0: int, dtype: str, B0: int, B1: int
) -> SimpleNamespace:
    """PAPER.md steps 1-5, one group and one block at a time."""
    cb = ref_codebook(bits)
    mid = (cb[:-1] + cb[1:]) / np.float32(2)
    blocks = w.reshape(-1, B0)
    s0 = np.array([np.abs(blk).max() for blk in blocks], dtype=np.float32)
    o = s0.min()
    L = np.float32(2**b0 - 1)
    r = SimpleNamespace(out=np.empty_like(blocks), codes=np.empty(blocks.shape, np.uint8), o=o,
                        q0=np.empty(len(blocks), np.uint8), s1=[], s1_blk=[], enc=[])
    for start in range(0, len(blocks), B1):
        group = range(start, min(start + B1, len(blocks)))
        s1 = ref_cast(max(s0[i] - o for i in group), dtype)
        r.s1.append(s1)
        for i in group:
            s0p = s0[i] - o
            q0 = np.clip(np.round(s0p * L / s1), 0, L) if s1 > 0 else np.float32(0)
            enc = q0 / (L / s1) + o if s1 > 0 else o
            dec = o + q0 * s1 / L
            x = blocks[i] / enc if enc != 0 else np.zeros(B0, np.float32)
            c = (mid[None, :] < x[:, None]).sum(axis=1)  # midpoints strictly below: ties go down
            r.codes[i], r.out[i], r.q0[i] = c, cb[c] * dec, q0
            r.s1_blk.append(s1)
            r.enc.append(enc)
    r.out, r.codes = r.out.reshape(w.shape), r.codes.reshape(w.shape)
    return r


def on_ties(w: np.ndarray, bits: int, b0: int, dtype: str, B0: int, B1: int) -> np.ndarray:
    """Move ``w`` onto the roundings that the order of operations decides.

    Each block keeps its absmax position (so ``o`` and every group max stay put): inner
    blocks get an absmax with ``s0' * (2^b0-1) / s1`` at k + 1/2, then other weights are
    set to ``midpoint * encoding scale`` so that ``w / scale`` lands on a bucket edge.
    """
    rng = np.random.default_rng(0)
    blocks = w.reshape(-1, B0).copy()
    at = np.abs(blocks).argmax(axis=1)
    s0 = np.abs(blocks).max(axis=1)
    o, L = s0.min(), np.float32(2**b0 - 1)
    r = ref_quantize(w, bits, b0, dtype, B0, B1)
    group_max = np.repeat([s0[i:i + B1].max() for i in range(0, len(s0), B1)], B1)
    for i in range(len(blocks)):
        new = o + (np.float32(rng.integers(0, L)) + np.float32(0.5)) * r.s1_blk[i] / L
        if o < s0[i] < group_max[i] and o < new < group_max[i]:
            blocks[i, at[i]] = np.copysign(new, blocks[i, at[i]])
    r = ref_quantize(blocks.reshape(w.shape), bits, b0, dtype, B0, B1)
    mid = (ref_codebook(bits)[:-1] + ref_codebook(bits)[1:]) / np.float32(2)
    for i, blk in enumerate(blocks):
        for j in rng.choice(B0, B0 // 2, replace=False):
            edge = rng.choice(mid) * r.enc[i]
            if j != at[i] and abs(edge) < abs(blk[at[i]]):
                blk[j] = edge
    return blocks.reshape(w.shape)


def parse(name: str) -> tuple[int, int, str, int, int]:
    b, b0, dtype, B0, B1 = re.fullmatch(r"nf(\d)-s(\d)-(\w+)-(\d+)x(\d+)", name).groups()
    return int(b), int(b0), dtype, int(B0), int(B1)


def sample_weights(out: int, inp: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Heavy-ish tails and row scales spread over two decades, so scales round visibly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-1, 1, out)[:, None].float()
    w[torch.rand(out, inp, generator=g) < 0.002] *= 8
    return (w * scale).float()


REFERENCE_CASES = [
    ("nf2-s2-bf16-16x16", 1.0),
    ("nf3-s3-fp16-32x64", 1.0),
    ("nf4-s4-fp32-64x256", 1.0),
    ("nf8-s8-bf16-64x16", 1.0),
    ("nf4-s8-fp32-64x256", 1.0),
    ("nf2-s8-fp16-16x256", 1.0),
    ("nf8-s2-fp32-32x16", 1.0),
    ("nf3-s4-bf16-16x64", 1.0),
    ("nf4-s3-fp16-64x16", 1e-6),  # fp16 s1 goes subnormal
    ("nf4-s8-bf16-32x64", 1e-3),
]


def test_reference_cases_cover_every_field_value() -> None:
    cases = [parse(name) for name, _ in REFERENCE_CASES]
    assert [sorted({c[k] for c in cases}) for k in range(5)] == [
        [2, 3, 4, 8], [2, 3, 4, 8], ["bf16", "fp16", "fp32"], [16, 32, 64], [16, 64, 256]
    ]


# ---------------------------------------------------------------- codebooks

@pytest.mark.parametrize("bits,expected", [(2, NF2), (3, NF3), (4, NF4)])
def test_codebook_matches_paper(bits: int, expected: list[float]) -> None:
    np.testing.assert_allclose(CODEBOOKS[bits].numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_exact_and_shaped(bits: int) -> None:
    cb = CODEBOOKS[bits]
    assert cb.dtype == torch.float32 and len(cb) == 2**bits
    assert np.array_equal(cb.numpy(), ref_codebook(bits))
    assert cb[0] == -1 and cb[-1] == 1 and bool((cb[1:] > cb[:-1]).all())
    assert int((cb < 0).sum()) == 2 ** (bits - 1) - 1 and int((cb == 0).sum()) == 1


# ---------------------------------------------------------------- table and storage

def test_table() -> None:
    assert get_scheme("nf") is SCHEME
    assert len(SCHEME.formats) == 4 * 4 * 3 * 3 * 3
    for name, fmt in SCHEME.formats.items():
        b, b0, dtype, B0, B1 = parse(name)
        assert fmt.name == name and fmt.block == B0 and not fmt.uses_imatrix
        assert fmt.fields == {
            "bits": b, "scale_bits": b0, "scale_dtype": dtype, "block": B0, "group": B1
        }


def test_nominal_bits() -> None:
    assert round(SCHEME.format("nf4-s8-fp32-64x256").nominal_bits_per_weight, 3) == 4.127
    bpw = [f.nominal_bits_per_weight for f in SCHEME.formats.values()]
    # the paper's range "2.03-8.63": 2.0322 (nf2-s2-*16-64x256) and 8.625 (nf8-s8-fp32-16x16)
    assert min(bpw) == 2 + 2 / 64 + 16 / (64 * 256) and round(min(bpw), 2) == 2.03
    assert max(bpw) == 8 + 8 / 16 + 32 / (16 * 16) == 8.625


@pytest.mark.parametrize(
    "name,shape,nbytes",
    [
        # 4*2^24 + 8*2^18 + 32*2^10 + 32 bits
        ("nf4-s8-fp32-64x256", (4096, 4096), 8654852),
        # 12 blocks in one short group: 3*192 + 3*12 + 16 + 32 = 660 bits
        ("nf3-s3-bf16-16x16", (3, 64), 83),
        # 30 blocks, one short group: 2*960 + 2*30 + 16 + 32 = 2028 bits
        ("nf2-s2-fp16-32x64", (10, 96), 254),
        # 600 blocks = 256 + 256 + 88: 8*38400 + 4*600 + 32*3 + 32 bits
        ("nf8-s4-fp32-64x256", (300, 128), 38716),
    ],
)
def test_nbytes(name: str, shape: tuple[int, int], nbytes: int) -> None:
    assert SCHEME.storage(name, shape).nbytes(shape) == nbytes


def test_bits_per_weight_is_nominal_plus_offset() -> None:
    fmt = SCHEME.format("nf4-s8-fp32-64x256")
    numel = 4096 * 4096
    assert fmt.bits_per_weight((4096, 4096)) == fmt.nominal_bits_per_weight + 32 / numel


def test_shape_refused() -> None:
    with pytest.raises(SchemeError, match="smaller block"):
        SCHEME.storage("nf4-s8-fp32-64x256", (8, 96))
    assert SCHEME.storage("nf4-s8-fp32-32x256", (8, 96)).name == "nf4-s8-fp32-32x256"
    with pytest.raises(SchemeError, match="smaller block"):
        SCHEME.format("nf4-s8-fp32-64x256").roundtrip(torch.zeros(8, 96))


def test_default_choices() -> None:
    names = SCHEME.choices()
    assert 10 <= len(names) <= 16
    bpw = [SCHEME.format(n).nominal_bits_per_weight for n in names]
    assert min(bpw) < 2.2 and max(bpw) > 8.5
    for field in ("bits", "scale_bits", "scale_dtype", "block", "group"):
        assert len({SCHEME.format(n).fields[field] for n in names}) > 1, field


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_casts_round_half_even(dtype: torch.dtype) -> None:
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + ulp / 8], dtype=torch.float32)
    assert x.to(dtype).float().tolist() == [1.0, 1 + 2 * ulp, 1 + ulp]
    r = sample_weights(64, 64, 1.0).flatten()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert [float(v) for v in r.to(dtype).float()] == [float(ref_cast(v, name)) for v in r.numpy()]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "on-ties"])
@pytest.mark.parametrize("name,scale", REFERENCE_CASES)
def test_roundtrip_equals_reference(name: str, scale: float, ties: bool) -> None:
    fmt_args = parse(name)
    B0, B1 = fmt_args[3], fmt_args[4]
    w = sample_weights(B1 + 3, 2 * B0, scale)  # 2*B1 + 6 blocks: the last group is short
    if ties:
        w = torch.from_numpy(on_ties(w.numpy(), *fmt_args))
    fmt = SCHEME.format(name)
    ref = ref_quantize(w.numpy(), *fmt_args)
    stored = fmt.encode(w)
    assert np.array_equal(stored.codes.numpy(), ref.codes)
    assert np.array_equal(stored.q0.numpy(), ref.q0)
    assert np.array_equal(stored.s1.float().numpy(), np.array(ref.s1))
    assert float(stored.o) == float(ref.o)
    out = fmt.roundtrip(w)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(ref.out))
    half = w.to(torch.bfloat16)
    assert torch.equal(fmt.roundtrip(half), fmt.roundtrip(half.float()))


@pytest.mark.parametrize("name", ["nf2-s8-fp32-16x16", "nf4-s3-bf16-32x64"])
def test_dequantized_is_codebook_times_block_scale(name: str) -> None:
    fmt = SCHEME.format(name)
    b, b0, _, B0, B1 = parse(name)
    w = sample_weights(40, 2 * B0, 1.0, seed=1)
    st = fmt.encode(w)
    scale = st.o + st.q0.float() * st.s1.float().repeat_interleave(B1)[: len(st.q0)] / (2**b0 - 1)
    expected = CODEBOOKS[b][st.codes.long()].view(-1, B0) * scale[:, None]
    assert torch.equal(fmt.roundtrip(w), expected.view(w.shape))
    # every block's values are a subset of codebook * its scale
    for blk, s in zip(fmt.roundtrip(w).view(-1, B0), scale):
        assert set(blk.tolist()) <= set((CODEBOOKS[b] * s).tolist())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bucketing_ties_go_to_lower_code(bits: int) -> None:
    mid = (CODEBOOKS[bits][:-1] + CODEBOOKS[bits][1:]) / 2  # (2^b - 1,)
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    values = torch.cat([mid, up, down])
    lower = torch.arange(len(mid))
    expected = torch.cat([lower, lower + 1, lower])
    # One block per row, [value, 1, 0, ...]: every absmax is 1, so o = 1, s1 = 0, q0 = 0
    # and both scales are exactly 1: the values reach the bucketing unchanged.
    w = torch.zeros(len(values), 16)
    w[:, 0], w[:, 1] = values, 1.0
    fmt = SCHEME.format(f"nf{bits}-s8-fp32-16x16")
    st = fmt.encode(w)
    assert st.s1.eq(0).all() and st.q0.eq(0).all() and float(st.o) == 1.0
    assert torch.equal(st.codes[:, 0].long(), expected)
    assert torch.equal(fmt.roundtrip(w)[:, 0], CODEBOOKS[bits][expected])


def test_saturation_and_zero_blocks() -> None:
    fmt = SCHEME.format("nf4-s2-fp32-16x16")
    w = torch.zeros(4, 16)
    w[1, 0], w[2, 0], w[3, 0] = 1.0, 2.0, -1.4  # blocks of absmax 0, 1, 2, 1.4
    w[3, 1] = 0.5
    st = fmt.encode(w)
    # o = 0, s1 = 2; q0 = round(1.4 * 3 / 2) = 2, so block 3's encoding scale is 4/3 < 1.4
    assert float(st.o) == 0 and st.q0.tolist() == [0, 2, 3, 2]
    assert st.codes[3, 0] == 0  # -1.05 saturates to -1
    out = fmt.roundtrip(w)
    assert torch.isfinite(out).all() and out[0].eq(0).all()
    assert out[3, 0] == -(torch.tensor(2.0) * 2 / 3)


def test_scale_code_clamps_when_s1_rounds_down() -> None:
    fmt = SCHEME.format("nf4-s8-bf16-16x16")
    w = torch.zeros(2, 16)
    w[1, 0] = 1 + 2**-8  # a bf16 tie: s1 rounds (to even) down to 1, s0' * 255 / s1 = 255.996
    st = fmt.encode(w)
    assert st.s1.tolist() == [1.0] and st.q0.tolist() == [0, 255]


def test_refusals() -> None:
    fmt = SCHEME.format("nf4-s8-fp16-16x16")
    with pytest.raises(SchemeError, match="imatrix"):
        fmt.roundtrip(torch.zeros(2, 16), imatrix=torch.ones(16))
    with pytest.raises(SchemeError, match="bf16 or fp32"):
        fmt.roundtrip(torch.tensor([[1e5] + [0.0] * 15, [0.0] * 16]))
    with pytest.raises(SchemeError, match="NaN"):
        fmt.roundtrip(torch.full((2, 16), float("nan")))
