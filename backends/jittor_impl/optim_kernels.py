"""CPU kernels of the optimiser step: the AdamW update and the gradient norms, many
parameters per op, OpenMP.

Written with Jittor ops, AdamW is one fused elementwise kernel per parameter (and its
graph: ~15 ops per parameter built in Python every step).  Jittor runs those kernels on
one core: a smoke training step (416 parameters, ~12 M values) spent 43 ms in 416 such
kernels (``parity bench --profile``), all on one core whatever ``--threads`` says.
Here one ``jt.code`` op updates up to ``CHUNK`` parameters, each parameter's loop shared
by the OpenMP threads (every value written by one thread: any thread count, same bits).

The arithmetic is torch's single-tensor AdamW on CPU (torch 2.13, float32 and float64),
operation for operation, as found by matching candidate formulas against torch.optim.AdamW
on 100k random values (on the recorded case of the tests: m and v bit-equal, parameters
98.6-100 %; the Jittor-ops path, which g++ contracts its own way: m 100 %, v 93 %,
parameters 93-99.8 %):
    p = p * (1 - lr wd)                            param.mul_
    m = fma(g - m, 1 - b1, m)                      exp_avg.lerp_ (a vectorised fmadd)
    v = fma((1 - b2) g, g, v b2)                   exp_avg_sq.mul_(b2).addcmul_
    p = p + (-step m) / (sqrt(v) / sqrt(1 - b2^t) + eps)      addcdiv_, step = lr / (1 - b1^t)
with the scalars rounded to the dtype (float32: the Python float to float32; float64:
exact).  Built with -ffp-contract=off: the only fused multiply-adds are the two written.

The gradient norms of ``optim.clip_grad_norm`` (``grad_norms``): per gradient, the sum of
squares in double in index order (one thread per gradient) and its square root, as the
ops path's ``sqrt((g.float64() ** 2).sum())``: 416 reduce kernels of a smoke step become 7 ops.

``RTDETR_JITTOR_OPTIM=ops`` selects the Jittor-ops path for both (the reference the kernels
are tested against, tests/test_jittor_optim_kernels.py); CUDA always uses it.
Shapes: each parameter, its gradient and moments share one shape; scalars [n, 7] float64.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

import jittor as jt          # prepared by framework: the package imports it first

OPTIM_IMPL = os.environ.get("RTDETR_JITTOR_OPTIM", "kernel")
if OPTIM_IMPL not in ("kernel", "ops"):
    raise ValueError(f"RTDETR_JITTOR_OPTIM must be 'kernel' or 'ops', got {OPTIM_IMPL!r}")

CHUNK = 64                   # parameters per op: one compiled kernel per chunk length and dtype
_FLAGS = {"FLAGS: -ffp-contract=off ": 1}
_HEADER = "#include <cmath>\n"

# One parameter k of the chunk: inputs p, g, m, v at in{1+4k}.. in{4+4k}, outputs p, m, v
# at out{3k}.. out{3k+2}; its 7 scalars in row k of in0.
_ONE = r"""
    {
        const double* s = in0_p + @K * 7;
        const T s_b1 = (T)s[0], s_b2 = (T)s[1], s_1b2 = (T)s[2], s_bc2 = (T)s[3],
                s_eps = (T)s[4], s_decay = (T)s[5], s_step = (T)s[6];
        const T* p = in@P_p; const T* g = in@G_p; const T* m = in@M_p; const T* v = in@V_p;
        T* po = out@PO_p; T* mo = out@MO_p; T* vo = out@VO_p;
        const long n = in@P->num;
        #pragma omp for schedule(static)
        for (long i = 0; i < n; i++) {
            const T mi = std::fma(g[i] - m[i], s_b1, m[i]);
            const T vi = std::fma(s_1b2 * g[i], g[i], v[i] * s_b2);
            const T denom = std::sqrt(vi) / s_bc2 + s_eps;
            po[i] = p[i] * s_decay + (-s_step * mi) / denom;
            mo[i] = mi;
            vo[i] = vi;
        }
    }
