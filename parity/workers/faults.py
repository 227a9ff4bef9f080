"""Deliberate faults, to prove the harness catches and localises real bugs (tests only).

A fault is applied inside one worker (the runner passes ``--inject-fault`` to one side
only); the backends know nothing about it.  Spec forms:

``weight:NAME:OP=VALUE``  perturb the loaded weights dict before ``load_weights``. ``NAME``
                          is a parameter name or an fnmatch pattern (``*``), OP one of
                          ``scale`` (w *= v), ``add`` (w += v), ``noise`` (w *= 1 + v*N(0,1),
                          seeded elementwise noise: not undone by a following train-mode BN,
                          unlike ``scale``).
``upsample:bilinear``     the encoder's FPN upsampling uses bilinear instead of nearest
                          (monkey-patched into the backend module at run time).
``config:KEY=VALUE``      change one config value on this side (``decoder.num_queries=200``):
                          simulates two sides that do not build the same model.
``bn-momentum:V``         every trainable BatchNorm2d of this side updates its running statistics
                          with momentum V instead of 0.1 (patched into the backend's BatchNorm2d
                          class before the model is built).  Train-mode forward uses batch
                          statistics, so losses and gradients stay identical: only the buffers
                          and the eval-mode outputs can show it (the train stage's buffer check).
``code:backward-detach``  the encoder's FPN upsampled map is detached (stop_grad) on this side:
                          the forward pass, losses and decisions are unchanged, only the
                          gradients upstream of that branch (AIFI, lateral conv, backbone) move
                          -- the grad stage's ``grads`` group must name it.
``optim:lr-scale=V``      every AdamW step of this side uses V x each group's learning rate
                          (the exported lr stays as scheduled): forward, losses and gradients
                          agree, only the ``step`` group (the update) can show it.
``dist:RULE``              a data-parallel rule broken on this side (``--nproc`` > 1, Jittor):
                          ``grad-sum`` (gradients summed over ranks, not averaged),
                          ``num-boxes-local`` (each rank divides by its own box count),
                          ``bn-local`` (BatchNorm on each rank's own statistics), ``same-shard``
                          (every rank reads rank 0's images); parity/workers/dist_faults.py.
``crash:KIND``            ``raise`` (Python exception in the task), ``abort`` (SIGABRT, no
                          error file), ``exit`` (``os._exit(7)``, no error file).

Code-level bugs planted as source patches (porting mistakes, not perturbations) are
``parity selftest``'s business (parity/selftest_bugs.yaml).
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from parity.case.faults import Fault, FaultError, check_faults_against_spec, parse_faults
from parity.workers.common import EXIT_INPUT, WorkerFailure
from parity.workers.dist_faults import install_dist_fault


def apply_weight_faults(weights: "Mapping[str, np.ndarray]", faults: Sequence[Fault]) -> List[str]:
    """Perturb ``weights`` in place (floating entries only); return what was changed."""
    done = []
    names = list(weights)
    check_faults_against_spec(faults, names)
    for f in faults:
        if f.kind != "weight":
            continue
        for n in fnmatch.filter(names, f.target):
            w = weights[n]
            if w.dtype.kind != "f":
                continue
            if f.op == "scale":
                new = w * f.value
            elif f.op == "add":
                new = w + f.value
            else:
                rng = np.random.default_rng(0)
                new = w * (1.0 + f.value * rng.standard_normal(w.shape))
            weights[n] = np.asarray(new, dtype=w.dtype)
            done.append(f"{n}: {f.op}={f.value:g}")
    return done


def apply_config_faults(cfg_dict: Dict[str, Any], faults: Sequence[Fault]) -> List[str]:
    done = []
    for f in faults:
        if f.kind != "config":
            continue
        node = cfg_dict
        parts = f.target.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise FaultError(f"fault '{f.spec}': no config key '{f.target}'")
            node = node[p]
        if parts[-1] not in node:
            raise FaultError(f"fault '{f.spec}': no config key '{f.target}'")
        node[parts[-1]] = f.value
        done.append(f"{f.target}={f.value!r}")
    return done


def install_runtime_faults(backend: str, faults: Sequence[Fault]) -> List[str]:
    """Monkey-patch backend modules for behavioural faults (call after importing the adapter)."""
    done = []
    for f in faults:
        if f.kind == "bn-momentum":
            done.append(_patch_bn_momentum(backend, float(f.value)))
        if f.kind == "code":
            done.append(_patch_upsample_detach(backend))
        if f.kind == "optim":
            done.append(_patch_lr_scale(backend, float(f.value)))
        if f.kind == "dist" and f.target != "same-shard":      # same-shard: the worker's join_world
            done.append(install_dist_fault(backend, f.target))
        if f.kind != "upsample":
            continue
        if backend == "jittor":
            import jittor as jt
            from backends.jittor_impl import framework as fw

            def bilinear(x, size, _jt=jt):
                return _jt.nn.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear",
                                          align_corners=False)
            fw.interpolate_nearest = bilinear
        else:
            import torch.nn.functional as F
            from backends.torch_impl import hybrid_encoder

            class _Shim:
                def __getattr__(self, name):
                    return getattr(F, name)

                @staticmethod
                def interpolate(x, *a, **kw):
                    kw["mode"] = "bilinear"
                    kw.setdefault("align_corners", False)
                    return F.interpolate(x, *a, **kw)
            hybrid_encoder.F = _Shim()
        done.append("encoder FPN upsampling: nearest -> bilinear")
    return done


def _patch_bn_momentum(backend: str, momentum: float) -> str:
    """Wrap the backend's BatchNorm2d constructor so every instance built afterwards keeps
    ``momentum`` (both classes read ``self.momentum`` in their train-mode update)."""
    if backend == "jittor":
        from backends.jittor_impl.normalization import BatchNorm2d as cls
    else:
        from backends.torch_impl.normalization import BatchNorm2d as cls
    init = cls.__init__

    def patched(self, *a, _init=init, **kw):
        _init(self, *a, **kw)
        self.momentum = momentum
    cls.__init__ = patched
    return f"BatchNorm2d running-statistics momentum: 0.1 -> {momentum:g}"


def _patch_upsample_detach(backend: str) -> str:
    """Wrap the backend's FPN upsampling (whatever it is now, e.g. after upsample:bilinear)
    so that its output is detached: same values, no gradient through that branch."""
    if backend == "jittor":
        from backends.jittor_impl import framework as fw
        up = fw.interpolate_nearest

        def detached(x, size, _up=up):
            return _up(x, size).detach()
        fw.interpolate_nearest = detached
    else:
        from backends.torch_impl import hybrid_encoder
        cur = hybrid_encoder.F

        class _Shim:
            def __getattr__(self, name):
                return getattr(cur, name)

            @staticmethod
            def interpolate(*a, **kw):
                return cur.interpolate(*a, **kw).detach()
        hybrid_encoder.F = _Shim()
    return "encoder FPN upsampled map detached (gradients only)"


def _patch_lr_scale(backend: str, scale: float) -> str:
    """Every AdamW step uses scale x each group's lr; the groups' lr is restored after the
    step, so schedules and the exported optimiser state are untouched."""
    if backend == "jittor":
        from backends.jittor_impl.optim import AdamW as cls
    else:
        import torch
        cls = torch.optim.AdamW
    step = cls.step

    def scaled(self, *a, _step=step, **kw):
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * scale
        try:
            return _step(self, *a, **kw)
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
    cls.step = scaled
    return f"AdamW step with {scale:g} x the learning rate"


def poison_weights(adapter) -> None:
    """``nonfinite:ITERATION``: the decoder's first score-head bias becomes NaN before that step."""
    w = adapter.export_weights()
    name = next(n for n in w if n.startswith("decoder.dec_score_head") and n.endswith("bias"))
    w[name] = np.full_like(w[name], np.nan)
    adapter.load_weights(w)


