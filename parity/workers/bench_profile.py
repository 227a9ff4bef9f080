"""One extra call of ``parity bench`` under its backend's own profiler -> a per-op breakdown.

* PyTorch: ``torch.profiler.profile(activities=[CPU] (+ CUDA on cuda), record_shapes=True)``;
  each op's SELF CPU time (its time minus its children's), so a nested op is never counted
  twice (``aten::conv2d`` -> ``aten::convolution`` -> ``aten::mkldnn_convolution``: only the
  innermost does the work) and the rows add up to the profiled total.  Rows are one op name
  and input shapes, like ``key_averages(group_by_input_shape=True)``, but read from the
  event tree (``events()``), which also tells whether an op ran inside ``Optimizer.step``.
  On CUDA each row also has ``device_ms`` (self device time); the families use CPU time.
* Jittor: ``jt.profile_scope(profiler_record_shape=1)``; one row per jit kernel (a fused kernel
  is one row); the kernel time Jittor records (Python and graph building are not in it).

Both write the same layout (the ``profile`` command of parity/workers/bench.py)::

    {"backend", "mode", "profiler", "seconds_profiled", "total_ms", "raw_rows",
     "top_ops":   [{"op", "key", "family", "file", "count", "total_ms", "avg_ms", "shapes", "percent"}],
     "by_op":     [{"op", "family", "kernels", "count", "total_ms", "percent"}],
     "by_family": [{"family", "ops", "count", "total_ms", "percent", "top_ops"}]}   # every row

``kernels``: Jittor jit kernels of that op / torch (op, input shapes) pairs.  Families and
their rules: parity/workers/op_families.py.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional

from parity.workers.op_families import by_family, jittor_family, jittor_ops, torch_family


def summarize_op(key: str) -> str:
    """Jittor jit key -> short name: ``mkl_conv«Tx:f32...`` -> ``mkl_conv``; a fused op
    ``«opkey0:broadcast_to«...«opkey2:binary«...«OP:multiply«opkey3:reduce«...«OP:add`` ->
    ``broadcast_to+broadcast_to+binary(multiply)+reduce(add)``."""
    names = jittor_ops(key)
    if not names:
        return key[:80]
    if len(names) > 6:
        c = Counter(names)
        return "fused[" + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in c.most_common(6)) + ", ...]"
    return "+".join(names)


def _shapes(fname: str) -> str:
    i = fname.find("shapes:")
    return " ".join(fname[i + 7:].split())[:160] if i >= 0 else ""


def _ms(d: Dict[str, str], col: str) -> float:
    return float(d.get(col, 0) or 0) / 1e6          # Jittor reports nanoseconds


def jittor_rows(rep: List[List[str]], optimizer_ns: Optional[Dict[str, List[float]]] = None) -> List[Dict[str, Any]]:
    """Jittor's profiler report (header + rows of strings) -> one row per kernel, slowest first.
    Relayed ops (0 ms: the library kernel they relay to has the time) are left out.
    ``optimizer_ns``: key -> [ns, count] spent inside ``optimizer.step``; that share becomes a
    row of its own in family "optimiser"."""
    if not rep:
        return []
    head, out = rep[0], []
    for r in rep[1:]:
        d = dict(zip(head, r))
        name = d.get("Name", "")
        try:
            total_ms, count = _ms(d, "TotalTime"), int(float(d.get("Count", 0) or 0))
        except ValueError:
            continue
        if "relay" in name and total_ms == 0.0:
            continue
        row = {"op": summarize_op(name), "key": name[:400], "family": jittor_family(name),
               "file": d.get("FileName", "").split("\n")[0], "count": count, "total_ms": total_ms,
               "shapes": _shapes(d.get("FileName", ""))}
        opt_ns, opt_count = (optimizer_ns or {}).get(name, (0.0, 0))
        if opt_ns > 0:
            out.append(dict(row, family="optimiser", count=int(opt_count), total_ms=min(total_ms, opt_ns / 1e6)))
            row.update(count=max(count - int(opt_count), 0), total_ms=max(total_ms - opt_ns / 1e6, 0.0))
        if row["total_ms"] > 0 or row["count"] > 0:
            out.append(row)
    return _finish_rows(out)


def _finish_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows.sort(key=lambda x: -x["total_ms"])
    total = sum(x["total_ms"] for x in rows) or 1.0
    for x in rows:
        x["avg_ms"] = x["total_ms"] / x["count"] if x["count"] else 0.0
        x["percent"] = 100.0 * x["total_ms"] / total
    return rows


def group_ops(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Profile rows (every row, not only the top) summed by short op name and family, slowest first."""
    acc: Dict[Any, Dict[str, Any]] = {}
    for r in rows:
        g = acc.setdefault((r["op"], r["family"]), {"op": r["op"], "family": r["family"], "kernels": 0,
                                                    "count": 0, "total_ms": 0.0})
        g["kernels"] += 1
        g["count"] += r["count"]
        g["total_ms"] += r["total_ms"]
    out = sorted(acc.values(), key=lambda g: -g["total_ms"])
    total = sum(g["total_ms"] for g in out) or 1.0
    for g in out:
        g["percent"] = 100.0 * g["total_ms"] / total
    return out


