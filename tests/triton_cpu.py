"""Triton's interpreter made to run hfollama's kernels on the CPU, for the tests that do
(test_gemv_interpreted, test_kernels_interpreted, test_cuda_forward_interpreted). The interpreter runs neither inline
PTX nor libdevice calls: the PTX is executed by a small vectorized emulator of the instructions
the kernels use, and libdevice's two roundings by NumPy's. Three of its own gaps are filled: bf16
dot products (it multiplied raw bits), fp32 -> bf16 rounding (it truncated), and loop bounds
from program ids under NumPy 2.4.

Importing it skips the test module that imports it unless Triton is installed, no GPU is, and
TRITON_INTERPRET=1 was set before Triton was first imported (conftest does that without a GPU);
`interpreted(monkeypatch, gemv)` installs the patches for a test."""

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# importing this skips the importing test module where the interpreter cannot run the kernels
if torch.cuda.is_available():
    pytest.skip("a GPU runs the kernels for real (test_cuda_gemv, test_cuda_kernels, test_cuda_forward)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="needs Triton (its interpreter)")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before anything imports triton
    pytest.skip("Triton's interpreter is off", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

U32 = np.uint32


def _prmt(a, b, selector):
    source = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a, dtype=U32)
    for i in range(4):
        nibble = (selector >> U32(4 * i)) & U32(0xF)
        byte = ((source >> (U32(8) * (nibble & U32(7))).astype(np.uint64)) & np.uint64(0xFF)).astype(U32)
        sign = np.where(byte & U32(0x80), U32(0xFF), U32(0))
        out |= np.where(nibble & U32(8), sign, byte) << U32(8 * i)
    return out


def _bf16_round(v: np.ndarray) -> np.ndarray:
    """float64 -> the bits of the nearest bf16 (ties to even), as the low 16 bits of uint32."""
    mantissa, exponent = np.frexp(v)
    rounded = np.ldexp(np.rint(mantissa * 256.0), exponent - 8).astype(np.float32)
    return rounded.view(U32) >> U32(16)


def _bf16_halves(r):
    lo = (r << U32(16)).view(np.float32).astype(np.float64)
    hi = (r & U32(0xFFFF0000)).view(np.float32).astype(np.float64)
    return lo, hi


def _fma_bf16x2(a, b, c):
    (al, ah), (bl, bh), (cl, ch) = _bf16_halves(a), _bf16_halves(b), _bf16_halves(c)
    return _bf16_round(al * bl + cl) | (_bf16_round(ah * bh + ch) << U32(16))


def _f32(r):
    return r.view(np.float32)


def _load(addresses, np_dtype):
    flat = addresses.astype(np.uint64).reshape(-1)
    out = interpreter._interpreter.load(flat, np.ones(flat.shape, dtype=bool), np.zeros(flat.shape, dtype=np_dtype),
                                        np.dtype(np_dtype))
    return out.reshape(addresses.shape)


_ALU = {
    "xor.b32": lambda a, b: a ^ b,
    "and.b32": lambda a, b: a & b,
    "shl.b32": lambda a, b: a << b,
    "shr.u32": lambda a, b: a >> b,
    "mul.hi.u32": lambda a, b: ((a.astype(np.uint64) * b.astype(np.uint64)) >> np.uint64(32)).astype(U32),
    "mov.b32": lambda a: a,
    "prmt.b32": _prmt,
    "fma.rn.bf16x2": _fma_bf16x2,
    "add.f32": lambda a, b: (_f32(a) + _f32(b)).view(U32),
    "sub.f32": lambda a, b: (_f32(a) - _f32(b)).view(U32),
}


def run_asm(text: str, outputs: int, inputs: list[np.ndarray], shape) -> list[np.ndarray]:
    """Executes inline PTX elementwise over numpy arrays: $0.. outputs, then inputs (uint32
    registers; 64-bit addresses stay uint64)."""
    regs = {f"${outputs + i}": v for i, v in enumerate(inputs)}

    def value(operand):
        if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", operand):
            return np.full(shape, int(operand, 0), dtype=U32)
        if re.fullmatch(r"0f[0-9A-Fa-f]{8}", operand):  # a float's bits
            return np.full(shape, int(operand[2:], 16), dtype=U32)
        return regs[operand]

    for statement in text.replace("{\n", "\n").replace("\n}", "\n").split(";"):
        statement = statement.strip().strip("{}").strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, args = statement.split(None, 1)
        if op == "mov.u32" and "%laneid" in args:
            regs[args.split(",")[0].strip()] = np.zeros(shape, dtype=U32)
        elif op.startswith("ld.global.nc"):
            dests, address = re.fullmatch(r"\{?([^}\[]*?)\}?,\s*\[(\$\d+)\]", args.strip()).groups()
            dests = [d.strip() for d in dests.split(",")]
            base = regs[address].astype(np.uint64)
            kind = op.rsplit(".", 1)[1]
            for i, dest in enumerate(dests):
                if kind == "u8":
                    regs[dest] = _load(base, np.uint8).astype(U32)
                else:  # f32 / b32: 4 bytes each
                    regs[dest] = _load(base + np.uint64(4 * i), np.uint32).astype(U32)
        else:
            dest, *sources = [a.strip() for a in args.split(",")]
            regs[dest] = np.asarray(_ALU[op](*map(value, sources)), dtype=U32).reshape(shape)
    return [regs[f"${i}"] for i in range(outputs)]


class _Results:
    def __init__(self, handles):
        self.handles = handles

    def get_result(self, i):
        return self.handles[i]


def _as_register(handle):
    data = np.asarray(handle.data)
    if data.dtype in (np.int64, np.uint64):
        return data.astype(np.uint64)
    return data.view(U32) if data.dtype.itemsize == 4 else data.astype(U32)


def _create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
    registers = [_as_register(v) for v in values]
    shape = np.broadcast_shapes(*[r.shape for r in registers])
    registers = [np.broadcast_to(r, shape).copy() for r in registers]
    outs = run_asm(asm, len(types), registers, shape)
    handles = []
    for ty, out in zip(types, outs):
        scalar = getattr(ty, "element_ty", ty)
        view = out.view(np.float32) if scalar == triton.language.float32 else out.view(np.int32)
        handles.append(interpreter.TensorHandle(view, scalar))
    return _Results(handles)


_original_cast = interpreter.InterpreterBuilder.cast_impl


def _cast(self, src, dst_type):
    """fp32 or an integer -> bf16 rounded to nearest even, as the GPU converts (the interpreter
    truncates fp32, and writes an integer's value as bf16's raw bits)."""
    if dst_type.scalar == triton.language.bfloat16 and (src.dtype.scalar == triton.language.float32
                                                         or src.dtype.scalar.is_int()):
        rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.uint16).numpy(), dst_type.scalar)
    return _original_cast(self, src, dst_type)