def maybe_crash(faults: Sequence[Fault]) -> None:
    for f in faults:
        if f.kind != "crash":
            continue
        if f.target == "raise":
            raise RuntimeError("injected crash (fault crash:raise)")
        if f.target == "abort":
            os.abort()
        if f.target == "exit":
            os._exit(7)


NONFINITE_PREFIX = "nonfinite:"


def train_faults(specs: Sequence[str]) -> "tuple":
    """The train worker's ``(faults, nonfinite_at)``: the fault specs, and the iteration a
    ``nonfinite:N`` spec poisons (a test of the non-finite stop)."""
    nonfinite_at = None
    rest = []
    for s in specs or []:
        if s.startswith(NONFINITE_PREFIX):
            try:
                nonfinite_at = int(s[len(NONFINITE_PREFIX):])
            except ValueError:
                raise WorkerFailure("faults", EXIT_INPUT, f"fault '{s}': expected nonfinite:ITERATION") from None
        else:
            rest.append(s)
    try:
        faults = parse_faults(rest)
    except FaultError as e:
        raise WorkerFailure("faults", EXIT_INPUT, str(e)) from None
    if any(f.kind == "config" for f in faults):
        raise WorkerFailure("faults", EXIT_INPUT, "config faults are not supported by the train stage")
    return faults, nonfinite_at
