"""The SGMV op: the torch reference and the native CPU kernel against a naive per-row loop.

Every case runs one target of 1, 2 or 3 members (a plain linear, fused gate/up, fused q/k/v) whose
slots hold adapters of different ranks, over batches the engine makes (sorted by slot, prefill
chunks beside decode rows, base rows between) and ones it does not (unsorted, a slot in two places).
"""

from __future__ import annotations

import pytest
import torch

from server.lora.adapter import LoRAModuleWeights
from server.lora.backend import LoRABackend, cpu_kernel_available, make_lora_backend
from server.lora.batch import LoRABatch
from server.lora.ops.sgmv_torch import sgmv_torch
from server.lora.slot_weights import SlotWeights, blocks_for

D_IN = 48
OUTS = {1: [40], 2: [40, 40], 3: [32, 16, 16]}  # one linear, gate/up, q/k/v (GQA-sized k, v)
RANKS = [4, 8, 16, 64]  # per slot (slot i holds an adapter of RANKS[i] on every member)

CASES = [  # (seq slots, seq lengths)
    ([0, 1, 2, 3], [5, 3, 8, 1]),  # sorted, unequal rows per slot
    ([-1, 0, 0, 1, 1, 2, 2, 3, 3], [2] + [1] * 8),  # sorted round-robin decode after base rows
    ([0, 0, 1, 2, 2, 2, 3], [40, 1, 1, 17, 1, 1, 2]),  # a prefill chunk of slot 0 beside decode rows
    ([2, 2, 0, -1, 1, 1, 3], [1] * 7),  # unsorted decode rows
    ([3, -1, 0, 3, -1, 1], [4, 2, 7, 1, 3, 17]),  # gaps of base rows, slot 3 in two places
    ([1], [33]),  # one segment
    ([0, 3], [2, 2]),  # a sparse slot range
]


def _module_weights(out: int, r: int, g: torch.Generator, d_in: int = D_IN) -> LoRAModuleWeights:
    return LoRAModuleWeights(
        a=torch.randn(r, d_in, generator=g), b=torch.randn(out, r, generator=g), scale=0.5
    )


def _weights(members: int, dtype=torch.float32, ranks=RANKS, d_in=D_IN, paged=False,
             absent=frozenset()) -> tuple[SlotWeights, list[list]]:  # fmt: skip
    """SlotWeights of ``members`` members with slot i at rank ``ranks[i]``, and the PEFT-layout
    matrices written (per slot, per member; None: ``(slot, member)`` in ``absent``, not targeted) for
    the naive reference. ``paged``: each slot on only the pages its rank needs, handed out in a
    scattered order (one page spare)."""
    g = torch.Generator().manual_seed(members)
    outs = OUTS[members]
    names = [f"m{j}" for j in range(members)]
    if paged:
        needs = [blocks_for(r) for r in ranks]
        weights = SlotWeights(names, d_in, outs, len(ranks), 64, "cpu", dtype, num_pages=sum(needs) + 1)
        order = torch.randperm(sum(needs) + 1, generator=g).tolist()
        for slot, n in enumerate(needs):
            weights.table.map(slot, [order.pop() for _ in range(n)])
    else:
        weights = SlotWeights(names, d_in, outs, len(ranks), 64, "cpu", dtype)
    written = []
    for slot, r in enumerate(ranks):
        per_member = [
            None if (slot, j) in absent else _module_weights(out, r, g, d_in) for j, out in enumerate(outs)
        ]
        for j, module in enumerate(per_member):
            weights.write(slot, j, module, None)
        written.append(per_member)
    return weights, written


def _naive(y, x, written, seq_slots, seq_lens):
    """Row by row, member by member: y[i, cols_j] += scale * (x[i] @ A^T) @ B^T."""
    out = y.double().clone()
    row = 0
    bounds = [0]
    for j in range(len(written[0])):  # each member's width, from any slot that targets it
        bounds.append(bounds[-1] + next(per[j].b.shape[0] for per in written if per[j] is not None))
    for slot, n in zip(seq_slots, seq_lens, strict=True):
        for i in range(row, row + n):
            for j, module in enumerate(written[slot] if slot >= 0 else []):
                if module is not None:
                    delta = module.scale * (x[i].double() @ module.a.double().t()) @ module.b.double().t()
                    out[i, bounds[j] : bounds[j + 1]] += delta
        row += n
    return out


