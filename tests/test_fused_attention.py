"""The fused Triton MTA attention against the reference (fp64), forward and every gradient.

Without CUDA the kernels run in Triton's interpreter on tiny shapes; with CUDA the same checks run
on realistic shapes in bf16, fp16 and fp32.
"""

import copy
import math

import pytest
import torch
from transformers import DataCollatorWithFlattening

mta_triton = pytest.importorskip("modeling_mta.mta_triton")
import triton  # noqa: E402  (present wherever the fused kernel imports)
import triton.language as tl  # noqa: E402

import modeling_mta.modeling_mta  # noqa: E402
from modeling_mta import MTAForCausalLM  # noqa: E402
from modeling_mta.mta_reference import mta_attention  # noqa: E402

from .tiny import mta_config, randomize_mta  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Relative L2 error allowed against the float64 reference (tf32 is never used for float32 here).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(mta_triton, "POISON_OUTPUTS", True)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in the fused result"
    return ((got.double() - want).norm() / want.norm()).item()


def check_against_reference(
    batch=2, heads=4, kv_heads=2, n=37, head_dim=16, size=(3, 5), padding="both", group=2,
    dtype=torch.float32, starts=None, ends=None, documents=None, per_token=False, dropout=0.0, seed=0, premix=None,
    post=None, looser=None,
):
    """Fused against the reference run on each span alone: a row's real tokens [starts[b], ends[b]) (padding
    around them; given per row, or with `per_token` per token), or with `documents` (per row, the begin of each
    of its packed documents) every document. `group` is the post-softmax head-mixing group, `premix` the
    pre-softmax one, `post` the post-softmax kq conv's size. `looser` multiplies the dtype's tolerance for the errors
    it names."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=generator, device=DEVICE)).to(dtype).requires_grad_()

    q, k, v = rand(batch, heads, n, head_dim), rand(batch, kv_heads, n, head_dim), rand(batch, kv_heads, n, head_dim)
    # Random kernel weights with a norm of 1.5 (the identity's is 1) leave the convolved scores about as
    # large as plain ones. A fixed spread per weight would grow them with the kernel's area (a 0.5 spread
    # makes 8 x 15 scores 5.5 times larger), and half precision cannot evaluate so sharp a softmax to the
    # tolerances: its errors scale with the scores, whatever the implementation.
    theta = rand(heads, 1, *size, spread=1.5 / math.prod(size) ** 0.5) if size else None
    mix = rand(heads // group, group, group, spread=0.7) if group else None
    premix_weight = rand(heads // premix, premix, premix, spread=0.7) if premix else None
    post_theta = rand(heads, 1, *post, spread=1.5 / math.prod(post) ** 0.5) if post else None
    if documents is None:
        starts, ends = starts or [0] * batch, ends or [n] * batch
        segments = mta_triton.row_segments(torch.tensor(starts), torch.tensor(ends))
        if per_token:
            segments = tuple(t.expand(-1, n) for t in segments)
        spans = [[(s, e)] if e > s else [] for s, e in zip(starts, ends)]
    else:
        begins = torch.zeros(batch, n, dtype=torch.bool)
        for row, row_begins in enumerate(documents):
            begins[row, row_begins] = True
        segments = mta_triton.document_segments(begins)
        spans = [list(zip(row, row[1:] + [n])) for row in documents]
    weights = {"dtheta": theta, "dmix": mix, "dpremix": premix_weight, "dpost": post_theta}
    inputs = [q, k, v] + [t for t in weights.values() if t is not None]

    out = mta_triton.mta_attention_fused(q, k, v, theta, mix, padding, segments, dropout_p=dropout, dropout_seed=99,
                                         head_mix_weight=premix_weight, kq_conv_post_weight=post_theta)
    grad_out = torch.randn(out.shape, generator=generator, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)

    wide = [t.detach().double().requires_grad_() for t in inputs]
    q64, k64, v64 = wide[:3]
    given = iter(wide[3:])
    theta64, mix64, premix64, post64 = (next(given) if t is not None else None for t in weights.values())
    ref = q64.new_zeros(batch, heads, n, head_dim)
    for row, row_spans in enumerate(spans):
        for begin, end in row_spans:
            part = (slice(row, row + 1), slice(None), slice(begin, end))
            causal = torch.ones(end - begin, end - begin, dtype=torch.bool, device=DEVICE).tril()
            ref[part], probs = mta_attention(q64[part], k64[part], v64[part], causal, theta64, post64, premix64, mix64,
                                             key_padding=padding)
            if dropout:  # the reference's maps through the kernel's masks
                keep = mta_triton.dropout_keep_scale(batch, heads, n, group or 1, dropout, 99, DEVICE)
                values = v64[part].repeat_interleave(heads // kv_heads, dim=1)
                ref[part] = (probs * keep[part[0], :, begin:end, begin:end]) @ values
    ref_grads = torch.autograd.grad(ref, wide, grad_out.double())

    tolerance = TOLERANCE[dtype]
    names = ["out", "dq", "dk", "dv"] + [name for name, t in weights.items() if t is not None]
    errors = dict(zip(names, [relative_error(out, ref)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)]))
    print(f"relative errors ({dtype}): " + ", ".join(f"{name} {e:.2e}" for name, e in errors.items()))
    assert all(e <= tolerance * (looser or {}).get(name, 1) for name, e in errors.items()), errors
    return errors


CPU_CASES = [
    dict(),  # kq conv 3 x 5 ("both") + head mix 2, GQA 2, left and right padding below
    dict(size=None),  # head-mix-only layer
    dict(group=None),  # kq conv, no head mixing
    dict(size=(2, 3), padding="left", group=4, kv_heads=1),
    dict(size=(4, 4), padding="right", group=1, kv_heads=4),
    dict(size=(1, 3)),  # no query shift: the stripe comes from the key side only
    dict(size=(3, 1), padding="left", group=None),  # no key width
    dict(size=(8, 15), n=45),  # the largest kernel the fused path takes
    dict(kv_heads=4),  # no GQA: the group's value heads differ, the kernels mix them
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_the_reference_on_tiny_shapes(case):
    check_against_reference(**{"starts": [0, 5], "ends": [37, 30], **case})


TILINGS = [
    dict.fromkeys(mta_triton.KERNELS, (16, 16, 4, 1)),
    dict.fromkeys(mta_triton.KERNELS, (64, 32, 4, 2)),
    dict.fromkeys(mta_triton.KERNELS, (32, 64, 4, 2)),
    dict(fwd=(64, 16, 4, 2), dkdv=(16, 32, 4, 2), dq=(32, 16, 4, 2), dv=(16, 64, 4, 2)),  # each kernel its own
]


@pytest.mark.parametrize("tiles", TILINGS, ids=lambda t: "-".join(f"{k}{v[0]}x{v[1]}" for k, v in t.items()))
def test_every_tiling_computes_the_same_function(tiles, monkeypatch):
    # The GPU picks tilings per kernel by head_dim, kernel size and dtype; query and key blocks of different
    # sizes change which tiles the loops visit and which of them need masks, so each shape of tiling is checked.
    monkeypatch.setattr(mta_triton, "TILES_OVERRIDE", tiles)
    check_against_reference(n=45, starts=[0, 7], ends=[45, 33])
    check_against_reference(n=45, size=None, starts=[3, 0], ends=[45, 40])
    check_against_reference(n=45, documents=[[0, 20, 21], [0, 9, 40]], post=(3, 5))


KEY_MAJOR_CASES = [
    dict(starts=[0, 5], ends=[37, 30]),  # kq conv + head mixing, GQA 2
    dict(kv_heads=4, dropout=0.3),  # dropout over the group's two value heads: 3-D products
    dict(n=45, documents=[[0, 20, 21], [0, 9, 40]], post=(3, 5)),  # packed documents, the post-softmax conv's band
    dict(heads=8, kv_heads=2, group=8, size=(2, 3), padding="left"),  # value heads in chunks: the dV kernel
]


@pytest.mark.parametrize("case", KEY_MAJOR_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_key_major_tiles_compute_the_same_function(case, monkeypatch):
    # The GPU takes (keys x queries) tiles in the key-major kernels for kq-conv layers at head_dim 128 only
    # (`_key_major_tiles`), which the CPU tests' shapes never reach: here every path takes them.
    monkeypatch.setattr(mta_triton, "_key_major_tiles", lambda *args: True)
    check_against_reference(**case)


PACKED_CASES = [
    dict(documents=[[0, 5, 6, 30], [0, 17]]),  # a one-token document; rows of different counts
    dict(documents=[[0, 3, 20], [0, 36]], size=(8, 15), padding="left"),  # documents shorter than the kernel
    dict(documents=[[0, 12], [0, 1, 2, 25]], size=None),
    dict(documents=[[0, 10], [0, 30]], size=(4, 4), padding="right", group=4, kv_heads=1),
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_packed_documents_match_each_document_alone(case):
    check_against_reference(**case)


WIDE_GROUP_CASES = [
    dict(heads=8, kv_heads=2, group=8),  # full head mixing ("linear head"): two chunks of 4 value heads
    dict(heads=16, kv_heads=4, group=16, size=None, head_dim=32),  # four chunks of 4
    dict(heads=6, kv_heads=3, group=6, size=(2, 3), padding="left"),  # not a power of two: chunks of 2
    dict(heads=8, kv_heads=2, group=8, dropout=0.3),
    dict(heads=8, kv_heads=2, group=8, documents=[[0, 11, 12], [0, 30]]),
]


@pytest.mark.parametrize("case", WIDE_GROUP_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_wide_head_mixing_groups_match_the_reference(case):
    assert mta_triton.value_chunk(case["group"], case.get("head_dim", 16)) < case["group"]  # the chunked path
    check_against_reference(**{"starts": [0, 5], "ends": [37, 30], **case})


def test_decoding_with_wide_head_mixing_groups():
    check_decode(heads=8, kv_heads=2, group=8)
    check_decode(heads=6, kv_heads=6, group=6, size=None, new=5)


PREMIX_CASES = [
    dict(size=None, group=None, premix=2, kv_heads=4),  # heads side by side: q and k 2 * d wide
    dict(size=None, group=None, premix=2),  # GQA 2: the group shares a key head, mixed queries
    dict(size=None, premix=4, kv_heads=4, group=2),  # and post-softmax mixing after it
    dict(size=None, group=None, premix=2, kv_heads=4, documents=[[0, 9, 20], [0, 30]]),
    dict(size=None, group=None, premix=4, kv_heads=2, dropout=0.3),  # two key heads per group of 4
    dict(heads=8, kv_heads=8, size=None, group=8, premix=2),  # post-softmax groups in chunks: the dV kernel
    # With a kq conv, side by side always (each source head its own kernel): GQA 2 shares the key head here,
    # then post-softmax mixing, packed documents with "left" padding, and groups of 4 on "right".
    dict(premix=2, group=None),
    dict(premix=2, kv_heads=4, group=2, size=(2, 3)),
    dict(premix=2, kv_heads=4, group=None, padding="left", documents=[[0, 9, 20], [0, 30]]),
    dict(premix=4, kv_heads=4, group=None, size=(3, 3), padding="right"),
]


@pytest.mark.parametrize("case", PREMIX_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_pre_softmax_head_mixing_matches_the_reference(case):
    check_against_reference(**{"starts": [0, 5], "ends": [37, 30], **case})


POST_CONV_CASES = [
    dict(post=(3, 5), size=None, group=None),  # alone: p' = 2 offsets next to the diagonal taken out again
    dict(post=(2, 3)),  # after a kq conv, then head mixing (GQA 2: the group's value heads are one)
    dict(post=(3, 5), kv_heads=4, size=(2, 3), padding="left"),  # head mixing over two value heads; p' = 4
    dict(post=(2, 5), padding="right", size=None),  # p' = 0: nothing beyond the diagonal
    dict(post=(3, 5), documents=[[0, 9, 20], [0, 30]], size=(2, 3)),
    dict(post=(3, 5), kv_heads=4, premix=2, group=2),  # every MTA operation in one layer
]


@pytest.mark.parametrize("case", POST_CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_post_softmax_kq_conv_matches_the_reference(case):
    check_against_reference(**{"starts": [0, 5], "ends": [37, 30], **case})


DROPOUT_CASES = [
    dict(),  # kq conv + head mix 2: each target head its own mask
    dict(size=None, group=4, kv_heads=1),
    dict(group=None, documents=[[0, 9, 20], [0, 30]]),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_dropout_matches_the_reference_through_the_same_masks(case):
    check_against_reference(**{"starts": [0, 5], "ends": [37, 30], "dropout": 0.3, **case})


def test_dropout_masks_drop_at_the_rate_asked_and_differ_per_head():
    keep = mta_triton.dropout_keep_scale(2, 4, 64, 2, 0.25, 7, DEVICE)
    assert keep.unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]
    assert abs((keep == 0).float().mean().item() - 0.25) < 0.01
    assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[0], keep[1])
    assert torch.equal(keep, mta_triton.dropout_keep_scale(2, 4, 64, 2, 0.25, 7, DEVICE))
    assert not torch.equal(keep, mta_triton.dropout_keep_scale(2, 4, 64, 2, 0.25, 8, DEVICE))


@triton.jit
def _block_split_probe(seg_start_ptr, seg_end_ptr, out_ptr, N, STRIPE: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, PACKED: tl.constexpr):
    """For query block pid: its key blocks [lo, hi) and their clean part; for key block pid, the same over query blocks."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rs, re = mta_triton._segments(seg_start_ptr, seg_end_ptr, 0, rows, N, PACKED)
    lo, hi = mta_triton._key_range(rows, rs, re, N, BN)
    clean_lo, clean_hi = mta_triton._clean_key_blocks(rows, rs, re, lo, hi, STRIPE, BN)
    cols = pid * BN + tl.arange(0, BN)
    cs, ce = mta_triton._segments(seg_start_ptr, seg_end_ptr, 0, cols, N, PACKED)
    q_lo = (pid * BN) // BM * BM
    q_hi = tl.max(tl.where((cols >= cs) & (cols < ce), ce, 0), axis=0)
    q_clean_lo, q_clean_hi = mta_triton._clean_query_blocks(cols, cs, ce, q_lo, q_hi, STRIPE, BM)
    found = (lo, clean_lo, clean_hi, hi, q_lo, q_clean_lo, q_clean_hi, q_hi)
    for i in tl.static_range(8):
        tl.store(out_ptr + pid * 8 + i, found[i])