def _as_fp32(handle):
    if handle.dtype.scalar == triton.language.bfloat16:  # kept as raw uint16 bits
        return (handle.data.astype(U32) << U32(16)).view(np.float32)
    return handle.data


def _dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    """tl.dot with bf16 operands as their values (the interpreter multiplies their raw bits)."""
    return interpreter.TensorHandle(np.matmul(_as_fp32(a), _as_fp32(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)


_original_patch_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    """The interpreter's own, with a loop bound's int() that NumPy 2.4 still allows (the scalars
    the interpreter makes are 1-element arrays, and int() of those is gone)."""
    _original_patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))


_LANGS: dict = {}


def _device_call(self, *args, **kwargs):
    """A @triton.jit helper called from a kernel. The interpreter patched triton.language again
    at every such call (most of a small kernel's time); the patches stay, so they are made
    only when the helper's language modules are not patched yet (their `full` still the
    builtin)."""
    langs = _LANGS.get(self.fn)
    if langs is None:
        tl = triton.language
        langs = _LANGS[self.fn] = [v for v in self.fn.__globals__.values() if v is tl or v is tl.core]
    if any(triton.language.core.is_builtin(lang.full) for lang in langs):
        interpreter._patch_lang(self.fn)
    fn = self.rewrite()
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise interpreter.InterpreterError(repr(e)) from e


def interpreted(monkeypatch, kernels) -> None:
    """Installs the emulator and the fixes for the duration of a test (kernels: the module whose
    libdevice calls are replaced)."""
    monkeypatch.setattr(interpreter.InterpretedFunction, "__call__", _device_call)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", _create_inline_asm)
    # libdevice's roundings, as NumPy's float32 arithmetic rounds (to nearest, one op at a time)
    monkeypatch.setattr(kernels, "libdevice", SimpleNamespace(mul_rn=lambda a, b: a * b, add_rn=lambda a, b: a + b))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _patch_lang_tensor)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", _cast)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _dot)
