"""Whole-step counts from a compiled HLO module's text: dot FLOPs (forward, remat, optimizer), HBM bytes and
collective bytes per device, each loop body weighted by its trip count.

XLA's `compiled.cost_analysis()` counts a while loop's body once, so for a model whose layers run in a scan it
undercounts by about the layer count; `hlo_stats` walks the call graph instead. Used by `kimi_jax.tools.aot` and
`benchmarks/aot_vs_maxtext.py` (which applies it to MaxText's HLO too, so both programs are counted one way).
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute", "ragged-all-to-all")
DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}


# --- Whole-step counts from a compiled HLO module's text, loop bodies weighted by their trip counts ---------------
# XLA's cost_analysis() counts a while loop's body once, so for a model whose layers run in a scan it undercounts
# FLOPs and bytes by about the layer count. `hlo_stats` walks the call graph instead.

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\(([^)]*)\)(.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](?:\{([^}]*)\})?")
# Ops that move no data of their own (or whose data is counted where it is produced).
_NO_TRAFFIC = {
  "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional", "after-all",
  "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "copy-done", "send-done", "recv-done",
  "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done", "async-update", "call-start",
  "call-update", "call-done",
}  # fmt: skip


@dataclasses.dataclass
class _Instr:
  name: str
  op: str
  shapes: list  # [(dtype, dims, in_vmem)]
  operands: list[str]
  attrs: str


def _shapes(type_text: str) -> list:
  out = []
  for dtype, dims, layout in _SHAPE.findall(type_text):
    if dtype in DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d), "S(1)" in (layout or "")))
  return out


def _nbytes(shapes, hbm_only: bool = False) -> int:
  return sum(DTYPE_BYTES[t] * math.prod(d) for t, d, vmem in shapes if not (hbm_only and vmem))


def _logical_lines(hlo_text: str):
  """The text's lines with continuations joined: a custom call's config may span lines (one even starting "}}")."""
  pending = None
  for line in hlo_text.splitlines():
    starts = line.startswith(
      ("  %", "  ROOT ", "%", "ENTRY ", "HloModule", "}, execution_thread=")
    ) or line.rstrip() in ("}", "")
    if pending is not None and not starts:
      pending += " " + line
      continue
    if pending is not None:
      yield pending
    pending = line
  if pending is not None:
    yield pending


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[_Instr]], str]:
  """The computations of an HLO module's text ({name: instructions}) and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in _logical_lines(hlo_text):
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = comps.setdefault(m.group(1), [])
        entry = m.group(1) if line.startswith("ENTRY") else entry
      continue
    if line.rstrip() == "}" or line.startswith("}, execution_thread="):
      current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      name, type_text, op, operands, attrs = m.groups()
      if op in ("parameter", "constant"):  # keep the number: parameter(3), constant(60)
        operands, attrs = "", operands.strip()
      current.append(_Instr(name, op, _shapes(type_text), re.findall(r"%([\w.\-]+)", operands), attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _trip_count(instr: _Instr, comps) -> int | None:
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", instr.attrs)
  consts = [
    int(i.attrs)
    for i in comps.get(cond.group(1) if cond else "", [])
    if i.op == "constant" and i.attrs.isdigit() and i.shapes and i.shapes[0][0] in ("s32", "s64", "u32", "u64")
  ]  # the loop bound of `i < N` (jax's scan and fori_loop count from 0 by 1)
  return consts[0] if len(consts) == 1 else None


def _group_size(attrs: str, default: int) -> int:
  """Devices in each group of a collective's replica_groups (all three printed forms)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)) if a in sizes)
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"source_target_pairs=", attrs)
  return 2 if m else default


def _dot_flops(instr: _Instr, shape_of) -> float:
  out = math.prod(instr.shapes[0][1]) if instr.shapes else 0
  if instr.op == "dot":
    lhs = shape_of.get(instr.operands[0]) if instr.operands else None
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    if not lhs or not dims:
      return 0.0
    return 2.0 * out * math.prod(lhs[1][int(d)] for d in dims.group(1).split(",") if d)
  return _convolution_flops(instr, shape_of)


def _window(attrs: str, key: str, n: int, default: int) -> list[tuple[int, ...]]:
  m = re.search(rf"\b{key}=([\d_x-]+)", attrs)
  if not m:
    return [(default, default)] * n
  return [tuple(int(v) for v in part.split("_")) for part in m.group(1).split("x")]


def _convolution_flops(instr: _Instr, shape_of) -> float:
  """2 x batch x output features x input features x the (output, window) position pairs that fall inside the
  input (a batched matmul compiles to a convolution whose window mostly covers padding: those pairs don't count)."""
  if len(instr.operands) < 2 or not instr.shapes:
    return 0.0
  lhs, rhs, out = shape_of.get(instr.operands[0]), shape_of.get(instr.operands[1]), instr.shapes[0]
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", instr.attrs)
  if not lhs or not rhs or not labels:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  flops = 2.0 * lhs[1][lhs_l.index("b")] * rhs[1][rhs_l.index("o")] * rhs[1][rhs_l.index("i")]
  spatial = sorted(c for c in lhs_l if c.isdigit())
  n = len(spatial)
  window = re.search(r"window=\{([^}]*)\}", instr.attrs)
  w = window.group(1) if window else ""
  pads = _window(w, "pad", n, 0)
  strides = [v[0] for v in _window(w, "stride", n, 1)]
  lhs_dilate = [v[0] for v in _window(w, "lhs_dilate", n, 1)]
  rhs_dilate = [v[0] for v in _window(w, "rhs_dilate", n, 1)]
  for d, c in enumerate(spatial):
    size_in, size_w, size_out = lhs[1][lhs_l.index(c)], rhs[1][rhs_l.index(c)], out[1][out_l.index(c)]
    extent = (size_in - 1) * lhs_dilate[d] + 1
    pairs = 0
    for k in range(size_w):
      if lhs_dilate[d] == 1:  # output positions o with 0 <= o * stride + k * rhs_dilate - pad_lo < size_in
        lo = -(-(pads[d][0] - k * rhs_dilate[d]) // strides[d])
        hi = (extent - 1 + pads[d][0] - k * rhs_dilate[d]) // strides[d]
        pairs += max(0, min(hi, size_out - 1) - max(lo, 0) + 1)
      else:
        for o in range(size_out):
          pos = o * strides[d] + k * rhs_dilate[d] - pads[d][0]
          pairs += 0 <= pos < extent and pos % lhs_dilate[d] == 0
    flops *= pairs
  return flops


def _fusion_bytes(instr: _Instr, fused: list[_Instr], shape_of) -> int:
  """HBM bytes of one fusion: its operands and result, except that an operand only dynamic-sliced inside counts
  the slices, and a result made by an in-place dynamic-update-slice counts the update (as XLA's cost model does)."""
  params = {int(i.attrs): i.name for i in fused if i.op == "parameter"}
  users: dict[str, list[_Instr]] = {}
  for i in fused:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = fused[-1] if fused else None
  in_place = None
  if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
    in_place = root.operands[0]
    update = next((i for i in fused if i.name == root.operands[1]), None)
    total = _nbytes(update.shapes) if update else 0
  else:
    total = _nbytes(instr.shapes, hbm_only=True)
  for idx, operand in enumerate(instr.operands):
    shape = shape_of.get(operand)
    if shape is None or shape[2] or params.get(idx) == in_place:  # unknown, in VMEM, or updated in place
      continue
    uses = users.get(params.get(idx), [])
    if uses and all(u.op == "dynamic-slice" for u in uses):
      total += sum(_nbytes(u.shapes) for u in uses)
    else:
      total += _nbytes([shape])
  return total


def hlo_stats(hlo_text: str, num_devices: int = 1, by_op_name: bool = False) -> dict:
  """Per-device counts of one execution of a compiled HLO module, each loop body weighted by its trip count.

  Returns:
    dot_flops: FLOPs of the dots and convolutions XLA compiled (not those inside custom calls: Pallas kernels);
    remat_dot_flops / forward_dot_flops / other_dot_flops: the part of dot_flops recomputed under jax.checkpoint
      (op_name ".../rematted_computation/..."), the part in the forward pass ("jvp(" without "transpose(") and the
      part outside differentiation (no "jvp(": the optimizer's, e.g. Newton-Schulz);
    custom_calls: {target or kernel name: executions}; custom_call_flops: FLOPs the kernels declare (cost_estimate);
    hbm_bytes: operand and result bytes of every top-level op (fusions as one op, VMEM-resident buffers excluded);
    collective_bytes: {kind: result bytes} and collective_traffic_bytes: {kind: bytes each device sends over ICI}
      (ring algorithms: all-gather and reduce-scatter (n-1)/n of the full buffer, all-reduce 2(n-1)/n, all-to-all
      (n-1)/n, collective-permute 1x, ragged-all-to-all (n-1)/n of its send buffer, an upper bound);
    loops: [(trip count, op_name)] of the while loops; unknown_trip_counts: loops counted once;
    by_op_name (if asked): {(measure, op_name): value} for measure "hbm", a collective kind, "dot" and "remat".
  """
  comps, entry = parse_hlo(hlo_text)
  shape_of = {}
  for instrs in comps.values():
    for i in instrs:
      if i.shapes:
        shape_of[i.name] = i.shapes[0] if len(i.shapes) == 1 else (i.shapes[0][0], (0,), False)
  # Multiplicity of each computation; `fused` ones are inside a fusion (their bytes are the fusion's).
  mult = dict.fromkeys(comps, 0.0)
  mult[entry] = 1.0
  fused, applied = set(), set()
  loops, unknown = [], 0
  for name in reversed(list(comps)):  # callees are printed before their callers
    for i in comps[name]:
      if i.op == "while":
        trips = _trip_count(i, comps)
        op_name = re.search(r'op_name="([^"]*)"', i.attrs)
        if mult[name]:
          loops.append((trips, op_name.group(1) if op_name else i.name))
        unknown += trips is None
        for callee in re.findall(r"(?:body|condition)=%([\w.\-]+)", i.attrs):
          mult[callee] = mult.get(callee, 0.0) + mult[name] * (trips or 1)
        continue
      for key, callee in re.findall(r"(calls|to_apply|true_computation|false_computation)=%([\w.\-]+)", i.attrs):
        mult[callee] = mult.get(callee, 0.0) + mult[name]
        if key == "to_apply" and i.op not in ("call", "call-start"):  # a reduction's scalar function
          applied.add(callee)
        elif i.op == "fusion" or name in fused:
          fused.add(callee)
      branches = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
      for callee in re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []:
        mult[callee] = mult.get(callee, 0.0) + mult[name]
  out = {
    "dot_flops": 0.0,
    "remat_dot_flops": 0.0,
    "forward_dot_flops": 0.0,
    "other_dot_flops": 0.0,
    "custom_calls": {},
    "custom_call_flops": 0.0,
    "hbm_bytes": 0.0,
    "collective_bytes": dict.fromkeys(COLLECTIVES, 0.0),
    "collective_traffic_bytes": dict.fromkeys(COLLECTIVES, 0.0),
    "loops": loops,
    "unknown_trip_counts": unknown,
  }
  where: dict = {}

  def add(measure: str, op_name: str, value: float) -> None:
    if by_op_name and value:
      where[measure, op_name] = where.get((measure, op_name), 0.0) + value

  for name, instrs in comps.items():
    m = mult.get(name, 0.0)
    if not m or name in applied:
      continue
    for i in instrs:
      op_name = re.search(r'op_name="([^"]*)"', i.attrs)
      op_name = op_name.group(1) if op_name else ""
      if i.op in ("dot", "convolution"):
        flops = m * _dot_flops(i, shape_of)
        out["dot_flops"] += flops
        out["remat_dot_flops"] += flops if "rematted_computation" in op_name else 0.0
        add("remat" if "rematted_computation" in op_name else "dot", op_name, flops)
        out["forward_dot_flops"] += flops if "jvp(" in op_name and "transpose(" not in op_name else 0.0
        out["other_dot_flops"] += flops if "jvp(" not in op_name else 0.0
      elif i.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
        kernel = re.search(r'"kernel_name":"([^"]*)"', i.attrs) or target
        key = kernel.group(1) if kernel else "?"
        out["custom_calls"][key] = out["custom_calls"].get(key, 0.0) + m
        declared = re.search(r'"cost_estimate":\{[^}]*"flops":"?(\d+)', i.attrs)
        out["custom_call_flops"] += m * int(declared.group(1)) if declared else 0.0
      kind = i.op.removesuffix("-start")
      if kind in COLLECTIVES:
        sizes = [_nbytes([s]) for s in i.shapes]
        # A tuple result holds one buffer per operand (summed); an all-gather-start's is (operands, results).
        if kind in ("all-reduce", "all-to-all") or (kind == "all-gather" and not i.op.endswith("-start")):
          size = sum(sizes)
        elif kind == "all-gather":
          size = sum(sizes[len(sizes) // 2 :]) if len(sizes) > 1 else sum(sizes)
        else:
          size = sizes[0] if sizes else 0
        if kind == "reduce-scatter":  # the full buffer is the operand
          operand = shape_of.get(i.operands[0]) if i.operands else None
          size = _nbytes([operand]) if operand else size * _group_size(i.attrs, num_devices)
        if kind == "collective-permute" and i.op.endswith("-start"):
          size = sizes[1] if len(sizes) > 1 else size
        if kind == "ragged-all-to-all":  # at most the send buffer goes out (the receive buffer has spare capacity)
          operand = shape_of.get(i.operands[0]) if i.operands else None
          size = _nbytes([operand]) if operand else size
        n = max(_group_size(i.attrs, num_devices), 1)
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(kind, (n - 1) / n)
        out["collective_bytes"][kind] += m * size
        out["collective_traffic_bytes"][kind] += m * size * factor
        add(kind, op_name, m * size * factor)
      if name in fused or i.op in _NO_TRAFFIC:
        continue
      if kind == "ragged-all-to-all":  # reads what it sends, writes as much
        nbytes = 2 * _nbytes([shape_of[i.operands[0]]]) if i.operands and i.operands[0] in shape_of else 0
      elif i.op == "fusion":
        callee = re.search(r"calls=%([\w.\-]+)", i.attrs)
        nbytes = _fusion_bytes(i, comps.get(callee.group(1) if callee else "", []), shape_of)
      elif i.op.endswith("-start") or i.op == "async-start":
        nbytes = max((_nbytes([s], hbm_only=True) for s in i.shapes), default=0)
      else:
        operands = [shape_of[o] for o in i.operands if o in shape_of]
        nbytes = _nbytes(i.shapes, hbm_only=True) + _nbytes(operands, hbm_only=True)
      out["hbm_bytes"] += m * nbytes
      add("hbm", op_name, m * nbytes)
  if by_op_name:
    out["by_op_name"] = where
  return out