@pytest.mark.parametrize("segments", ["rows", "documents"])
def test_tiles_split_into_masked_and_clean_ones_where_every_score_is_plain(segments):
    # The kernels skip the masks and the stripe on "clean" tiles; a tile called clean must hold only scores that
    # are visible and off the stripe, the clean tiles must lie inside the visited ones, and there must be some.
    n, stripe, bm, bn = 160, 4, 16, 8
    if segments == "rows":
        seg = mta_triton.row_segments(torch.tensor([3]), torch.tensor([150]))
    else:
        begins = torch.zeros(1, n, dtype=torch.bool)
        begins[0, [0, 70, 71, 130]] = True
        seg = mta_triton.document_segments(begins)
    seg_start, seg_end = (t.to(DEVICE, torch.int32).contiguous() for t in seg)
    blocks = triton.cdiv(n, min(bm, bn))
    out = torch.zeros(blocks, 8, dtype=torch.int32, device=DEVICE)
    _block_split_probe[(blocks,)](seg_start, seg_end, out, n, STRIPE=stripe, BM=bm, BN=bn, PACKED=segments != "rows")
    start, end = (t.expand(1, n)[0].tolist() for t in seg)

    def plain(i, j):  # a score the kernels may take without masks: i real, j in i's past, off the stripe
        return start[i] <= i < end[i] and start[i] <= j <= i - stripe

    found = 0
    for block, (lo, clean_lo, clean_hi, hi, q_lo, q_clean_lo, q_clean_hi, q_hi) in enumerate(out.tolist()):
        if block * bm < n:
            assert lo <= clean_lo <= clean_hi <= hi if lo < hi else clean_lo == clean_hi
            for n0 in range(clean_lo, clean_hi, bn):
                assert all(plain(i, j) for i in range(block * bm, block * bm + bm) for j in range(n0, n0 + bn))
                found += 1
        if block * bn < n:
            assert q_lo <= q_clean_lo <= q_clean_hi <= q_hi if q_lo < q_hi else q_clean_lo == q_clean_hi
            for m0 in range(q_clean_lo, q_clean_hi, bm):
                assert all(plain(i, j) for i in range(m0, m0 + bm) for j in range(block * bn, block * bn + bn))
                found += 1
    assert found >= 20


