"""The NF4 GEMV's nibble decoding, checked on the CPU: the PTX text the kernel runs is executed
by a small interpreter of the instructions it uses, over every code in every position of a
word, and the relabeled weights dequantize to bitsandbytes' own values bit for bit."""

import re
import struct

import pytest
import torch

from daemon.engine.cuda import nf4_decode

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32, default mode: byte i of the result is byte (nibble i & 7) of {b, a}, or that
    byte's top bit repeated when the nibble's bit 3 is set."""
    source = (b << 32 | a).to_bytes(8, "little")
    out = 0
    for i in range(4):
        nibble = selector >> 4 * i & 0xF
        byte = source[nibble & 7]
        out |= (0xFF if byte & 0x80 else 0) << 8 * i if nibble & 8 else byte << 8 * i
    return out


_OPS = {
    "prmt.b32": lambda a, b, c: _prmt(a, b, c),
    "xor.b32": lambda a, b: a ^ b,
    "and.b32": lambda a, b: a & b,
    "shl.b32": lambda a, b: a << b & MASK,
    "shr.u32": lambda a, b: a >> b,
    "mul.hi.u32": lambda a, b: a * b >> 32,
    "mov.b32": lambda a: a,
}


def run_ptx(text: str, inputs: list[int], outputs: int) -> list[int]:
    """Executes the asm of an inline_asm_elementwise call: $0.. are the outputs, then the inputs."""
    regs = {f"${outputs + i}": v & MASK for i, v in enumerate(inputs)}

    def value(operand: str) -> int:
        return int(operand, 0) if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", operand) else regs[operand]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dest, *sources = [a.strip() for a in args.split(",")]
        regs[dest] = _OPS[op](*map(value, sources)) & MASK
    return [regs[f"${i}"] for i in range(outputs)]


def bf16_bits(values: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in values.to(torch.bfloat16).view(torch.int16).tolist()]


NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
# bitsandbytes' FP4 (sign in bit 3, two zeros)
FP4 = [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
       0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204,
       -0.25]


def words_covering_every_code() -> list[int]:
    """Words (bitsandbytes' packing) with every code at every one of the 8 nibble positions, the
    other nibbles random."""
    gen = torch.Generator().manual_seed(0)
    words = []
    for position in range(8):
        for code in range(16):
            word = int(torch.randint(0, 1 << 32, (1,), generator=gen, dtype=torch.int64))
            shift = 4 * position
            words.append(word & ~(0xF << shift) & MASK | code << shift)
    return words


def weights_of(word: int) -> list[int]:
    """bitsandbytes' code indices of a word's 8 weights in memory order: byte b holds weight 2b
    in its high nibble, weight 2b + 1 in its low nibble."""
    return [word >> 8 * (i // 2) + (0 if i % 2 else 4) & 0xF for i in range(8)]


def relabel_word(decoding: nf4_decode.NF4Decoding, word: int) -> int:
    mapped = decoding.byte_map[torch.tensor(list(word.to_bytes(4, "little")))]
    return int.from_bytes(bytes(mapped.tolist()), "little")


@pytest.mark.parametrize("code", [NF4, FP4], ids=["nf4", "fp4"])
@pytest.mark.parametrize("fp32", [False, True], ids=["bf16 pairs", "fp32 weights"])
def test_the_kernels_ptx_decodes_every_code_in_every_position(fp32, code):
    decoding = nf4_decode.decoding_for(code)
    expected_bits = bf16_bits(torch.tensor(code))
    for word in words_covering_every_code():
        inputs = [relabel_word(decoding, word), *decoding.tables]
        if fp32:
            got = [v >> 16 for v in run_ptx(nf4_decode.DECODE_ASM, inputs, 8)]
            assert all(v & 0xFFFF == 0 for v in run_ptx(nf4_decode.DECODE_ASM, inputs, 8))  # exact bf16 in fp32
        else:
            got = [h for pair in run_ptx(nf4_decode.PAIRS_ASM, inputs, 4) for h in (pair & 0xFFFF, pair >> 16)]
        want = [expected_bits[q] for q in weights_of(word)]
        # a zero may come out as -0.0 (that is what makes the tables pair up); every other value exactly
        assert [g & 0x7FFF if w & 0x7FFF == 0 else g for g, w in zip(got, want)] == \
            [w & 0x7FFF if w & 0x7FFF == 0 else w for w in want], hex(word)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_relabeled_weights_dequantize_to_bitsandbytes_values(quant_type):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 256, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    decoding = nf4_decode.decoding_for(state.code.float().tolist())
    relabeled = decoding.relabel(packed, chunk=1000)  # several chunks, the last one short
    assert relabeled.shape == (packed.numel(),) and relabeled.dtype == torch.uint8
    nibbles = torch.stack([relabeled >> 4, relabeled & 15], dim=1).reshape(-1).long()
    code = torch.tensor(decoding.code)
    ours = (code[nibbles].reshape(-1, 64) * state.absmax.float()[:, None]).reshape(w.shape).to(torch.bfloat16)
    assert torch.equal(ours, functional.dequantize_4bit(packed, state))


def _fp32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@pytest.mark.parametrize("code, pairs", [
    (NF4, True),
    (FP4, True),
    ([_fp32(0x3F800000 + i * 0x10000) for i in range(16)], True),  # 1, 1.0078, ..., 1.117: all of one class
    ([0.0] + [float(i) for i in range(1, 16)], False),  # 1-15 split 5 + 10 by the low top bit: zero leaves one class odd either way
])
def test_which_codes_the_xor_tables_can_hold(code, pairs):
    if not pairs:
        with pytest.raises(ValueError, match="cannot be paired"):
            nf4_decode.decoding_for(code)
        return
    decoding = nf4_decode.decoding_for(code)
    assert sorted(decoding.old_to_new) == list(range(16))
    assert [decoding.code[decoding.old_to_new[q]] for q in range(16)] == code


def test_a_code_table_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="16 values"):
        nf4_decode.decoding_for(NF4[:8])
