"""What Triton's CPU interpreter lacks to run the kernels as they are compiled for a GPU: a small
PTX interpreter for their inline assembly (the ``ASM`` forms), and bfloat16 ``tl.dot``.

The PTX interpreter knows the instructions the kernels use, on 32-bit registers: ``lop3.b32``
(any truth table) and ``prmt.b32`` (default mode), ``.reg .b32`` temporaries and ``{ ... }``
scopes. Operands are ``$n`` (outputs first, then inputs, as in the constraint string),
temporaries and integer immediates. Anything else is an error, so an instruction a kernel starts
to use cannot pass unread.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

_U32 = np.uint32
_MASK32 = 0xFFFFFFFF


def lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    """``lop3.b32 d, a, b, c, lut``: each bit of ``d`` is bit ``4 a + 2 b + c`` of ``lut``."""
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=_U32)
    for index in range(8):
        if lut >> index & 1:
            term = np.full(out.shape, _MASK32, dtype=_U32)
            for operand, bit in ((a, 4), (b, 2), (c, 1)):
                term &= operand if index & bit else ~operand
            out |= term
    return out


def prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``prmt.b32 d, a, b, c`` (default mode): byte ``i`` of ``d`` is byte ``s & 7`` of the eight
    bytes ``{b, a}`` (``a`` the low four), ``s`` nibble ``i`` of ``c``; ``s & 8`` replicates the
    chosen byte's sign bit instead."""
    pool = (np.asarray(b, dtype=np.uint64) << np.uint64(32)) | np.asarray(a, dtype=np.uint64)
    c = np.asarray(c, dtype=_U32)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=_U32)
    for i in range(4):
        sel = (c >> _U32(4 * i)) & _U32(0xF)
        byte = ((pool >> (8 * (sel & _U32(7))).astype(np.uint64)) & np.uint64(0xFF)).astype(_U32)
        byte = np.where(sel & _U32(8), np.where(byte & _U32(0x80), _U32(0xFF), _U32(0)), byte)
        out |= byte.astype(_U32) << _U32(8 * i)
    return out


_OPS = {"lop3.b32": (4, lambda a, b, c, lut: lop3(a, b, c, int(lut.flat[0]))), "prmt.b32": (3, prmt)}


def run(asm: str, inputs: list[np.ndarray], outputs: int = 1) -> list[np.ndarray]:
    """Execute ``asm`` on uint32 arrays; ``$0 .. $outputs-1`` are the results."""
    regs: dict[str, np.ndarray | None] = {f"${i}": None for i in range(outputs)}
    regs.update({f"${outputs + i}": np.asarray(v, dtype=_U32) for i, v in enumerate(inputs)})
    for statement in asm.replace("{", ";").replace("}", ";").split(";"):
        statement = statement.strip()
        if not statement:
            continue
        if statement.startswith(".reg .b32"):
            for name in statement[len(".reg .b32") :].split(","):
                regs[name.strip()] = None
            continue
        opcode, _, rest = statement.partition(" ")
        if opcode not in _OPS:
            raise NotImplementedError(f"PTX instruction not emulated: {statement!r}")
        arity, fn = _OPS[opcode]
        dest, *operands = [o.strip() for o in rest.split(",")]
        if len(operands) != arity or dest not in regs:
            raise ValueError(f"bad operands in {statement!r}")
        regs[dest] = fn(*(_operand(o, regs) for o in operands))
    results = [regs[f"${i}"] for i in range(outputs)]
    if any(r is None for r in results):
        raise ValueError(f"an output of {asm!r} is never written")
    return results


def _operand(text: str, regs: dict[str, np.ndarray | None]) -> np.ndarray:
    if text in regs:
        if regs[text] is None:
            raise ValueError(f"register {text} read before it is written")
        return regs[text]
    if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", text):
        return np.asarray(int(text, 0) & _MASK32, dtype=_U32)
    raise ValueError(f"unknown operand {text!r}")


class _Call:
    def __init__(self, handles: list) -> None:
        self._handles = handles

    def get_result(self, i: int):
        return self._handles[i]


def _interpreter_with(hook: str):
    """``(triton.runtime.interpreter, its builder class)``; skips the test where that Triton's
    interpreter lacks the builder method ``hook`` or ``TensorHandle``."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, hook) or not hasattr(interpreter, "TensorHandle"):
        pytest.skip(f"this Triton's interpreter has no {hook} to patch")
    return interpreter, builder


def emulate_inline_asm(monkeypatch) -> None:
    """Make Triton's interpreter run ``tl.inline_asm_elementwise`` through :func:`run` (one element
    per instance, 32-bit operands and results)."""
    interpreter, builder = _interpreter_with("create_inline_asm")
    np_types = {"fp32": np.float32, "int32": np.int32, "uint32": np.uint32}

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        if pack != 1:
            raise NotImplementedError("only pack=1 inline assembly is emulated")
        if any(v.data.dtype.itemsize != 4 for v in values):
            raise NotImplementedError("only 32-bit inline assembly operands are emulated")
        outs = run(asm, [v.data.view(_U32) for v in values], outputs=len(types))
        handles = []
        for out, ty in zip(outs, types, strict=True):
            scalar = getattr(ty, "element_ty", ty)
            if scalar.name not in np_types:
                raise NotImplementedError(f"inline assembly results of type {scalar} are not emulated")
            handles.append(
                interpreter.TensorHandle(np.ascontiguousarray(out).view(np_types[scalar.name]), scalar)
            )
        return _Call(handles)

    monkeypatch.setattr(builder, "create_inline_asm", create_inline_asm)


def widen_bf16_dots(monkeypatch) -> None:
    """Make Triton's interpreter multiply bfloat16 ``tl.dot`` operands as the floats they are (it
    holds them as uint16 bit patterns and multiplies those): each is widened to float32 exactly,
    and products of 8-bit mantissas are exact in float32, as on tensor cores."""
    import triton.language as tl

    interpreter, builder = _interpreter_with("create_dot")
    original = builder.create_dot

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    monkeypatch.setattr(builder, "create_dot", create_dot)