CLEAN_TILE_CASES = [
    dict(), dict(size=None), dict(dropout=0.2), dict(documents=[[0, 30, 31], [0, 50]]),
    # Value heads in chunks, so the dV kernel too; one row: the interpreter takes 14 s per row here.
    dict(group=8, heads=8, kv_heads=8, n=64, batch=1, starts=[2], ends=[60]),
]


@pytest.mark.parametrize("case", CLEAN_TILE_CASES, ids=str)
def test_clean_tiles_match_the_reference(case, monkeypatch):
    # Tiles of 16 on 64-80 tokens: most tiles away from the diagonal take the path without masks.
    monkeypatch.setattr(mta_triton, "TILES_OVERRIDE", dict.fromkeys(mta_triton.KERNELS, (16, 16, 4, 1)))
    check_against_reference(**{"n": 80, "starts": [0, 2], "ends": [80, 75], **case})


def test_a_launch_with_a_constant_the_kernel_does_not_take_is_refused():
    # The GPU refuses such a launch; the interpreter would run it, so the CPU tests could not see the mistake.
    with pytest.raises(TypeError, match=r"_mix_forward_kernel takes no \['BAND'\]"):
        mta_triton._launch(mta_triton._mix_forward_kernel, lambda bm, bn: (1,), (torch.zeros(1),), (16, 16, 4, 1),
                           dict(C_H=2, BAND=0))


def test_a_tiling_too_large_for_shared_memory_is_retried_with_fewer_stages_then_smaller_tiles(monkeypatch):
    monkeypatch.setattr(mta_triton, "_FITTED_TILINGS", {})
    launched = []

    class Kernel:  # refuses what `fits` refuses, as Triton does where shared memory runs out
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def run(*args, BM, BN, num_warps, num_stages, **constants):
                if not self.fits(BM, BN, num_stages):
                    raise mta_triton.OutOfResources(300_000, 232_448, "shared memory")
                launched.append((grid, BM, BN, num_warps, num_stages))
            return run

    deep = Kernel(lambda bm, bn, stages: stages == 1)
    mta_triton._launch(deep, lambda bm, bn: (bm, bn), (torch.zeros(1),), (64, 32, 4, 3), dict(D=16))
    assert launched == [((64, 32), 64, 32, 4, 1)]
    wide = Kernel(lambda bm, bn, stages: stages == 1 and bm * bn <= 512)
    for _ in range(2):  # the second call starts from the tiling that fitted
        mta_triton._launch(wide, lambda bm, bn: (bm, bn), (torch.zeros(1),), (64, 32, 8, 2), {})
    assert launched[1:] == [((16, 32), 16, 32, 8, 1)] * 2
    with pytest.raises(mta_triton.OutOfResources):
        mta_triton._launch(Kernel(lambda bm, bn, stages: False), lambda bm, bn: (bm, bn), (torch.zeros(1),),
                           (64, 32, 4, 2), {})


@pytest.mark.parametrize("kv_heads, dropout, kernel_group", [(2, 0.0, 1), (1, 0.0, 1), (4, 0.0, 2), (2, 0.2, 2)])
def test_groups_that_read_one_value_head_take_it_once(kv_heads, dropout, kernel_group, monkeypatch):
    # 4 heads in groups of 2: with GQA 2 or 4 both heads of a group read one value head, so the kernels run
    # unmixed (P_c V once) and the mixing weighs it; without GQA or with dropout they take the group's values.
    groups = []

    def recording(*args):
        groups.append(args[6])  # c_h
        return original(*args)

    original = mta_triton._attention_op
    monkeypatch.setattr(mta_triton, "_attention_op", recording)
    check_against_reference(kv_heads=kv_heads, dropout=dropout)
    assert groups == [kernel_group]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["one-value-head", "value-heads-side-by-side"])