def torch_rows(events, with_device: bool = False) -> List[Dict[str, Any]]:
    """torch.profiler events -> one row per (op name, input shapes, optimiser or not), by self
    CPU time (``device_ms`` too with ``with_device``), slowest first."""
    in_opt: Dict[int, bool] = {}

    def under_optimizer(e) -> bool:
        chain, p, found = [], e, False
        while p is not None and id(p) not in in_opt:
            if p.name.startswith("Optimizer.step"):
                found = True
                break
            chain.append(p)
            p = p.cpu_parent
        found = found or (p is not None and in_opt[id(p)])
        for c in chain:
            in_opt[id(c)] = found
        return found

    acc: Dict[Any, Dict[str, Any]] = {}
    for e in events:
        shapes = str(getattr(e, "input_shapes", "") or "")[:160]
        fam = torch_family(e.name, under_optimizer(e))
        row = acc.setdefault((e.name, shapes, fam), {"op": e.name, "key": f"{e.name} {shapes}"[:400], "family": fam,
                                                     "file": "", "count": 0, "total_ms": 0.0, "shapes": shapes})
        row["count"] += 1
        row["total_ms"] += e.self_cpu_time_total / 1000.0          # microseconds
        if with_device:
            dev = getattr(e, "self_device_time_total", None)
            dev = getattr(e, "self_cuda_time_total", 0.0) if dev is None else dev
            row["device_ms"] = row.get("device_ms", 0.0) + dev / 1000.0
    return _finish_rows(list(acc.values()))


def profile_doc(backend: str, mode: str, profiler: str, rows: List[Dict[str, Any]], seconds: float,
                top: int, raw_rows: int) -> Dict[str, Any]:
    """The profile file's content: the layout in this module's docstring."""
    return {"backend": backend, "mode": mode, "profiler": profiler, "seconds_profiled": seconds,
            "total_ms": sum(r["total_ms"] for r in rows), "raw_rows": raw_rows,
            "top_ops": rows[:top], "by_op": group_ops(rows)[:top], "by_family": by_family(rows)}


def profile_jittor(adapter, call: Callable[[], Any], mode: str, top: int) -> Dict[str, Any]:
    from backends.jittor_impl.framework import jt  # lazy: the Jittor side only

    opt = getattr(adapter, "optimizer", None) if mode == "train" else None
    snaps: List[List[List[str]]] = []
    if opt is not None:
        inner = opt.step

        def step(*a, **k):         # the profiler's totals before and after: the difference ran in the step
            snaps.append(jt.profiler.report())
            try:
                return inner(*a, **k)          # the project's AdamW.step syncs its updates at its end
            finally:
                snaps.append(jt.profiler.report())
        opt.step = step
    try:
        adapter.sync()
        t0 = time.perf_counter()
        with jt.profile_scope(profiler_record_shape=1) as rep:
            call()
            adapter.sync()
        seconds = time.perf_counter() - t0
    finally:
        if opt is not None:
            del opt.step                       # the instance attribute: back to the class's method
    rows = jittor_rows(rep, _window(*snaps) if len(snaps) == 2 else None)
    return profile_doc("jittor", mode, "jt.profile_scope(profiler_record_shape=1)", rows, seconds, top,
                       len(rep) - 1 if rep else 0)


def _window(before: List[List[str]], after: List[List[str]]) -> Dict[str, List[float]]:
    """Two Jittor profiler reports -> key -> [ns, count] recorded between them."""
    def table(rep):
        h = rep[0] if rep else []
        return {d["Name"]: (float(d["TotalTime"]), float(d["Count"])) for d in (dict(zip(h, r)) for r in rep[1:])}
    a, b = table(before), table(after)
    return {k: [t - a.get(k, (0.0, 0.0))[0], n - a.get(k, (0.0, 0.0))[1]] for k, (t, n) in b.items()
            if t > a.get(k, (0.0, 0.0))[0]}


def profile_torch(adapter, call: Callable[[], Any], mode: str, device: str, top: int) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile  # lazy: the PyTorch side only

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    adapter.sync()
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        call()
        adapter.sync()
    seconds = time.perf_counter() - t0
    events = prof.events()
    rows = torch_rows(events, with_device=device == "cuda")
    name = f"torch.profiler.profile({'+'.join(a.name for a in acts)}, record_shapes=True), self time"
    return profile_doc("torch", mode, name, rows, seconds, top, len(events))