def _ops():
    ops = {"torch": sgmv_torch}
    if cpu_kernel_available("cpu"):
        from server.lora.ops.sgmv_cpu import sgmv_cpu

        ops["cpu"] = sgmv_cpu
    return ops


@pytest.mark.parametrize("op", sorted(_ops()))
@pytest.mark.parametrize("members", [1, 2, 3])
@pytest.mark.parametrize("seq_slots,seq_lens", CASES)
@pytest.mark.parametrize("paged", [False, True], ids=["own-pages", "scattered-pages"])
def test_op_matches_naive(op, members, seq_slots, seq_lens, paged):
    y, got = _run_against_naive(op, *_weights(members, paged=paged), seq_slots, seq_lens)
    base = [i for i in range(len(y)) if _slot_of_row(seq_slots, seq_lens, i) < 0]
    assert torch.equal(got[base], y[base])


def _run_against_naive(op, weights, written, seq_slots, seq_lens):
    """Runs ``op`` over one step and checks it against the naive loop; returns (y before, y after)."""
    n = sum(seq_lens)
    x, y = torch.randn(n, D_IN), torch.randn(n, sum(OUTS[weights.num_members]))
    batch = LoRABatch(len(RANKS))
    batch.set(seq_slots, seq_lens)
    got = y.clone()
    _ops()[op](got, x, weights, batch.slot_rows(torch.device("cpu")))
    torch.testing.assert_close(got.double(), _naive(y, x, written, seq_slots, seq_lens), rtol=1e-5, atol=1e-4)
    return y, got


@pytest.mark.parametrize("op", sorted(_ops()))
@pytest.mark.parametrize("members", [2, 3])
def test_op_skips_the_members_a_slot_does_not_target(op, members):
    """A q/v adapter in a fused q/k/v group (PEFT's default targets): the op neither reads nor adds
    the members a slot has no ranks for, and the others' deltas stay exact."""
    absent = {(0, 1), (1, 0), (2, members - 1), (3, 0), (3, 1)}
    weights, written = _weights(members, paged=True, absent=absent)
    assert weights.slot_members.tolist()[0] == (0b101 if members == 3 else 0b01)
    if op == "cpu":  # the native kernel does not even read them (the torch reference multiplies zeros)
        for page in weights.table.pages_of(0):
            weights.a[page, :, 1] = float("nan")
            weights.b[page, :, weights.slices[1]] = float("nan")
    _run_against_naive(op, weights, written, *CASES[2])


def _slot_of_row(seq_slots, seq_lens, i):
    row = 0
    for slot, n in zip(seq_slots, seq_lens, strict=True):
        if row <= i < row + n:
            return slot
        row += n
    raise IndexError(i)


def _fused_case_in(dtype):
    """CASES[2] over a fused q/k/v target: fp32 slots, the same adapters in ``dtype`` slots, and a step."""
    seq_slots, seq_lens = CASES[2]
    weights32, written = _weights(3)
    narrow = SlotWeights(weights32.names, D_IN, OUTS[3], len(RANKS), 64, "cpu", dtype)
    for slot, per_member in enumerate(written):
        for j, module in enumerate(per_member):
            narrow.write(slot, j, module, None)
    n = sum(seq_lens)
    x, y = torch.randn(n, D_IN), torch.randn(n, sum(OUTS[3]))
    batch = LoRABatch(len(RANKS))
    batch.set(seq_slots, seq_lens)
    return weights32, narrow, written, x, y, batch.slot_rows(torch.device("cpu"))


@pytest.mark.parametrize("op", sorted(_ops()))
def test_op_in_bf16_matches_fp32_within_bf16_rounding(op):
    weights32, weights16, _, x, y, rows = _fused_case_in(torch.bfloat16)
    want, got = y.clone(), y.bfloat16()
    sgmv_torch(want, x, weights32, rows)
    _ops()[op](got, x.bfloat16(), weights16, rows)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 3e-2