def test_the_mixed_attention_keeps_only_its_inputs_z_and_lse_for_the_backward(kv_heads):
    # Autograd through a float32 mixing product kept a float32 copy of z (twice z's memory) from each layer's
    # forward to its backward; the operator keeps z as the kernels wrote it, and mixes in its own kernels.
    batch, heads, n, d, c_h = 2, 4, 9, 16, 2
    q, k, v = (torch.randn(batch, h, n, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    mix = torch.randn(heads // c_h, c_h, c_h, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mta_triton.mta_attention_fused(q, k, v, None, mix)
    z_width = d if kv_heads == 2 else c_h * d  # GQA 2: the group's value heads are one, z holds P_c V once
    expected = {
        "q, k, v": sum(t.numel() * 2 for t in (q, k, v)), "mix": mix.numel() * 4, "z": batch * heads * n * z_width * 2,
        "lse": batch * heads * n * 4, "segments": 2 * batch * 4, "seed": 8,
    }
    assert sum(t.numel() * t.element_size() for t in saved) == sum(expected.values())
    assert not any(t.dtype == torch.float32 and t.numel() >= batch * heads * n * d for t in saved)


def test_the_post_softmax_conv_keeps_no_shifted_copies_of_the_values_for_the_backward():
    # Autograd through the mixed values (vhat) kept c_k' shifted copies of each head's n_e value heads for theta's
    # gradient: 10 of the 32 times the values' bytes that the layer kept at 3 x 5 with mixing of 2 (no GQA), and the
    # shift, correction and mixing 7 more. The first has a backward of its own, the second is made again in the
    # backward; what is kept: vhat and Y (6 each), q, k, v (3), and small tensors.
    batch, heads, n, d = 1, 4, 32, 16
    q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    post = (0.3 * torch.randn(heads, 1, 3, 5, device=DEVICE)).requires_grad_()
    mix = torch.randn(heads // 2, 2, 2, device=DEVICE, requires_grad=True)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault((t.data_ptr(), t.shape), t) if
                                                  t.data_ptr() else t, lambda t: t):
        mta_triton.mta_attention_fused(q, k, v, None, mix, kq_conv_post_weight=post)
    values = v.numel() * v.element_size()
    assert sum(t.numel() * t.element_size() for t in saved.values()) < 16 * values
    assert not any(t.shape[-2:] == (n, d) and t.dim() == 6 for t in saved.values())  # (B, H, 1, n_e, N, d) copies


def test_padding_given_per_token():
    check_against_reference(starts=[0, 5], ends=[37, 30], per_token=True)
    check_against_reference(starts=[3, 0], ends=[37, 30], size=None, per_token=True)


def test_segments_of_the_wrong_shape_are_refused():
    q = torch.randn(2, 2, 5, 16, device=DEVICE)
    for segments in [(torch.zeros(2, 4), torch.zeros(2, 4)), (torch.zeros(2, 1), torch.zeros(2, 5))]:
        with pytest.raises(ValueError, match="segments must be two"):
            mta_triton.mta_attention_fused(q, q, q, segments=segments)


def test_document_segments():
    begins = torch.tensor([[True, False, False, True, True, False], [True, False, False, False, False, False]])
    start, end = mta_triton.document_segments(begins)
    assert start.tolist() == [[0, 0, 0, 3, 4, 4], [0] * 6]
    assert end.tolist() == [[3, 3, 3, 4, 6, 6], [6] * 6]


def test_rows_that_are_all_padding_give_zero_and_no_nan():
    errors = check_against_reference(batch=2, n=20, starts=[0, 20], ends=[20, 20])
    assert errors["out"] < 1e-4


def test_coverage_gaps_are_named():
    gap = mta_triton.fused_coverage_gap
    assert gap(64, (6, 11), "both", None, None, 2) is None
    assert gap(64, (6, 11), "both", (3, 5), None, 2) is None
    assert "dropout with a post-softmax" in gap(64, None, "both", (3, 5), None, 2, dropout=True)
    assert gap(64, (6, 11), "both", None, None, 2, dropout=True) is None
    assert "post-softmax key-query kernel 3 x 17" in gap(64, None, "both", (3, 17), None, None)
    assert gap(128, (6, 11), "both", None, None, 16) is None
    assert "9 x 11" in gap(64, (9, 11), "both", None, None, None)
    assert "head_dim 96" in gap(96, None, "both", None, None, 2)
    # Pre-softmax head mixing (training and decoding alike): side by side up to 512 wide (256 with a kq conv, whose
    # heads always run side by side), or any group whose heads share a key head.
    assert gap(128, None, "both", None, 4, 2) is None
    assert gap(64, None, "both", None, 16, None, queries_per_key=16) is None
    assert "groups of 8 at head_dim 128" in gap(128, None, "both", None, 8, None)
    assert "groups of 3" in gap(64, None, "both", None, 3, None)
    assert gap(128, (6, 11), "both", None, 2, 2, queries_per_key=2) is None
    assert "groups of 4 at head_dim 128" in gap(128, (6, 11), "both", None, 4, 2, queries_per_key=4)
    with pytest.raises(ValueError, match="does not cover"):
        mta_triton.mta_attention_fused(*(torch.randn(1, 2, 4, 16) for _ in range(3)), torch.randn(2, 1, 9, 3))


def model_pair(**overrides):
    # The reference model says so: by default ("auto") it would run the kernels too on a GPU.
    config = mta_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mta_kernel="reference",
                        **overrides)
    torch.manual_seed(0)
    reference = randomize_mta(MTAForCausalLM(config)).to(DEVICE)
    fused = MTAForCausalLM(mta_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      mta_kernel="fused", **overrides)).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def fused_calls_logits_and_grads(monkeypatch, models, **inputs):
    """How often the fused kernel ran, and each model's logits and gradients on `inputs` (with labels)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return mta_triton.mta_attention_fused(*args, **kwargs)

    monkeypatch.setattr(modeling_mta.modeling_mta, "mta_attention_fused", counting)
    outs = []
    for model in models:
        out = model(**inputs)
        out.loss.backward()
        grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}  # compiled: a wrapper
        outs.append((out.logits, grads))
    return len(calls), outs


def assert_same_logits_and_grads(outs, rows=slice(None)):
    (ref_logits, ref_grads), (logits, grads) = outs
    torch.testing.assert_close(logits[rows], ref_logits[rows], atol=2e-4, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-4, rtol=2e-3, msg=name)


def test_model_uses_the_kernel_and_matches_the_reference_with_padding(monkeypatch):
    reference, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, group_norm=True, attn_gate="scalar")
    ids = torch.randint(1, 61, (2, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    calls, outs = fused_calls_logits_and_grads(monkeypatch, (reference, fused), input_ids=ids, attention_mask=mask,
                                               labels=ids.masked_fill(mask == 0, -100))
    assert calls == 3  # one call per layer, all three layers fused
    assert_same_logits_and_grads(outs, rows=mask.bool())


def check_model_fuses_with_left_padding(monkeypatch, **mta):
    """The fused model against the reference, every layer through the kernel, on rows with left padding."""
    reference, fused = model_pair(group_norm=True, **mta)
    ids = torch.randint(1, 61, (2, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    calls, outs = fused_calls_logits_and_grads(monkeypatch, (reference, fused), input_ids=ids, attention_mask=mask,
                                               labels=ids.masked_fill(mask == 0, -100))
    assert calls == 3
    assert_same_logits_and_grads(outs, rows=mask.bool())


@pytest.mark.parametrize("premix, kq_conv_size", [(2, None), (4, None), (2, [3, 5])],
                         ids=["shared-key-head", "side-by-side", "with-kq-conv"])
def test_model_fuses_pre_softmax_head_mixing(monkeypatch, premix, kq_conv_size):
    # 4 heads on 2 key heads: groups of 2 share a key head (mixed queries), groups of 4 do not (wide heads), nor do
    # groups whose heads convolve their scores first, each with its own kernel.
    check_model_fuses_with_left_padding(monkeypatch, kq_conv_size=kq_conv_size, head_mix_size=premix,
                                        head_mix_post_size=2)


def test_model_fuses_the_post_softmax_kq_conv(monkeypatch):
    check_model_fuses_with_left_padding(monkeypatch, kq_conv_size=[3, 5], kq_conv_post_size=[2, 5],
                                        head_mix_post_size=2)


def test_model_fuses_packed_documents(monkeypatch):
    # What padding-free training feeds the model: documents flattened into one row by transformers' collator.
    reference, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, group_norm=True)
    generator = torch.Generator().manual_seed(0)
    documents = [{"input_ids": torch.randint(1, 61, (n,), generator=generator).tolist()} for n in (7, 1, 11, 2, 9)]
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v
             for k, v in DataCollatorWithFlattening(return_flash_attn_kwargs=True)(documents).items()}
    calls, outs = fused_calls_logits_and_grads(monkeypatch, (reference, fused), **batch)
    assert calls == 3
    assert_same_logits_and_grads(outs)


def test_cu_seq_lens_and_restarting_positions_give_the_same_documents():
    def layout(**kwargs):
        return modeling_mta.modeling_mta.AttentionLayout(None, 1, 9, 0, 0, "cpu", **kwargs)

    from_positions = layout(position_ids=torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4]])).segments()
    from_cu_seq_lens = layout(cu_seq_lens=torch.tensor([0, 3, 4, 9], dtype=torch.int32)).segments()
    assert from_positions[0].tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 4]]
    assert all(torch.equal(a, b) for a, b in zip(from_positions, from_cu_seq_lens))
    with pytest.raises(ValueError, match="must end at the sequence length 9"):
        layout(cu_seq_lens=torch.tensor([0, 3, 8])).segments()


# On the CPU, float16: Triton's interpreter gives wrong bf16 results here (the fp32 and fp16 checks above pass).
AUTOCAST_DTYPE = torch.bfloat16 if CUDA else torch.float16


def test_mixed_precision_training_runs_the_kernel_in_the_autocast_dtype(monkeypatch):
    reference, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2)
    dtypes = []

    def recording(q, k, v, **kwargs):
        # Under autocast q and k leave RoPE in float32 while v leaves v_proj in the autocast dtype
        # (transformers 5.17's cache, which it also makes in training, casts v back to float32).
        dtypes.append((q.dtype, v.dtype))
        return mta_triton.mta_attention_fused(q, k, v, **kwargs)

    monkeypatch.setattr(modeling_mta.modeling_mta, "mta_attention_fused", recording)
    ids = torch.randint(0, 61, (2, 16), device=DEVICE)

    def loss_and_grads(model, autocast):
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    exact_loss, exact = loss_and_grads(reference, autocast=False)
    mixed_loss, mixed = loss_and_grads(reference, autocast=True)
    fused_loss, got = loss_and_grads(fused, autocast=True)
    assert dtypes and {q for q, _ in dtypes} == {torch.float32}
    # As close to the float32 result as the reference attention under the same autocast, over all gradients
    # together. Per parameter the comparison is noise: the head-mixing weights' small gradients come out of
    # cancelling half-precision terms, 1-9% off in either path, and the two paths' errors differ up to 2.3x.
    assert abs(fused_loss - exact_loss) <= 2 * abs(mixed_loss - exact_loss) + 1e-3
    assert all(g.dtype == torch.float32 for g in got.values())
    flat = {name: torch.cat([g[p].flatten() for p in exact]) for name, g in (("fused", got), ("mixed", mixed))}
    exact_flat = torch.cat([exact[p].flatten() for p in exact]).double()
    assert relative_error(flat["fused"], exact_flat) <= 2 * relative_error(flat["mixed"], exact_flat) + 1e-4
    for name in exact:  # and no gradient lost or garbled
        assert relative_error(got[name], exact[name].double()) < 0.5, name


def test_fused_mode_refuses_what_the_kernel_does_not_cover():
    _, fused = model_pair(kq_conv_size=[3, 5], kq_conv_post_size=[2, 3], attention_dropout=0.1)
    ids = torch.randint(0, 61, (1, 8), device=DEVICE)
    fused.eval()(ids)  # covered without dropout
    with pytest.raises(ValueError, match="attention dropout with a post-softmax"):
        fused.train()(ids)
    _, fused = model_pair(kq_conv_size=[3, 5])
    with pytest.raises(ValueError, match="output_attentions"):
        fused(ids, output_attentions=True)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    with pytest.raises(ValueError, match="attention masks other than"):
        fused(ids, attention_mask=mask)


GPU_CASES = [
    dict(heads=16, kv_heads=16, head_dim=64, n=1000, size=(6, 11), group=2),
    # No GQA: the group's two value heads differ, so the kernels mix them (with GQA, `_kernel_group` runs them
    # unmixed, as in the packed case below): the tiling of a 32 x 128 kq-conv layer.
    dict(heads=16, kv_heads=16, head_dim=128, n=777, size=(6, 11), group=2),
    dict(heads=16, kv_heads=8, head_dim=64, n=1000, size=None, group=2),
    dict(heads=8, kv_heads=8, head_dim=128, n=513, size=(8, 15), group=4),
    dict(heads=8, kv_heads=2, head_dim=64, n=700, size=(4, 9), padding="left", group=1),
    dict(heads=8, kv_heads=8, head_dim=64, n=640, size=(3, 7), padding="right", group=None),
    dict(heads=16, kv_heads=4, head_dim=128, n=1000, size=(6, 11), group=2, documents=[[0, 100, 357, 358, 700], [0, 513]]),
    dict(heads=16, kv_heads=4, head_dim=128, n=513, size=(6, 11), group=16),  # full mixing: 8 chunks of 2 x 128
    dict(heads=12, kv_heads=12, head_dim=64, n=700, size=None, group=12),  # groups of 12: 3 chunks of 4 x 64
    # Post-softmax kq conv: 3 x 2 value heads of 128 per source head (chunks, the dV kernel); alone, 2 x 9 "left".
    dict(heads=16, kv_heads=16, head_dim=128, n=777, size=(6, 11), group=2, post=(3, 5)),
    dict(heads=16, kv_heads=4, head_dim=64, n=1000, size=None, group=None, post=(2, 9), padding="left"),
    # Head-mix-only layers without GQA: each source head's P times the group's two value heads side by side.
    dict(heads=16, kv_heads=16, head_dim=64, n=1000, size=None, group=2),
    dict(heads=16, kv_heads=16, head_dim=128, n=777, size=None, group=2, documents=[[0, 100, 357, 358, 700], [0, 513]]),
]


def gpu_case_id(c: dict) -> str:
    return (f"h{c['heads']}kv{c['kv_heads']}x{c['head_dim']}-n{c['n']}-{c['size']}-g{c['group']}"
            + ("-packed" if "documents" in c else "") + (f"-post{c['post']}" if "post" in c else ""))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", GPU_CASES, ids=gpu_case_id)
def test_matches_the_reference_on_gpu_shapes(case, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_reference(batch=2, dtype=dtype, starts=[0, 37], ends=[case["n"], case["n"] - 11], **case)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_offsets_beyond_int32():
    # 1100 x 16 heads x 1024 tokens x 128 > 2**31 elements per tensor (and khat is 6 times more): check
    # the last batch rows, whose offsets only int64 arithmetic reaches, against the reference.
    batch, heads, n, head_dim = 1100, 16, 1024, 128
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=generator, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    assert q.numel() > 2**31
    theta = (0.5 * torch.randn(heads, 1, 6, 11, generator=generator, device="cuda")).bfloat16()
    mix = (0.7 * torch.randn(heads // 2, 2, 2, generator=generator, device="cuda")).bfloat16()
    out = mta_triton.mta_attention_fused(q, k, v, theta, mix)
    tail = slice(batch - 2, batch)
    visible = torch.ones(n, n, device="cuda").tril().bool()
    ref, _ = mta_attention(q[tail].double(), k[tail].double(), v[tail].double(), visible, theta.double(), None, None,
                           mix.double())
    assert relative_error(out[tail], ref) <= TOLERANCE[torch.bfloat16]


def stripe_by_convolution(band, theta, stripe, seg_start):
    """The stripe scores as c_q grouped convolutions of the band, one per query shift s = c_q - 1 - a: band row
    t + b + s of column i - s meets theta[a, b], for queries in column i's segment (differentiable)."""
    c_q, c_k = theta.shape[-2:]
    width, n = band.shape[-2:]
    scores = 0
    for a in range(c_q):
        s = c_q - 1 - a
        shifted = torch.nn.functional.pad(band, (s, -s, -s, stripe + c_k - 1 - width + s))
        keep = (torch.arange(n, device=band.device) - s >= seg_start)[:, None, None, :]
        scores = scores + torch.nn.functional.conv2d(shifted * keep, theta[:, :, a, :, None], groups=band.shape[1])
    return scores


@pytest.mark.parametrize("padding", ["both", "left", "right"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_stripe_kernels_match_the_convolution(padding, packed):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    c_q, c_k, n = 3, 5, 23
    stripe = (c_q - 1) + (c_k - 1 - mta_triton.key_padding_left(padding, c_k))
    band, theta = (torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.float64, requires_grad=True)
                   for shape in ((2, 4, c_q + c_k - 2, n), (4, 1, c_q, c_k)))
    # Packed: the second row's documents begin at 0 and 10; else one span per row (starting late in the first).
    seg_start = torch.tensor([[0] * 10 + [10] * 13, [0] * 23] if packed else [[2], [0]], device=DEVICE)
    dscores = torch.randn(2, 4, stripe, n, generator=generator, device=DEVICE, dtype=torch.float64)
    want = stripe_by_convolution(band, theta, stripe, seg_start)
    want_dband, want_dtheta = torch.autograd.grad(want, (band, theta), dscores)
    band32, theta32, seg32 = band.detach().float()[:, :, None], theta.detach().float(), seg_start.int()  # one block
    got = mta_triton.stripe_scores(band32, theta32, stripe, seg32)
    dtheta = torch.zeros_like(theta32)
    got_dband = mta_triton.stripe_scores_backward(band32, theta32, stripe, seg32, dscores.float(), dtheta)[:, :, 0]
    for g, w in ((got, want), (got_dband, want_dband), (dtheta, want_dtheta)):
        torch.testing.assert_close(g.double(), w.detach(), rtol=1e-5, atol=1e-5)


def small_inputs(seed=0, heads=4, kv_heads=2, n=21, head_dim=16, size=(3, 5), group=2):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=generator, device=DEVICE)).requires_grad_()

    return (rand(2, heads, n, head_dim), rand(2, kv_heads, n, head_dim), rand(2, kv_heads, n, head_dim),
            rand(heads, 1, *size, spread=0.4), rand(heads // group, group, group, spread=0.7))


ALL_OPERATOR_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("layout", ["contiguous", "heads_second"])
def test_the_kernels_are_a_well_formed_custom_op(layout):
    # The model hands the operators q, k, v as (B, N, H, d) tensors transposed to (B, H, N, d); the fake outputs
    # (what torch.compile plans with) must have the real outputs' strides there too: inductor checks them.
    q, k, v, theta, mix = small_inputs()
    if layout == "heads_second":
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    # On the device: the operators take the kernels' inputs as they are (mta_attention_fused moves segments there).
    segments = mta_triton.row_segments(torch.tensor([0, 4], device=DEVICE), torch.tensor([21, 18], device=DEVICE))
    seed = torch.tensor([5], device=DEVICE)
    # The output mixed by the operator, then z itself as the output. Every check once; for the other layout and
    # the unmixed output the fake outputs (the interpreter makes the full set of checks take half a minute).
    for weights in (mix, None):
        checks = ALL_OPERATOR_CHECKS if layout == "contiguous" and weights is not None else ("test_faketensor",)
        # With the scores next to the diagonal (sband, 3 offsets) as a fourth output.
        forward_args = (q, k, v, theta, weights, "both", 2, *segments, 0.2, seed, 3)
        torch.library.opcheck(mta_triton._attention_op, forward_args, test_utils=checks)
        out, z, lse, sband = mta_triton._attention_op(*forward_args)
        saved_z = z if weights is not None else out
        # The backward operator is not differentiated.
        detached = [t.detach() if t is not None else None for t in (q, k, v, theta, weights, saved_z)]
        torch.library.opcheck(mta_triton._attention_backward_op,
                              (torch.randn_like(out), torch.randn_like(lse), torch.randn_like(sband), *detached,
                               lse.detach(), "both", 2, *segments, 0.2, seed), test_utils=checks)


@pytest.mark.parametrize("post", [None, (2, 3)], ids=["kq-conv", "and-post-softmax-conv"])
def test_torch_compile_takes_the_kernel_whole(post):
    # fullgraph: no graph break anywhere in the fused attention; aot_eager traces forward and backward (with the post-
    # softmax conv, through its recomputed mixed values).
    compiled = torch.compile(mta_triton.mta_attention_fused, fullgraph=True, backend="aot_eager")
    results = []
    for attention in (mta_triton.mta_attention_fused, compiled):
        inputs = small_inputs()
        if post:
            inputs = (*inputs, (0.4 * torch.randn(4, 1, *post, generator=torch.Generator().manual_seed(1))).to(
                DEVICE).requires_grad_())
        out = attention(*inputs[:5], segments=mta_triton.row_segments(torch.tensor([0, 4]), torch.tensor([21, 18])),
                        kq_conv_post_weight=inputs[5] if post else None)
        results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


def test_a_compiled_model_trains_as_the_eager_one(monkeypatch):
    _, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, group_norm=True)
    ids = torch.randint(1, 61, (2, 19), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    compiled = torch.compile(copy.deepcopy(fused), backend="aot_eager")
    calls, outs = fused_calls_logits_and_grads(monkeypatch, (fused, compiled), input_ids=ids, attention_mask=mask,
                                               labels=ids.masked_fill(mask == 0, -100))
    assert calls == 6
    assert_same_logits_and_grads(outs)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_an_inductor_compiled_model_trains_and_generates_as_the_eager_one(monkeypatch):
    _, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, group_norm=True)
    ids = torch.randint(1, 61, (2, 19), device=DEVICE)
    calls, outs = fused_calls_logits_and_grads(monkeypatch, (fused, torch.compile(copy.deepcopy(fused))),
                                               input_ids=ids, labels=ids)
    assert calls == 6
    assert_same_logits_and_grads(outs)

    fused.config.mta_kernel = "auto"  # decoding steps run the reference
    compiled = copy.deepcopy(fused)
    compiled.forward = torch.compile(compiled.forward)
    with torch.no_grad():
        tokens = [model.generate(ids[:, :8], max_new_tokens=6, do_sample=False) for model in (fused, compiled)]
    assert torch.equal(tokens[0], tokens[1])


def check_decode(batch=2, heads=4, kv_heads=2, length=40, new=3, history=None, head_dim=16, size=(3, 5),
                 padding="both", group=2, starts=(0, 7), dtype=torch.float32, seed=0, premix=None, post=None):
    """The fused decode kernel against the reference on the same rows: `new` query rows at the end of a cache of
    `length` keys, plus `history` earlier query rows (default: the c_q - 1 + c_q' - 1 the convolutions read);
    `post` is the post-softmax kq conv's size."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=generator, device=DEVICE)).to(dtype)

    if history is None:
        history = sum(conv[0] - 1 for conv in (size, post) if conv)
    rows = new + history
    q, k, v = rand(batch, heads, rows, head_dim), rand(batch, kv_heads, length, head_dim), rand(batch, kv_heads, length, head_dim)
    theta = rand(heads, 1, *size, spread=1.5 / math.prod(size) ** 0.5) if size else None
    mix = rand(heads // group, group, group, spread=0.7) if group else None
    premix_weight = rand(heads // premix, premix, premix, spread=0.7) if premix else None
    post_theta = rand(heads, 1, *post, spread=1.5 / math.prod(post) ** 0.5) if post else None
    start = torch.tensor(starts, device=DEVICE)
    out = mta_triton.mta_decode_fused(q, k, v, theta, mix, padding, start, new, head_mix_weight=premix_weight,
                                      kq_conv_post_weight=post_theta)

    query_pos = torch.arange(length - rows, length, device=DEVICE)
    key_pos = torch.arange(length, device=DEVICE)
    visible = ((key_pos <= query_pos[:, None]) & (key_pos >= start[:, None, None])
               & (query_pos[:, None] >= start[:, None, None]))[:, None]
    wide = [t.double() if t is not None else None for t in (q, k, v, theta, mix, premix_weight, post_theta)]
    ref, _ = mta_attention(*wide[:3], visible, wide[3], wide[6], wide[5], wide[4], key_padding=padding)
    error = relative_error(out, ref[:, :, -new:])
    print(f"decode relative error ({dtype}): {error:.2e}")
    assert error <= TOLERANCE[dtype], error


DECODE_CASES = [
    dict(),
    dict(size=None),  # head-mix-only layer
    dict(group=None, new=1),
    dict(size=(8, 15), padding="left", group=4, kv_heads=1, length=50),
    dict(size=(2, 3), padding="right", group=1, kv_heads=4, new=20),  # a prefill chunk: more rows than one block
    dict(size=(1, 3)),
    dict(size=(3, 1), padding="left"),
    dict(length=5, new=2, history=1),  # early in generation: fewer earlier queries than the kernel reads
    dict(starts=(0, 39)),  # a row whose only real key is the new one
    dict(kv_heads=4),  # no GQA: the group's value heads differ, the kernel mixes them
    dict(size=None, premix=2),  # pre-softmax head mixing in groups that share a key head: mixed queries
    dict(size=None, premix=4, kv_heads=1, group=None, new=5),
    # Side by side: heads that read different key heads, and (always) with a kq conv, each block its own kernel.
    dict(size=None, premix=2, kv_heads=4),
    dict(premix=2, group=None),
    dict(premix=4, kv_heads=4, size=(2, 3), padding="left", starts=(3, 0)),
    # Post-softmax kq conv: the decode kernel makes the rows c_q' - 1 back too, against values mixed along the cache.
    dict(size=None, group=None, post=(3, 5)),  # alone, p' = 2 keys beyond the diagonal taken out again
    dict(post=(2, 3), kv_heads=4, new=4),  # after a kq conv, head mixing over two value heads, a chunk of rows
    dict(size=(2, 3), post=(3, 5), padding="left", starts=(0, 38), new=2),  # p' = 4; a row that is mostly padding
    dict(size=None, post=(3, 3), padding="right", group=4, kv_heads=1, new=20),  # p' = 0, a prefill chunk
    dict(size=None, post=(3, 5), length=6, new=3, history=1),  # fewer earlier rows than the kernel reads
    dict(post=(2, 5), premix=2, kv_heads=4),  # every MTA operation
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_decoding_matches_the_reference(case):
    check_decode(**case)


@pytest.mark.parametrize("mta", [dict(kq_conv_size=[3, 5]), dict(kq_conv_size=None, head_mix_size=2),
                                 dict(kq_conv_size=[3, 5], head_mix_size=2),
                                 dict(kq_conv_size=[3, 5], kq_conv_post_size=[2, 3])],
                         ids=["kq-conv", "pre-softmax-mixing", "pre-mixing-side-by-side-with-kq-conv",
                              "post-softmax-kq-conv"])
def test_the_model_decodes_with_the_kernel(monkeypatch, mta):
    reference, fused = model_pair(head_mix_post_size=2, group_norm=True, **mta)
    ids = torch.randint(1, 61, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation makes it
    decode_calls = []

    def counting(*args, **kwargs):
        decode_calls.append(kwargs["new_rows"])
        return mta_triton.mta_decode_fused(*args, **kwargs)

    monkeypatch.setattr(modeling_mta.modeling_mta, "mta_decode_fused", counting)
    with torch.no_grad():
        outs = [model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                               return_dict_in_generate=True) for model in (reference, fused)]
    assert decode_calls == [1] * 3 * 4  # 4 steps against the cache (the first token comes from the prompt), 3 layers
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for ref_scores, scores in zip(outs[0].scores, outs[1].scores):
        torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="watches the launches through Triton's interpreter")
def test_no_kernel_compiles_anew_in_the_middle_of_a_generation(monkeypatch):
    """Triton compiles a kernel apart for each class of its integer arguments (1, a multiple of 16, other) unless
    told not to. The decode kernel took the cache's length, which changes class every 16 steps: on an H200 the
    first multiple of 16 stopped a generation for 1.6 s to compile (benchmarks/NOTES.md, session 11)."""
    _, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, group_norm=True)
    classes = {}  # (kernel, argument) -> the classes its values fell in
    decoding = False

    def specialization(value: int) -> str:
        return "1" if value == 1 else "multiple of 16" if value % 16 == 0 else "other"

    def watching(kernel, *args, grid, warmup, **kwargs):
        if decoding:
            for name, value in zip(kernel.arg_names, args):
                if isinstance(value, int) and not isinstance(value, bool):
                    classes.setdefault((kernel, name), set()).add(specialization(value))
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    run = triton.runtime.interpreter.InterpretedFunction.run
    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run", watching)
    ids = torch.randint(1, 61, (1, 12), device=DEVICE)
    with torch.no_grad():
        out = fused(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decoding = True
        for _ in range(6):  # cache lengths 13..18: 16 among them
            out = fused(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    watched = {kernel.__name__ for kernel, _ in classes}
    assert {"_mta_decode_kernel", "_mix_forward_kernel", "_group_norm_fwd_kernel", "_stripe_kernel"} <= watched
    # (The interpreter keeps `triton.jit`'s arguments in `kwargs`.)
    changing = {(kernel.__name__, name) for (kernel, name), seen in classes.items() if len(seen) > 1
                and name not in (kernel.kwargs.get("do_not_specialize") or ())}
    assert not changing


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_decoding_matches_the_reference_on_gpu_shapes(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_decode(heads=16, kv_heads=4, head_dim=128, length=3000, new=1, size=(6, 11), group=2, starts=(0, 1000),
                 dtype=dtype)
    check_decode(heads=16, kv_heads=16, head_dim=64, length=2000, new=64, size=None, group=2, starts=(5, 0),
                 dtype=dtype)
    check_decode(heads=16, kv_heads=16, head_dim=64, length=1500, new=1, size=(6, 11), post=(3, 5), group=2,
                 starts=(0, 400), dtype=dtype)
    check_decode(heads=8, kv_heads=8, head_dim=128, length=700, new=3, size=(8, 15), group=4, padding="left",
                 dtype=dtype)
    # Pre-softmax mixing side by side (q and the cache's keys 2 x 64 wide), each block with its own 6 x 11 kernel.
    check_decode(heads=8, kv_heads=8, head_dim=64, length=1500, new=2, size=(6, 11), group=2, premix=2, dtype=dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_pre_softmax_head_mixing_matches_the_reference_on_gpu_shapes(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    # Side by side: q and k 2 x 128 and 4 x 64 wide; then groups that share a key head (mixed queries).
    check_against_reference(batch=2, heads=8, kv_heads=8, head_dim=128, n=777, size=None, group=2, premix=2,
                            dtype=dtype, starts=[0, 37], ends=[777, 700])
    check_against_reference(batch=1, heads=8, kv_heads=4, head_dim=64, n=640, size=None, group=None, premix=4,
                            dtype=dtype, dropout=0.1)
    check_against_reference(batch=1, heads=16, kv_heads=4, head_dim=64, n=1000, size=None, group=2, premix=4,
                            dtype=dtype)
    # With the paper's kq conv: each column block of the wide keys convolved by its source head's kernel. The
    # pre-mixing weights' gradient sums dS' times the convolved scores over all N^2 entries; in half precision it
    # measured 0.9-1.9e-2 (bf16, 6 x 11, seeds 0 and 1; 5.0e-3 with 3 x 5) and 4.0e-3 (fp16) on an H200, every
    # other gradient 4-6e-3 and 4-7e-4, and in float32 2.7e-6 (N = 700): rounding, not the kernel's algebra.
    looser = {"dpremix": 5} if dtype != torch.float32 else None
    check_against_reference(batch=2, heads=8, kv_heads=8, head_dim=64, n=700, size=(6, 11), group=2, premix=2,
                            dtype=dtype, starts=[0, 37], ends=[700, 650], looser=looser)
    check_against_reference(batch=1, heads=8, kv_heads=2, head_dim=128, n=513, size=(6, 11), group=None, premix=2,
                            dtype=dtype, looser=looser)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_dropout_matches_the_reference_on_gpu_shapes(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_reference(batch=2, heads=16, kv_heads=4, head_dim=128, n=777, size=(6, 11), group=2, dtype=dtype,
                            starts=[0, 37], ends=[777, 766], dropout=0.1)
    # The toy task's attention: 2 heads of 128, kq conv 2 x 9, no head mixing, 321 tokens.
    check_against_reference(batch=4, heads=2, kv_heads=2, head_dim=128, n=321, size=(2, 9), group=None, dtype=dtype,
                            dropout=0.1)


def test_torch_compile_takes_the_decoding_kernel_whole():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(2, 4, *shape, 16, generator=generator, device=DEVICE) for shape in ((5,), (30,), (30,)))
    k, v = k[:, :2], v[:, :2]
    theta = 0.4 * torch.randn(4, 1, 3, 5, generator=generator, device=DEVICE)
    mix = 0.7 * torch.randn(2, 2, 2, generator=generator, device=DEVICE)
    args = (q, k, v, theta, mix, "both", torch.tensor([0, 6], device=DEVICE), 3)
    post = 0.4 * torch.randn(4, 1, 2, 3, generator=generator, device=DEVICE)
    compiled = torch.compile(mta_triton.mta_decode_fused, fullgraph=True, backend="aot_eager")
    for kq_conv_post_weight in (None, post):
        torch.testing.assert_close(compiled(*args, kq_conv_post_weight=kq_conv_post_weight),
                                   mta_triton.mta_decode_fused(*args, kq_conv_post_weight=kq_conv_post_weight),
                                   rtol=1e-6, atol=1e-6)
    start = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(mta_triton._decode_op, (q, k, v, theta, mix, "both", 2, start, 3, None))
    torch.library.opcheck(mta_triton._decode_op, (q, k, v, theta, None, "both", 2, start, 3, None))
    torch.library.opcheck(mta_triton._decode_op, (q, k, v, theta, mix, "both", 2, start, 3, post))


def test_the_model_trains_with_dropout_on_the_kernel(monkeypatch):
    _, fused = model_pair(kq_conv_size=[3, 5], head_mix_post_size=2, attention_dropout=0.3)
    ids = torch.randint(1, 61, (2, 19), device=DEVICE)
    rates = []

    def recording(*args, **kwargs):
        rates.append(kwargs["dropout_p"])
        return mta_triton.mta_attention_fused(*args, **kwargs)

    monkeypatch.setattr(modeling_mta.modeling_mta, "mta_attention_fused", recording)
    torch.manual_seed(0)
    first = fused.train()(ids, labels=ids).loss
    first.backward()
    second = fused(ids, labels=ids).loss  # other masks
    evaluated = fused.eval()(ids, labels=ids).loss
    assert rates == [0.3] * 6 + [0.0] * 3
    assert first.item() != second.item() and torch.isfinite(first)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters() if p.requires_grad)
    assert evaluated.item() not in (first.item(), second.item())
