"""The per-step metadata builder (``StepInputs``) and the LoRA segment table it carries."""

from __future__ import annotations

import pytest
import torch

from server.engine.sequence import Sequence
from server.engine.step_inputs import StepInputs, StepLimits
from server.engine.types import SamplingParams
from server.lora.batch import DECODE_SEGMENT_ROWS, LoRABatch

BS = 4
LIMITS = StepLimits(max_num_seqs=8, max_num_tokens=32, max_blocks_per_seq=6, block_size=BS, padding_block=99)


def _seq(name, tokens, computed, new, table, slot=-1):
    seq = Sequence(name, tokens, SamplingParams(max_tokens=4))
    seq.num_computed_tokens, seq.num_new_tokens, seq.block_table, seq.lora_slot = computed, new, table, slot
    return seq


def _mixed():
    return [
        _seq("prefill", list(range(10, 19)), 0, 9, [7, 3, 5], slot=1),  # 9 tokens: last block partial
        _seq("decode", list(range(20, 26)), 5, 1, [2, 8]),  # position 5: second block, offset 1
        _seq("chunk", list(range(30, 44)), 4, 6, [1, 4, 6]),  # a chunk after a cached prefix: no sample
    ]


def test_prepare_writes_every_input():
    inputs = StepInputs(LIMITS, "cpu")
    step = inputs.prepare(_mixed())
    layout = step.layout
    assert step.input_ids[0].tolist() == list(range(10, 19)) + [25] + list(range(34, 40))
    assert step.positions[0].tolist() == list(range(9)) + [5] + list(range(4, 10))
    slots = [7 * BS + i for i in range(4)] + [3 * BS + i for i in range(4)] + [5 * BS] + [8 * BS + 1]
    slots += [4 * BS + i for i in range(4)] + [6 * BS, 6 * BS + 1]
    assert layout.device.slot_mapping.tolist() == slots
    assert layout.device.query_start.tolist() == [0, 9, 10, 16]
    assert layout.device.context_lens.tolist() == [9, 6, 10]
    tables = layout.device.block_tables.tolist()
    assert [tables[0][:3], tables[1][:2], tables[2][:3]] == [[7, 3, 5], [2, 8], [1, 4, 6]]
    assert (layout.num_seqs, layout.num_tokens, layout.max_query_len, layout.max_context_len) == (
        3,
        16,
        9,
        10,
    )
    assert step.logits_rows.tolist() == [8, 9] and step.num_sampled == 2  # the chunk samples nothing
    assert (step.lora_slots, step.lora_tokens) == ([1, -1, -1], [9, 1, 6])
    assert [(s.start, s.num_tokens, s.context_len, s.block_table) for s in layout.spans] == [
        (0, 9, 9, [7, 3, 5]),
        (9, 1, 6, [2, 8]),
        (10, 6, 10, [1, 4, 6]),
    ]
    assert not layout.static and not layout.is_decode


def test_views_keep_their_addresses_across_steps():
    """What lets one captured graph read every later step."""
    inputs = StepInputs(LIMITS, "cpu")
    first = inputs.prepare(_mixed()).layout.device
    second = inputs.prepare(_mixed()[1:2]).layout.device
    for a, b in ((first.query_start, second.query_start), (first.block_tables, second.block_tables)):
        assert a.data_ptr() == b.data_ptr()


def test_decode_padded_to_a_bucket():
    inputs = StepInputs(LIMITS, "cpu")
    seqs = [_seq("a", [1, 2, 3], 2, 1, [5], slot=0), _seq("b", [4] * 9, 8, 1, [1, 2, 3])]
    step = inputs.prepare(seqs, pad_to=4)
    layout = step.layout
    assert layout.static and layout.is_decode and (layout.num_seqs, layout.num_tokens) == (4, 4)
    assert layout.device.slot_mapping.tolist() == [5 * BS + 2, 3 * BS, 99 * BS, 99 * BS]
    assert layout.device.context_lens.tolist() == [3, 9, 1, 1]
    assert layout.device.query_start.tolist() == [0, 1, 2, 3, 4]
    assert layout.device.block_tables[2:, 0].tolist() == [99, 99]
    assert step.input_ids[0].tolist() == [3, 4, 0, 0]
    assert (step.lora_slots, step.lora_tokens) == ([0, -1, -1, -1], [1, 1, 1, 1])
    assert step.num_sampled == 4


def test_a_step_of_padding_only_is_a_decode_step():
    """What graph capture records: the decode kernels, not a prefill over nothing."""
    layout = StepInputs(LIMITS, "cpu").prepare([], pad_to=4).layout
    assert layout.is_decode and layout.static and layout.num_seqs == 4
    assert layout.device.context_lens.tolist() == [1, 1, 1, 1]


def test_limits_are_enforced():
    inputs = StepInputs(LIMITS, "cpu")
    with pytest.raises(ValueError, match="buffers hold 8"):
        inputs.prepare([], pad_to=9)
    with pytest.raises(ValueError, match="at most 6"):
        inputs.prepare([_seq("long", [1] * 30, 29, 1, list(range(8)))])


def test_lora_segment_table_in_bound_buffers():
    inputs = StepInputs(LIMITS, "cpu")
    host, device = inputs.lora_segment_views()
    batch = LoRABatch(4)
    batch.bind(host, device)
    batch.set([2, 2, -1, 0], [3, 2, 4, 1])
    assert batch.segments == [(0, 5, 2), (9, 10, 0)]
    assert batch.segment_table(torch.device("cpu")).data_ptr() == device.data_ptr()
    assert device[:, :2].tolist() == [[0, 9], [5, 1], [2, 0]]
    assert batch.launch_segments == 2 and batch.segment_rows is None


def test_static_decode_batch_has_fixed_launches():
    """Decode segments split at a fixed row count; a static batch launches one program per row and
    zero-length columns past the live segments."""
    batch = LoRABatch(4)
    slots = [1] * (DECODE_SEGMENT_ROWS + 3) + [-1, 3]
    batch.set(slots, [1] * len(slots), static=True)
    assert batch.segments == [(0, 16, 1), (16, 19, 1), (20, 21, 3)]
    assert batch.launch_segments == len(slots) and batch.max_segment_len == DECODE_SEGMENT_ROWS
    table = batch.segment_table(torch.device("cpu"))
    assert table.shape == (3, len(slots))
    assert table[1].tolist() == [16, 3, 1] + [0] * (len(slots) - 3)
    with pytest.raises(ValueError, match="decode step"):
        batch.set([0, 1], [2, 1], static=True)
