"""Op families: one vocabulary for where PyTorch and Jittor spend a step (``parity bench --profile``).

Each side's profiler names its work differently: torch.profiler records ATen ops
(``aten::mkldnn_convolution``, ``aten::addmm``), Jittor's ``jt.profile_scope()`` records jit
kernels (``mkl_conv«...``, or a fused kernel ``«opkey0:broadcast_to«...«opkey1:binary«...``).
Both are mapped here to the same FAMILIES, so the bench report can put them side by side.

PyTorch: by ATen op name (tables below).  Views (``aten::view``, ``aten::transpose``) cost
no data movement but their dispatch time is real, so they count under "copies/layout".
Autograd bookkeeping (``autograd::engine::evaluate_function: ...``, ``...Backward0`` nodes,
``AccumulateGrad``), allocation (``aten::empty``) and scalar reads are "framework": Jittor's
profiler has no such rows (it times kernels only; graph building and Python are outside it).

Jittor: a kernel that is one named op (``mkl_conv``, ``mkl_matmul``, ``getitem``, ``code``)
maps by that name.  A fused kernel (Jittor fuses chains of elementwise ops, broadcasts and at
most one reduction into one loop) is classified by its DOMINANT op, in this order:

1. a ``reindex_reduce`` (scatter) -> copies/layout
2. a ``reduce`` shapes the loop:  with ``unary(exp)`` -> softmax (the exp-sum of softmax);
   with ``reindex`` and ``binary(multiply)`` -> convolution (Jittor's own conv: gather the
   windows, multiply by the broadcast weights, sum); only ``binary(multiply)`` +
   ``reduce(add)`` over >= 2 broadcast operands -> matmul (a matmul without a GEMM
   library); anything else -> reductions
3. a ``reindex`` without a reduction (gather: nearest upsampling, row gathers) -> copies/layout
4. ``binary(subtract)`` then ``unary(exp)`` (``exp(x - max)``) -> softmax (its normalising
   kernel and that kernel's recomputation in the backward)
5. any arithmetic, comparison or ``ternary`` (where) -> elementwise
6. nothing but broadcasts, constants (``array``) and casts -> copies/layout (fills, conversions)

Limits of the Jittor rule (measured on smoke; see the bench report's family table): a fused
kernel holding work of two families counts whole under its dominant op (e.g. an activation
fused into a reduction counts as a reduction); Jittor has no normalisation or attention op:
this project's own ``jt.code`` kernels name their family on their first line (``// op family:
normalisation`` for the train-mode BatchNorm statistics and backward, ``softmax`` for the
attention softmax); the BatchNorm affine step, eval-mode BatchNorm and LayerNorm stay
elementwise + reduction kernels, and attention is matmul + softmax kernels, so the Jittor
attention row stays empty; a softmax written in ops has its max pass (``reduce(maximum)``)
counted as a reduction; sigmoid (``exp(-x)``) is elementwise.  The convolutions this backend
runs as one GEMM (backends/jittor_impl/conv.py: 1x1, the stem, small maps) are ``mkl_matmul``
kernels and count as matmul, where torch's count as convolution: compare the two families' sum.
A fused op that Jittor relays to a library kernel (the op behind an ``mkl_conv``, key
``...choices:relay0:1``) reports 0 ms (the library kernel has the time) and is left out.

Optimiser: by scope, not by name (the AdamW update is plain elementwise arithmetic on both
sides): torch ops under the ``Optimizer.step#...`` range torch records itself, and Jittor
kernel time spent inside ``optimizer.step`` (the worker diffs the profiler's totals around
that call, which syncs at its end).  Gradient clipping is not in it (its norms are
reductions).

Standard library only: the worker of either backend and the tests import it.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

FAMILIES = ("convolution", "matmul", "attention", "deformable sampling", "softmax", "normalisation",
            "elementwise", "reductions", "copies/layout", "optimiser", "framework", "other")

# ----------------------------------------------------------------------------------------
# PyTorch: ATen op names (without ``aten::``)
# ----------------------------------------------------------------------------------------

_T_NAMES = {
    "matmul": "addmm mm bmm baddbmm addbmm matmul linear addmv mv dot vdot einsum _addmm_activation "
              "mkldnn_linear _mkldnn_matmul",
    "softmax": "softmax _softmax _softmax_backward_data log_softmax _log_softmax _log_softmax_backward_data",
    "reductions": "sum mean max min amax amin argmax argmin norm linalg_vector_norm _foreach_norm prod all any "
                  "cumsum cumprod topk sort argsort var std var_mean std_mean logsumexp count_nonzero "
                  "max_pool2d max_pool2d_with_indices max_pool2d_with_indices_backward avg_pool2d "
                  "avg_pool2d_backward adaptive_avg_pool2d _adaptive_avg_pool2d _adaptive_avg_pool2d_backward "
                  "_cdist_forward _cdist_backward cdist aminmax l1_loss",
    "copies/layout": "copy_ _to_copy to contiguous clone cat _cat stack index index_put_ _index_put_impl_ "
                     "index_select index_add_ gather scatter scatter_ scatter_add scatter_add_ masked_select "
                     "masked_scatter_ nonzero repeat repeat_interleave tile flip roll constant_pad_nd pad "
                     "upsample_nearest2d upsample_nearest2d_backward upsample_bilinear2d "
                     "upsample_bilinear2d_backward embedding embedding_backward one_hot fill_ zero_ zeros "
                     "zeros_like ones ones_like full full_like new_zeros new_ones new_full arange linspace "
                     "meshgrid view view_as reshape _reshape_alias as_strided as_strided_ transpose permute t "
                     "expand expand_as unsqueeze squeeze flatten unflatten slice select narrow split "
                     "split_with_sizes chunk unbind unfold diagonal movedim select_backward slice_backward "
                     "_unsafe_view alias resize_as_ lift_fresh_copy _unsafe_index numpy_T diag diagonal_copy "
                     "diagonal_backward embedding_dense_backward gather_backward broadcast_tensors squeeze_ "
                     "unsqueeze_ scalar_tensor",
    "framework": "empty empty_strided empty_like new_empty new_empty_strided resize_ detach detach_ lift_fresh "
                 "item _local_scalar_dense is_nonzero result_type _has_compatible_shallow_copy_type set_ "
                 "_nnpack_available resolve_conj resolve_neg _shape_as_tensor size stride is_same_size",
    "elementwise": "add add_ sub sub_ rsub mul mul_ div div_ true_divide floor_divide neg neg_ exp exp_ exp2 "
                   "expm1 log log_ log1p log2 sigmoid sigmoid_ sigmoid_backward logit relu relu_ "
                   "threshold_backward silu silu_ silu_backward gelu gelu_ gelu_backward tanh tanh_ "
                   "tanh_backward hardtanh hardtanh_ hardtanh_backward leaky_relu leaky_relu_ elu softplus "
                   "mish hardswish hardsigmoid clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ where "
                   "masked_fill masked_fill_ eq ne lt gt le ge abs abs_ pow pow_ square sqrt sqrt_ rsqrt "
                   "reciprocal sign sgn floor ceil round trunc frac maximum minimum lerp lerp_ addcmul addcmul_ "
                   "addcdiv addcdiv_ log_sigmoid_forward log_sigmoid_backward binary_cross_entropy_with_logits "
                   "binary_cross_entropy_with_logits_backward logical_and logical_or logical_not bitwise_and "
                   "bitwise_or bitwise_not erf erfinv atan2 sin cos xlogy remainder fmod isnan isinf "
                   "isfinite nan_to_num tril triu bernoulli_ uniform_ normal_ dropout native_dropout clip clip_ "
                   "log_sigmoid logical_and_ logical_or_ __and__ __or__ __xor__ __invert__",
}
_T_EXACT: Dict[str, str] = {n: fam for fam, names in _T_NAMES.items() for n in names.split()}

_AUTOGRAD_NODE = re.compile(r"^[\w:]*Backward\d*(_copy)?$")    # MulBackward0, DiagonalBackward0_copy


def torch_family(name: str, in_optimizer: bool = False) -> str:
    """Family of one torch.profiler event name; ``in_optimizer``: it ran under ``Optimizer.step``."""
    if in_optimizer or name.startswith("Optimizer.step"):
        return "optimiser"
    if ("#" in name or name.startswith(("autograd::", "torch::autograd::", "Optimizer."))
            or _AUTOGRAD_NODE.match(name)):
        return "framework"      # record_function ranges, autograd engine and graph nodes
    base = name[6:] if name.startswith("aten::") else name
    if "conv" in base:          # mkldnn_convolution, _slow_conv2d_forward, convolution_backward, ...
        return "convolution"
    if base.startswith("grid_sampler") or base.startswith("cudnn_grid_sampler"):
        return "deformable sampling"
    if "scaled_dot_product" in base or base.endswith(("_flash_attention", "_efficient_attention")):
        return "attention"
    if any(k in base for k in ("batch_norm", "layer_norm", "group_norm", "instance_norm")):
        return "normalisation"
    if base in _T_EXACT:
        return _T_EXACT[base]
    if base.startswith("_foreach_"):
        return "elementwise"    # _foreach_mul_, _foreach_add_ (_foreach_norm is in the table)
    return "other"


# ----------------------------------------------------------------------------------------
# Jittor: jit keys
# ----------------------------------------------------------------------------------------

_J_SINGLE = {
    "getitem": "copies/layout", "setitem": "copies/layout", "transpose": "copies/layout",
    "fuse_transpose": "copies/layout", "cutt_transpose": "copies/layout", "reindex": "copies/layout",
    "reindex_reduce": "copies/layout", "array": "copies/layout", "broadcast_to": "copies/layout",
    "copy": "copies/layout", "concat": "copies/layout", "index": "copies/layout", "where": "copies/layout",
    "clone": "copies/layout", "reshape": "copies/layout",
    "argsort": "reductions", "cub_argsort": "reductions", "topk": "reductions", "reduce": "reductions",
    "arg_reduce": "reductions", "cub_arg_reduce": "reductions",
    "binary": "elementwise", "unary": "elementwise", "ternary": "elementwise", "random": "elementwise",
}
_DATA_ONLY = {"broadcast_to", "array", "reshape", "unary(cast)"}
_MSDA_MARK = "MsdaSample"          # the fused deformable-attention kernels (backends/jittor_impl/deformable_attention.py)
_POOL_MARK = "k3_ = min(k3 +"      # the window loop of jittor/pool.py's code kernels (max / avg pooling)
_FAMILY_MARK = "// op family: "    # first line of this project's own jt.code kernels (batchnorm, softmax, optimiser)


def strip_marks(key: str) -> str:
    """A profiler key without the ``[marks:...]`` prefix Jittor adds for ``jt.profile_mark``."""
    return key[key.index("]") + 1:] if key.startswith("[") and "]" in key else key


def jittor_ops(key: str) -> List[str]:
    """The ops of a jit key, in order: ``mkl_conv«Tx:..`` -> ``["mkl_conv"]``; a fused key
    ``«opkey0:broadcast_to«..«opkey1:binary«..«OP:multiply«opkey2:reduce«..«OP:add`` ->
    ``["broadcast_to", "binary(multiply)", "reduce(add)"]``."""
    toks = [t for t in strip_marks(key).split("«") if t]
    if not toks:
        return []
    if not toks[0].startswith("opkey"):
        return [toks[0]]
    names: List[str] = []
    for t in toks:
        if t.startswith("opkey") and ":" in t:
            names.append(t.split(":", 1)[1])
        elif t.startswith("OP:") and names and "(" not in names[-1]:
            names[-1] += f"({t[3:]})"
    return names


def _base(op: str) -> str:
    return op.split("(", 1)[0]


def jittor_family(key: str) -> str:
    """Family of one Jittor profiler key (rules in the module docstring)."""
    ops = jittor_ops(key)
    if not ops:
        return "other"
    if not strip_marks(key).startswith("«opkey"):
        head = ops[0]
        if "conv" in head:                  # mkl_conv, mkl_conv_backward_x / _w, cudnn_conv...
            return "convolution"
        if "matmul" in head:                # mkl_matmul, cublas_matmul, cublas_batched_matmul
            return "matmul"
        if head == "code":
            if _MSDA_MARK in key:
                return "deformable sampling"
            if _FAMILY_MARK in key:
                family = key.split(_FAMILY_MARK, 1)[1].split("\n", 1)[0].strip()
                return family if family in FAMILIES else "other"
            return "reductions" if _POOL_MARK in key else "other"
        return _J_SINGLE.get(head, "other")
    return _fused_family(ops)


def _fused_family(ops: List[str]) -> str:
    bases = [_base(o) for o in ops]
    compute = [o for o in ops if o not in _DATA_ONLY]
    if "reindex_reduce" in bases:
        return "copies/layout"
    if "reduce" in bases:
        if "unary(exp)" in ops:
            return "softmax"
        if "reindex" in bases and "binary(multiply)" in ops:
            return "convolution"
        if set(compute) <= {"binary(multiply)", "reduce(add)"} and bases.count("broadcast_to") >= 2:
            return "matmul"
        return "reductions"
    if "reindex" in bases:
        return "copies/layout"
    if "unary(exp)" in ops and "binary(subtract)" in ops[:ops.index("unary(exp)")]:
        return "softmax"
    return "elementwise" if compute else "copies/layout"


# ----------------------------------------------------------------------------------------
# summing rows into families
# ----------------------------------------------------------------------------------------

def by_family(rows: List[Dict], top: int = 3) -> List[Dict]:
    """Profile rows (each with ``family``, ``op``, ``count``, ``total_ms``) summed per family,
    slowest first: ``{"family", "ops", "count", "total_ms", "percent", "top_ops"}`` (``top_ops``:
    the ``top`` ops of the family by time, so an unexpected entry in "other" has a name)."""
    acc: Dict[str, Dict] = {}
    per_op: Dict[Tuple[str, str], float] = {}
    for r in rows:
        f = acc.setdefault(r["family"], {"family": r["family"], "ops": 0, "count": 0, "total_ms": 0.0})
        f["count"] += int(r.get("count", 0))
        f["total_ms"] += float(r["total_ms"])
        per_op[(r["family"], r["op"])] = per_op.get((r["family"], r["op"]), 0.0) + float(r["total_ms"])
    total = sum(f["total_ms"] for f in acc.values()) or 1.0
    for f in acc.values():
        ops = sorted(((ms, op) for (fam, op), ms in per_op.items() if fam == f["family"]), reverse=True)
        f["ops"] = len(ops)
        f["top_ops"] = [op for _, op in ops[:top]]
        f["percent"] = 100.0 * f["total_ms"] / total
    return sorted(acc.values(), key=lambda f: -f["total_ms"])