@pytest.mark.parametrize("op", sorted(_ops()))
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_op_with_half_width_weights_computes_in_fp32(op, wdtype):
    """Settings.lora_dtype under a float32 model: the slots hold half-width weights, the op widens
    them and computes in fp32 - the same result as fp32 slots holding the rounded values."""
    rounded, narrow, written, x, y, rows = _fused_case_in(wdtype)
    for name in ("a", "b"):  # fp32 slots holding exactly the half-width values
        getattr(rounded, name).copy_(getattr(narrow, name))
    got, want = y.clone(), y.clone()
    _ops()[op](got, x, narrow, rows)
    sgmv_torch(want, x, rounded, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    exact = _naive(y, x, written, *CASES[2])  # and only the weights' rounding from exact
    assert ((got.double() - exact).abs().max() / (exact - y.double()).abs().max()).item() < 1e-2


def test_live_rank_reads_only_the_live_slots():
    weights, _ = _weights(2, ranks=[4, 8, 64, 16])
    assert weights.live_rank([0]) == 16 and weights.live_rank([0, 1, 3]) == 16
    assert weights.live_rank([2]) == 64 and weights.live_rank([]) == 0


def test_kernel_args_follow_the_buffers_they_name():
    """The cached op arguments are rebuilt when a buffer or the page table is replaced (``bind``)."""
    weights, _ = _weights(2)
    a, b, bounds, table, ranks, members = weights.kernel_args()
    assert a is weights.a and b is weights.b and table is weights.page_table and ranks is weights.slot_rank
    assert members is weights.slot_members and bounds == [0, weights.slices[0].stop, weights.slices[1].stop]
    assert weights.kernel_args() is weights.kernel_args()  # cached while nothing changes
    moved = {name: getattr(weights, name).clone() for name in ("a", "b", "bias", "dora_gain", "dora_shift")}
    weights.bind(moved, weights.table)
    assert weights.kernel_args()[0] is moved["a"] and weights.kernel_args()[1] is moved["b"]


def test_slot_rows_layouts():
    batch = LoRABatch(4)
    batch.set([-1, 0, 0, 1, 1, 3], [2, 1, 1, 4, 1, 1])  # the engine's sorted layout: in place
    rows = batch.slot_rows(torch.device("cpu"))
    assert rows.rows is None and (rows.first, rows.last, rows.lo, rows.hi) == (2, 10, 0, 3)
    assert rows.offsets.tolist() == [2, 7, 7, 8] and rows.live_slots == (0, 1, 3)  # slot 2: empty group
    assert rows.row_slot.tolist() == [0, 0, 1, 1, 1, 1, 1, 3]
    batch.set([2, 2, 0, -1, 1, 1, 3], [1] * 7)  # unsorted: gathered in slot order
    rows = batch.slot_rows(torch.device("cpu"))
    assert rows.rows.tolist() == [2, 4, 5, 0, 1, 6]
    assert rows.offsets.tolist() == [1, 3, 5, 6] and rows.row_slot.tolist() == [0, 1, 1, 2, 2, 3]


def test_base_rows_are_untouched_and_cost_nothing():
    batch = LoRABatch(2)
    batch.set([-1, 0, -1, 1, 1], [3, 2, 4, 1, 2])
    assert batch.segments == [(3, 5, 0), (9, 12, 1)]  # consecutive same-slot sequences merge
    batch.set([-1, -1], [3, 4])
    assert not batch.segments


def test_batch_validation():
    batch = LoRABatch(2)
    with pytest.raises(ValueError, match="slot 2"):
        batch.set([2], [1])
    with pytest.raises(ValueError, match="2 slots for 1 sequences"):
        batch.set([0, 1], [1])
    batch.set([0], [3])
    with pytest.raises(RuntimeError, match="set for 3 tokens"):
        batch.check_rows(4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backend_applies_dora_and_bias_per_row(backend):
    """DoRA rescales its rows' base output and lora_bias adds per member, through either backend."""
    if backend == "cpu" and not cpu_kernel_available("cpu"):
        pytest.skip("the native CPU kernel does not build here")
    g = torch.Generator().manual_seed(5)
    outs = OUTS[3]
    base_bias = torch.randn(sum(outs), generator=g)
    weights = SlotWeights(["q", "k", "v"], D_IN, outs, 3, 16, "cpu", torch.float32)
    plain = [_module_weights(o, 8, g) for o in outs]
    dora = [
        LoRAModuleWeights(m.a, m.b, m.scale, dora_g=torch.rand(m.b.shape[0], generator=g) + 0.5)
        for m in plain
    ]
    biased = [LoRAModuleWeights(m.a, m.b, 2.0, bias=torch.randn(m.b.shape[0], generator=g)) for m in plain]
    for slot, modules in enumerate([plain, dora, biased]):
        for j, (module, cols) in enumerate(zip(modules, weights.slices, strict=True)):
            weights.write(
                slot, j, module if j != 1 or slot != 2 else None, base_bias[cols]
            )  # k of slot 2: none
    x, y = torch.randn(9, D_IN, generator=g), torch.randn(9, sum(outs), generator=g)
    seq_slots, seq_lens = [2, -1, 1, 0, 1], [2, 1, 3, 1, 2]
    backend_obj = make_lora_backend(backend, "cpu", 3)
    backend_obj.plan(seq_slots, seq_lens)
    got = y.clone()
    backend_obj.apply(got, x, weights)
    want = y.double().clone()
    row = 0
    for slot, n in zip(seq_slots, seq_lens, strict=True):
        for i in range(row, row + n):
            for j, cols in enumerate(weights.slices):
                module = [plain, dora, biased][slot][j] if slot >= 0 and not (slot == 2 and j == 1) else None
                if module is None:
                    continue
                delta = module.scale * (x[i].double() @ module.a.double().t()) @ module.b.double().t()
                if module.dora_g is not None:  # y = g * (W x + b) ... with the base bias kept out
                    g_ = module.dora_g.double()
                    want[i, cols] = (
                        g_ * (want[i, cols] - base_bias[cols].double() + delta) + base_bias[cols].double()
                    )
                else:
                    want[i, cols] += delta + (
                        0 if module.bias is None else module.scale * module.bias.double()
                    )
        row += n
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected_auto = "cpu" if cpu_kernel_available("cpu") else "torch"
    assert make_lora_backend("auto", "cpu", 2).name == expected_auto
    assert make_lora_backend("torch", "cpu", 2).name == "torch"
    assert isinstance(make_lora_backend("torch", "cpu", 2), LoRABackend)
    with pytest.raises(ValueError, match="needs triton"):
        make_lora_backend("triton", "cpu", 2)
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        make_lora_backend("cuda-magic", "cpu", 2)


@pytest.mark.parametrize("members", [1, 2, 3])
def test_cpu_kernel_with_an_input_width_its_unrolled_loop_does_not_divide(members):
    """The native shrink walks the input dimension U columns at a time (U = 2 or 4): a width that is
    not a multiple of 4 (50) runs its tail columns too."""
    if "cpu" not in _ops():
        pytest.skip("the native CPU kernel does not build here")
    g = torch.Generator().manual_seed(7)
    weights, written = _weights(members, ranks=[16, 32, 48, 16], d_in=50)
    outs = OUTS[members]
    seq_slots, seq_lens = [0, 1, 1, 2, 3, 3, 3, 3], [1, 1, 1, 2, 1, 1, 1, 1]  # blocks of 1 to 4 rows
    n = sum(seq_lens)
    x, y = torch.randn(n, 50, generator=g), torch.randn(n, sum(outs), generator=g)
    batch = LoRABatch(len(written))
    batch.set(seq_slots, seq_lens)
    got = y.clone()
    _ops()["cpu"](got, x, weights, batch.slot_rows(torch.device("cpu")))
    torch.testing.assert_close(got.double(), _naive(y, x, written, seq_slots, seq_lens), rtol=1e-5, atol=1e-4)


def test_a_target_no_live_slot_uses_costs_no_kernel_call(tiny_llama_dir, tmp_path):
    """An attention-only adapter's rows skip the MLP targets (gate/up, down) before the op: the step's
    live slots hold no rank there (``rank_mask & live_mask``). The attention targets still run."""
    from server.engine.sequence import Sequence
    from tests.engine_utils import build_test_runtime, greedy
    from tests.lora_fixtures import MIXED_CASES, make_mixed_adapters

    store = tmp_path / "store"
    make_mixed_adapters(tiny_llama_dir, store, [MIXED_CASES[0]])  # attn-r4: q, k, v, o
    rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, lora_backend="torch")
    backend = rt.lora.model.backend
    called: list[str] = []
    sgmv = backend.sgmv

    def recording(y, x, weights):
        called.append(weights.names[0].rsplit(".", 1)[-1])
        sgmv(y, x, weights)

    backend.sgmv = recording
    core = rt.engine.core
    core.add(Sequence("r0", [5, 6, 7, 8, 9], greedy(1), rt.adapters.resolve("attn-r4")))
    while core.has_work():  # the first steps may wait on the adapter's load; the prefill is eager
        core.step()
    assert called and set(called) == {"q_proj", "o_proj"}  # q/k/v fused: one target named by q_proj