"""


def _source(n: int) -> str:
    """The kernel for a chunk of n parameters (the first line names the profiler family,
    parity/workers/op_families.py)."""
    body = "".join(_ONE.replace("@K", str(k)).replace("@PO", str(3 * k)).replace("@MO", str(3 * k + 1))
                   .replace("@VO", str(3 * k + 2)).replace("@P", str(1 + 4 * k)).replace("@G", str(2 + 4 * k))
                   .replace("@M", str(3 + 4 * k)).replace("@V", str(4 + 4 * k)) for k in range(n))
    return "// op family: optimiser\ntypedef in1_type T;\n#pragma omp parallel\n{\n" + body + "}\n"


# in0 .. in{n-1}: gradients (1-D, dtype T) -> out0 [n] float64: the L2 norm of each
_NORMS = r"""
// op family: optimiser
typedef in0_type T;
const T* ptr[] = {@PTRS};
const long len[] = {@LENS};
#pragma omp parallel for schedule(dynamic)
for (int k = 0; k < @N; k++) {
    double s = 0;
    for (long i = 0; i < len[k]; i++) s += (double)ptr[k][i] * (double)ptr[k][i];
    out0_p[k] = std::sqrt(s);
}
"""


def use_kernel() -> bool:
    """The CPU kernels are in use (looked up at call time, so tests may flip ``OPTIM_IMPL``)."""
    return OPTIM_IMPL == "kernel" and not jt.flags.use_cuda


def adamw_update(items: Sequence[Tuple[jt.Var, jt.Var, jt.Var, jt.Var, Sequence[float]]]
                 ) -> List[Tuple[jt.Var, jt.Var, jt.Var]]:
    """items: (param, grad, exp_avg, exp_avg_sq, scalars) with scalars = (1 - b1, b2, 1 - b2,
    sqrt(1 - b2^t), eps, 1 - lr wd, lr / (1 - b1^t)) -> [(param, exp_avg, exp_avg_sq)] new
    values (lazy), in order.  All parameters share one dtype."""
    out: List[Tuple[jt.Var, jt.Var, jt.Var]] = []
    if len({str(it[0].dtype) for it in items}) > 1:
        raise ValueError("adamw_update: parameters of one model share one dtype")
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        dtype = chunk[0][0].dtype
        scalars = jt.array(np.asarray([it[4] for it in chunk], dtype=np.float64), dtype="float64").stop_grad()
        # 1-D views: the compiled kernel depends on the inputs' ranks, so flat inputs need
        # one kernel per chunk length instead of one per combination of parameter ranks
        ins, shapes = [scalars], []
        for p, g, m, v, _ in chunk:
            ins += [x.reshape(-1) for x in (p.detach(), g.detach().cast(dtype), m, v)]
            shapes += [(p.numel(),)] * 3
        res = jt.code(shapes, [dtype] * len(shapes), ins, cpu_header=_HEADER, cpu_src=_source(len(chunk)))
        res[0].compile_options = _FLAGS
        out += [tuple(x.reshape(p.shape) for x in res[3 * k:3 * k + 3]) for k, (p, *_) in enumerate(chunk)]
    return out


def grad_norms(grads: Sequence[jt.Var]) -> np.ndarray:
    """grads (one dtype) -> float64 [n]: the L2 norm of each, summed in double (synced)."""
    outs = []
    for start in range(0, len(grads), CHUNK):
        chunk = [g.detach().reshape(-1) for g in grads[start:start + CHUNK]]
        n = len(chunk)
        src = (_NORMS.replace("@PTRS", ", ".join(f"in{k}_p" for k in range(n)))
               .replace("@LENS", ", ".join(f"in{k}->num" for k in range(n))).replace("@N", str(n)))
        out = jt.code((n,), jt.float64, chunk, cpu_header=_HEADER, cpu_src=src)
        out.compile_options = _FLAGS
        outs.append(out)
    jt.sync(outs)
    return np.concatenate([o.numpy() for o in outs]) if outs else np.zeros(0)
