"""The collectives of a compiled program, read from its HLO text (`jax.stages.Compiled.as_text()`).

What a step communicates decides whether it scales: `plan` reports it for a TPU slice, and the tests bound it
by the parameter bytes. Counting the text's lines would mislead. XLA's TPU backend writes one asynchronous
collective three times (its start, a fusion that overlaps it with compute, its done), all with one
`channel_id`; it writes a reduce-scatter as an `all-reduce` inside a fusion computation named
`all-reduce-scatter...`; and a collective in a `while` body (scanned blocks, gradient accumulation) runs
once per iteration. So one collective is one channel (or one instruction where it has no channel), and
counts are multiplied by the known trip counts of the loops around it.

Bytes are per chip and per step: the size of the whole buffer a collective works on, the larger of its
operands and its result (an all-gather's gathered array, a reduce-scatter's unreduced input, an all-reduce's
or a permute's operand). A chip sends and receives about that much: (n - 1) / n of it for a gather or a
reduce-scatter over n chips, twice that for a ring all-reduce.
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast")
# Bytes per element by HLO type name; s4/u4 (packed two to a byte on TPU) are rounded up: they carry no weights.
_TYPES_BY_SIZE = {
    1: "pred s4 u4 s8 u8 f8e4m3fn f8e5m2 f8e4m3 f8e3m4 f8e4m3fnuz f8e5m2fnuz",
    2: "s16 u16 f16 bf16",
    4: "s32 u32 f32",
    8: "s64 u64 f64 c64",
    16: "c128",
}
DTYPE_BYTES = {name: size for size, names in _TYPES_BY_SIZE.items() for name in names.split()}
REDUCE_SCATTER_COMPUTATION = "all-reduce-scatter"  # the TPU backend's fusion for a reduce-scatter

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(
    r"\b(?:calls|body|branch_computations|called_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%[\w.\-]+)"
)  # what an instruction runs; `to_apply` (a reduction's adder) and a loop's `condition` run no collectives
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%([\w.\-]+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_GROUPS = re.compile(r"\b(?:replica_groups|source_target_pairs|dimensions)=(\S+?)(?:, [a-z_]+=|$)")


def _strip_layouts(shape: str) -> str:
    """An HLO shape without its layouts (`{1,0:T(8,128)(2,1)S(1)}`), which differ between copies of one op."""
    return re.sub(r"\{[^{}]*\}", "", shape)


def _bytes(shape: str) -> int:
    """Bytes of an HLO shape (an array or a tuple of them)."""
    shape = _strip_layouts(shape)
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _scalar_bytes(shape: str) -> int:
    """Bytes of the scalar leaves of a tuple shape: an async start's context words, not data."""
    return sum(DTYPE_BYTES.get(dtype, 0) for dtype, dims in _ARRAY.findall(_strip_layouts(shape)) if not dims)


def _kind(opcode: str, computation: str) -> str | None:
    """The collective an opcode is (a `-start` counts, its `-done` not), or None for any other instruction."""
    base = opcode.removesuffix("-start")
    if base not in KINDS or opcode.endswith("-done"):
        return None
    if base == "all-reduce" and computation.startswith(REDUCE_SCATTER_COMPUTATION):
        return "reduce-scatter"
    return base


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """kind -> (count, bytes per chip) of every collective one run of the program executes.

    `hlo_text` is a compiled program's HLO (`compiled.as_text()`), of any backend. Loops without a known
    trip count are counted once.
    """
    shapes: dict[str, str] = {}  # instruction name -> result shape, over the whole module (names are unique)
    found = []  # (computation, key, kind, result shape, operand names, opcode)
    # callee -> (caller, times per call: a number, or the loop condition whose bound is the trip count)
    callers: dict[str, list[tuple[str, int | str]]] = collections.defaultdict(list)
    constants: dict[str, list[str]] = collections.defaultdict(list)  # computation -> its integer scalars
    counted = set()  # computations whose root is `i < bound`: a loop condition counting from 0, as JAX's are
    entry, computation = None, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            if line.startswith("ENTRY"):
                entry = computation
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        name, shape, opcode, rest = instruction.groups()
        shapes[name] = shape
        if opcode == "constant" and shape.startswith(("s32[]", "s64[]", "u32[]", "u64[]")):  # TPU loops count in u32
            constants[computation].append(rest.split(")", 1)[0])
        if opcode == "compare" and line.lstrip().startswith("ROOT") and "direction=LT" in rest:
            counted.add(computation)
        trip = _TRIP_COUNT.search(rest) if opcode == "while" else None
        condition = _CONDITION.search(rest) if opcode == "while" else None
        for group in _CALLS.findall(rest):
            for callee in _OPERAND.findall(group):
                callers[callee].append((computation, trip.group(1) if trip else condition.group(1) if condition else 1))
        kind = _kind(opcode, computation)
        if kind:
            channel = _CHANNEL.search(rest)
            # The copies of one asynchronous collective share its channel, kind, shape and devices; distinct
            # collectives may share a channel id (CPU), never all of these in one computation.
            key = (channel.group(1), kind, _strip_layouts(shape), tuple(_GROUPS.findall(rest))) if channel else (name,)
            operands = _OPERAND.findall(rest.split(")", 1)[0])
            found.append((computation, key, kind, shape, operands, opcode))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text: pass a compiled program's `as_text()`")

    def trip_count(times: int | str) -> int:
        """A while loop's known trip count, else the bound of its condition `i < N` (JAX's loops count from 0),
        else 1."""
        if isinstance(times, str) and not times.isdigit():
            bound = constants[times]
            return int(bound[0]) if times in counted and len(bound) == 1 and bound[0].isdigit() else 1
        return int(times)

    runs: dict[str, int] = {entry: 1}

    def times_run(name: str) -> int:
        """How often one run of the program runs computation `name` (HLO's call graph has no cycles)."""
        if name not in runs:
            runs[name] = sum(times_run(caller) * trip_count(times) for caller, times in callers.get(name, []))
        return runs[name]

    # key -> computation -> [kind, instructions there, times that computation runs, bytes of one]
    by_key: dict[tuple, dict[str, list]] = collections.defaultdict(dict)
    for comp, key, kind, shape, operands, opcode in found:
        runs_here = times_run(comp)
        if runs_here == 0:  # a computation nothing calls
            continue
        operand_bytes = sum(_bytes(shapes.get(o, "")) for o in operands)
        result_bytes = _bytes(shape)
        if opcode.endswith("-start") and shape.startswith("("):  # (operands, outputs, context words)
            result_bytes -= operand_bytes + _scalar_bytes(shape)
        entry_here = by_key[key].setdefault(comp, [kind, 0, runs_here, max(operand_bytes, result_bytes)])
        entry_here[1] += 1
    totals: dict[str, tuple[int, int]] = {}
    for copies in by_key.values():  # the copy that runs most often is the collective; the others its parts
        kind, count, runs_here, size = max(copies.values(), key=lambda c: c[1] * c[2])
        old_count, old_bytes = totals.get(kind, (0, 0))
        totals[kind] = (old_count + count * runs_here, old_bytes + count * runs_here * size)
    return dict(sorted(totals.items()))
