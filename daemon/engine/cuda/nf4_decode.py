"""How the NF4 GEMV turns packed nibbles into bf16 weights in registers, without memory lookups:
the byte tables, a relabeling of the 16 codes that makes them cheap, and the PTX that uses them.
Plain Python and torch (no Triton), so CI checks the decoding on the CPU.

`prmt` looks up 4 nibbles at once in an 8-byte table (two registers); a nibble's bit 3 does not
index: it makes `prmt` return the selected byte's top bit, repeated (0x00 or 0xFF). A 16-entry
code of 2-byte values is therefore 4 tables (entries 0-7 and 8-15, low and high bytes). The
entries 8-15 are looked up with bit 3 flipped (`xor 0x8888`), and each half's garbage is made to
cancel by xor: L = prmt(T_lo, s) gives T_lo[j] for label j < 8 and the repeated top bit of
T_lo[j] for label j + 8; H = prmt(T_hi ^ m, s ^ 8) gives the reverse. If entries j and j + 8 have
the same top bit in each byte, then with m the repeated top bit, L ^ H is the value in both cases.
The 16 NF4 codes can be paired that way (with zero written as -0.0), and so can bitsandbytes'
FP4 codes (its two zeros as +0 and -0), once they are relabeled;
the relabeling is a byte map applied to the packed weights once at load (lossless: the code
table is relabeled the same way). Per 8 weights: 12 `prmt` and 5 `xor` on the integer pipe,
where the masked design it replaces needed 14 `prmt`, 4 `lop3`, 4 `and`/shifts and 3 shifts
(the integer pipe bounded the GEMV, not memory: it ran equally fast on an H100 and an H200).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import torch


def _bf16_bits(value: float) -> int:
    """value rounded to bf16 (nearest, ties to even), as 16 bits."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _signed(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word  # a signed int32 kernel argument


def _word(values: list[int]) -> int:
    return _signed(values[0] | values[1] << 8 | values[2] << 16 | values[3] << 24)


@dataclass(frozen=True)
class NF4Decoding:
    """old_to_new[q]: the label the kernel uses for bitsandbytes' code index q. code: the 16
    values by new label (the dequantize kernel's table, bitsandbytes' exact floats). tables: the
    8 int32 registers the PTX reads: L low bytes (entries 0-3, 4-7), H low bytes, L high bytes,
    H high bytes."""

    old_to_new: tuple[int, ...]
    code: tuple[float, ...]
    tables: tuple[int, ...]

    @property
    def byte_map(self) -> torch.Tensor:
        """[256] uint8: a packed byte (two nibbles) of bitsandbytes -> the same weights relabeled."""
        old = torch.arange(256)
        labels = torch.tensor(self.old_to_new)
        return (labels[old >> 4] << 4 | labels[old & 15]).to(torch.uint8)

    def relabel(self, packed: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
        """bitsandbytes' packed uint8 weights, relabeled (a new tensor; chunked, so the index
        temporaries stay small next to an 8B model's largest matrix)."""
        flat = packed.reshape(-1)
        table = self.byte_map.to(flat.device)
        out = torch.empty_like(flat)
        for start in range(0, flat.numel(), chunk):
            out[start:start + chunk] = table[flat[start:start + chunk].long()]
        return out


def decoding_for(code: list[float]) -> NF4Decoding:
    """Pair the 16 codes by the top bits of their bf16 bytes (each zero as +0 or -0, whichever
    makes every class even: NF4 has one zero, FP4 two), give pair p the labels p and p + 8, and
    build the tables."""
    if len(code) != 16:
        raise ValueError("a 4-bit code has 16 values")
    zeros = [q for q, v in enumerate(code) if v == 0]
    for signs in itertools.product((0x0000, 0x8000), repeat=len(zeros)):
        bits = [_bf16_bits(v) for v in code]
        for q, sign in zip(zeros, signs):
            bits[q] = sign
        classes: dict[tuple[int, int], list[int]] = {}
        for q, b in enumerate(bits):
            classes.setdefault((b >> 15, (b >> 7) & 1), []).append(q)
        if all(len(members) % 2 == 0 for members in classes.values()):
            break
    else:
        raise ValueError("this 4-bit code cannot be paired for the xor tables")
    pairs = [(members[i], members[i + 1]) for members in classes.values() for i in range(0, len(members), 2)]
    new_to_old = [first for first, _ in pairs] + [second for _, second in pairs]
    old_to_new = [0] * 16
    for new, old in enumerate(new_to_old):
        old_to_new[old] = new
    value = [bits[old] for old in new_to_old]
    tables: list[int] = []
    for shift in (0, 8):  # the low bytes, then the high bytes
        low = [(value[p] >> shift) & 0xFF for p in range(8)]
        high = [((value[p + 8] >> shift) & 0xFF) ^ (0xFF if low[p] & 0x80 else 0) for p in range(8)]
        tables += [_word(low[:4]), _word(low[4:]), _word(high[:4]), _word(high[4:])]
    return NF4Decoding(old_to_new=tuple(old_to_new), code=tuple(float(code[old]) for old in new_to_old),
                       tables=tuple(tables))


# The 4 nibbles in the low 16 bits of {src} (the selector: `prmt` reads no more of it), {xs} the
# same with bit 3 of each nibble flipped, as bf16 pairs: weights 2j, 2j + 1 of the 4 in one
# register, in memory order (bitsandbytes puts weight 2b in the high nibble of byte b).
_PAIRS_HALF = """prmt.b32 a, ${t0}, ${t1}, {src};
prmt.b32 b, ${t2}, ${t3}, {xs};
xor.b32 lo, a, b;
prmt.b32 a, ${t4}, ${t5}, {src};
prmt.b32 b, ${t6}, ${t7}, {xs};
xor.b32 hi, a, b;
prmt.b32 {o0}, lo, hi, 0x4051;
prmt.b32 {o1}, lo, hi, 0x6273;
"""


def _pairs(word: str, first_table: int, outs: list[str]) -> str:
    """PTX: the 8 weights of {word} as 4 bf16 pairs into outs. The upper half moves down by a
    multiply-high, which runs on the FMA pipe, not the integer pipe the lookups fill."""
    half = {f"t{i}": first_table + i for i in range(8)}
    return (f"xor.b32 x, {word}, 0x88888888;\n"
            + _PAIRS_HALF.format(src=word, xs="x", o0=outs[0], o1=outs[1], **half)
            + f"mul.hi.u32 w, {word}, 65536;\nmul.hi.u32 x, x, 65536;\n"
            + _PAIRS_HALF.format(src="w", xs="x", o0=outs[2], o1=outs[3], **half))


_REGS = ".reg .b32 a, b, lo, hi, w, x;\n"
# $0-$3: the pairs; $4: the word; $5-$12: the tables
PAIRS_ASM = "{\n" + _REGS + _pairs("$4", 5, ["$0", "$1", "$2", "$3"]) + "}"
# fp32 weights (for fp16 activations): $0-$7 weights 0-7; $8 the word; $9-$16 the tables
DECODE_ASM = ("{\n" + _REGS + ".reg .b32 p0, p1, p2, p3;\n" + _pairs("$8", 9, ["p0", "p1", "p2", "p3"])
              + "".join(f"shl.b32 ${2 * i}, p{i}, 16;\nand.b32 ${2 * i + 1}, p{i}, 0xFFFF0000;\n" for i in range(4))
              + "}")
