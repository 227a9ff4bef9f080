"""One side of a parity run, in that framework's own interpreter.

    python -m parity.workers.forward --backend torch|jittor --case DIR --out FILE.npz \
        --dtype float32|float64 --task forward|grad [--device cpu|cuda] \
        [--share-decisions FILE.npz] [--inject-fault SPEC ...] [--nproc N]
    python -m parity.workers.forward --backend jittor --check        # import + versions (pre-flight)

Protocol (see also parity/commands/forward.py):

* input: a case folder (parity/case/folder.py); the worker verifies its hashes, rebuilds the config
  from ``config.json`` and refuses to run when the digest differs from the manifest's
  (``config mismatch``);
* progress: ``FILE.status`` (JSON ``{"phase", "elapsed"}``) is rewritten at each phase;
* success: ``FILE`` (npz, written atomically, exit 0) with keys
    ``int/<name>``      named intermediates, forward order (``__meta__.order.intermediates``)
    ``out/<path>``      model outputs, flattened (``aux_outputs.0.pred_logits``, ...)
    ``loss/<name>``     every loss term (official order), ``loss_total``       (grad)
    ``grad/<param>``    gradient of every trainable parameter, spec order      (grad)
    ``step/<name>``     every state_dict entry after one optimiser step; ``step_grad_norm``
    ``match/<call>/<i>`` int64 [2, n] Hungarian assignment per loss call and image (grad)
    ``dec/topk``        int64 [B, Q] encoder top-k query selection
    ``train/int|out|dec/...``  forward task only: the same, for a train-mode forward (BN batch
                        statistics, no denoising) run after the eval one
    ``__meta__``        JSON: backend, dtype, task, config digest, versions, order lists,
                        timing per phase, peak RSS (MB), faults applied, decisions injected
* failure: ``FILE.error.json`` (``{"backend", "dtype", "task", "phase", "type", "message",
  "traceback"}``) and exit code 3 (environment: the framework or backend cannot be
  imported), 4 (case / config / weights / fault spec problem) or 1 (the backend crashed).
  A worker killed by a signal leaves no error file; the runner then reports the signal.

``--nproc N`` (N > 1, under ``torchrun`` for torch or ``mpirun`` for Jittor, see
parity/sides/launch.py): every rank joins its engine's world (``Adapter.data_parallel``),
takes its shard of the case's batch (parity/case/shards.py) and writes ``FILE`` as
``<stem>.rank<r>.npz`` (status and error files likewise); ``__meta__.shard`` holds the rank,
the world size, the image range and the digest of what the rank consumed.

``--share-decisions FILE``: npz with ``topk_index`` [B, Q], ``train_topk_index`` [B, Q] (forward
stage, train-mode pass) and ``matches/<call>/<i>`` [2, n]
(written by the runner from the other side's result): fed to the adapter as
``topk_index=`` / ``matches=`` (contract formats).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
from rtdetr_core.config import ConfigError, config_from_dict
from rtdetr_core.param_spec import param_spec

from parity.case.contract import read_decisions
from parity.case.faults import FaultError, parse_faults
from parity.case.folder import Case, CaseError
from parity.case.shards import ShardError, shard_digest, shard_inputs
from parity.fileio import rank_out, write_json, write_npz
from parity.workers.common import (EXIT_CRASH, EXIT_INPUT, EXIT_OK, WorkerFailure, import_backend, launched_rank,
    peak_rss_mb, report_failure)
from parity.workers.faults import apply_config_faults, apply_weight_faults, install_runtime_faults, maybe_crash


def flatten(prefix: str, obj: Any, out: "OrderedDict[str, np.ndarray]") -> None:
    """Nested dict/list of arrays -> flat ``prefix.key.0.sub`` -> array (scalar lists as arrays)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (list, tuple)):
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in obj):
            out[prefix] = np.asarray(obj)
        else:
            for i, v in enumerate(obj):
                flatten(f"{prefix}.{i}", v, out)
    elif obj is None:
        return
    else:
        out[prefix] = np.asarray(obj)


def normalize_matches(used: Any) -> "OrderedDict[str, List[np.ndarray]]":
    """Adapter ``matches`` -> call -> list over images of int64 [2, n]."""
    out: "OrderedDict[str, List[np.ndarray]]" = OrderedDict()
    for call, per_img in (used or {}).items():
        lst = []
        for m in per_img:
            if isinstance(m, (tuple, list)) and len(m) == 2:
                m = np.stack([np.asarray(m[0]).reshape(-1), np.asarray(m[1]).reshape(-1)])
            lst.append(np.asarray(m).astype(np.int64).reshape(2, -1))
        out[str(call)] = lst
    return out


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.phase = "start"
        self.timing: "OrderedDict[str, float]" = OrderedDict()
        self.warnings: List[str] = []
        self.status_path = args.out + ".status" if args.out else None

    # --- bookkeeping ---------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.status_path:
            try:
                write_json(self.status_path, {"phase": phase, "elapsed": time.perf_counter() - self.t0})
            except OSError:
                pass

    def timed(self, name: str, fn, *a, **kw):
        self.set_phase(name)
        t = time.perf_counter()
        r = fn(*a, **kw)
        self.timing[name] = self.timing.get(name, 0.0) + time.perf_counter() - t
        return r

    # --- phases --------------------------------------------------------------------------
    def import_backend(self):
        mod, self.versions = import_backend(self.args.backend)
        return mod

    def run(self) -> int:
        a = self.args
        try:
            faults = parse_faults(a.inject_fault)
        except FaultError as e:
            raise WorkerFailure("faults", EXIT_INPUT, str(e)) from None
        mod = self.timed("import", self.import_backend)
        if a.check:
            print(json.dumps({"ok": True, "backend": a.backend, "versions": self.versions}))
            return EXIT_OK
        case, cfg, applied = self.open_case(faults)
        adapter, weights = self.build(mod, case, cfg, faults, applied)
        images, targets = case.inputs()
        dn = case.dn_draws()
        arrays: "OrderedDict[str, np.ndarray]" = OrderedDict()
        meta: Dict[str, Any] = {"order": {}}
        if a.nproc > 1:
            images, targets, dn = self.join_world(adapter, images, targets, dn, meta)
        images = images.astype(a.dtype)
        topk, matches, train_topk = (None, None, None)
        if a.share_decisions:
            topk, matches, train_topk = read_decisions(a.share_decisions)
        self.set_phase(a.task)
        maybe_crash(faults)
        if a.task == "forward":
            self.forward_task(adapter, cfg, images, topk, train_topk, arrays, meta)
        else:
            self.grad_task(adapter, weights, images, targets, dn, topk, matches, arrays, meta)
        meta.update({"faults": applied, "decisions_injected": {"topk": topk is not None,
                                                               "matches": matches is not None,
                                                               "train_topk": train_topk is not None}})
        self.write(case, cfg, arrays, meta)
        return EXIT_OK

    def join_world(self, adapter, images, targets, dn, meta):
        """This rank's shard of the batch, after joining the launcher's world."""
        a = self.args
        self.set_phase("world")
        world = self.timed("join_world", adapter.data_parallel)
        if world.size != a.nproc:
            launcher = "torchrun" if a.backend == "torch" else "mpirun"
            raise WorkerFailure("world", EXIT_INPUT, f"--nproc {a.nproc} but this process sees a world of "
                                f"{world.size} (start it under {launcher}: parity/sides/launch.py)")
        # fault dist:same-shard (tests): every rank reads rank 0's images
        read_rank = 0 if any(f == "dist:same-shard" for f in a.inject_fault) else world.rank
        try:
            images, targets, dn = shard_inputs(images, targets, dn, a.nproc, read_rank)
        except ShardError as e:
            raise WorkerFailure("case", EXIT_INPUT, str(e)) from None
        per = images.shape[0]
        meta["shard"] = {"rank": world.rank, "world": world.size, "images": [world.rank * per, (world.rank + 1) * per],
                         "digest": shard_digest(images, targets, dn)}
        return images, targets, dn

    def open_case(self, faults):
        """The case folder and its config (a config fault applied), checked against the case."""
        a = self.args
        self.set_phase("case")
        try:
            case = Case(a.case)
        except CaseError as e:
            raise WorkerFailure("case", EXIT_INPUT, str(e)) from None
        applied: List[str] = []
        cfg = case.cfg
        if any(f.kind == "config" for f in faults):
            d = json.loads(json.dumps(case.config_dict))
            try:
                applied += apply_config_faults(d, faults)
                cfg = config_from_dict(d, src="config.json (fault-injected)")
            except (FaultError, ConfigError) as e:
                raise WorkerFailure("config", EXIT_INPUT, str(e)) from None
        digest = cfg.digest()
        if digest != case.digest:
            raise WorkerFailure("config", EXIT_INPUT,
                                f"config mismatch: this side built config digest {digest}, the case says "
                                f"{case.digest} (another rtdetr_core version or config defaults on this side?)")
        if a.task == "grad" and case.manifest.get("stage") != "grad":
            raise WorkerFailure("case", EXIT_INPUT, f"case was built for stage {case.manifest.get('stage')}, "
                                                    f"task grad needs a grad case (targets, dn draws)")
        return case, cfg, applied

    def build(self, mod, case, cfg, faults, applied: List[str]):
        """The backend's model with the case's weights (weight and runtime faults applied)."""
        a = self.args
        try:
            weights = self.timed("read_weights", case.weights)
            applied += apply_weight_faults(weights, faults)
        except CaseError as e:
            raise WorkerFailure("weights", EXIT_INPUT, str(e)) from None
        except FaultError as e:
            raise WorkerFailure("faults", EXIT_INPUT, str(e)) from None
        applied += install_runtime_faults(a.backend, faults)
        try:
            adapter = self.timed("build", mod.Adapter, cfg, dtype=a.dtype, device=a.device)
        except Exception as e:
            raise WorkerFailure("build", EXIT_CRASH, f"building the {a.backend} model failed: "
                                f"{type(e).__name__}: {e}") from None
        try:
            self.timed("load_weights", adapter.load_weights, weights)
        except Exception as e:
            code = EXIT_INPUT if type(e).__name__ == "WeightsError" else EXIT_CRASH
            raise WorkerFailure("weights", code, f"load_weights: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:500]}") from None
        return adapter, weights

    def forward_task(self, adapter, cfg, images, topk, train_topk, arrays, meta) -> None:
        res = self.timed("forward", adapter.forward, images, capture=True, topk_index=topk)
        self._store_forward(res, arrays, meta)
        del res
        # train mode: BatchNorm on batch statistics, no denoising (a forward case has no
        # draws); after the eval pass, because it moves the BN running statistics
        res = self.timed("forward_train", adapter.forward, images, train=True, capture=True,
                         topk_index=train_topk)
        self._store_forward(res, arrays, meta, prefix="train/")
        # BatchNorm running statistics after that train-mode pass (momentum, unbiased
        # variance and num_batches_tracked are otherwise invisible in the forward stage)
        bufs = {e.name for e in param_spec(cfg) if e.kind == "buffer"}
        exp = self.timed("export_weights", adapter.export_weights)
        meta["order"]["train/buffers"] = [k for k in exp if k in bufs]
        for k in meta["order"]["train/buffers"]:
            arrays[f"train/buf/{k}"] = np.asarray(exp[k])

    def grad_task(self, adapter, weights, images, targets, dn, topk, matches, arrays, meta) -> None:
        res = self.timed("loss_backward", adapter.loss, images, targets, dn, matches=matches,
                         topk_index=topk, backward=True, capture=True)
        self._store_forward(res, arrays, meta, outputs_key="outputs")
        losses = res["losses"]
        meta["order"]["losses"] = list(losses)
        for k, v in losses.items():
            arrays[f"loss/{k}"] = np.asarray(v, dtype=np.float64)
        arrays["loss_total"] = np.asarray(res["total"], dtype=np.float64)
        used = normalize_matches(res.get("matches"))
        meta["order"]["matches"] = list(used)
        for call, lst in used.items():
            for i, m in enumerate(lst):
                arrays[f"match/{call}/{i}"] = m
        meta["order"]["grads"] = list(res["grads"])
        for k, g in res["grads"].items():
            arrays[f"grad/{k}"] = np.asarray(g)
        del res
        # one optimiser step from the case weights (loss() already moved BN statistics)
        self.timed("reload_weights", adapter.load_weights, weights)
        st = self.timed("train_step", adapter.train_step, images, targets, dn,
                        **self.step_decisions(adapter, topk, matches, used))
        arrays["step_grad_norm"] = np.asarray(float(st["grad_norm"]), dtype=np.float64)
        meta["step"] = {"total": float(st["total"]), "grad_norm": float(st["grad_norm"]),
                        "lr": [float(x) for x in st.get("lr", [])]}
        exp = self.timed("export_weights", adapter.export_weights)
        meta["order"]["step"] = list(exp)
        for k, v in exp.items():
            arrays[f"step/{k}"] = np.asarray(v)

    def step_decisions(self, adapter, topk, matches, used) -> Dict[str, Any]:
        """The decisions the optimiser step takes: the shared ones where train_step accepts them."""
        step_kw: Dict[str, Any] = {}
        params = inspect.signature(adapter.train_step).parameters
        if topk is not None and "topk_index" in params:
            step_kw["topk_index"] = topk
        if matches is not None and (topk is None or "topk_index" in params):
            step_kw["matches"] = matches
        elif matches is not None:
            step_kw["matches"] = used      # this side's own matches under the shared top-k
            self.warnings.append("train_step() takes no topk_index: the optimiser step ran with this "
                                 "side's own top-k selection (shared matches not applicable)")
        else:
            step_kw["matches"] = used
        return step_kw

    def write(self, case, cfg, arrays, meta) -> None:
        """The result npz: every array, and the meta the runner checks (config, weights, dtype)."""
        a = self.args
        floats = sorted({str(v.dtype) for v in arrays.values() if v.dtype.kind == "f"
                         and v.ndim > 0})
        if floats and floats != [a.dtype]:
            self.warnings.append(f"floating arrays of dtype {', '.join(floats)} in a {a.dtype} run")
        faults, injected = meta.pop("faults"), meta.pop("decisions_injected")
        meta.update({
            "backend": a.backend, "dtype": a.dtype, "task": a.task, "device": a.device,
            "config": cfg.name, "config_digest": cfg.digest(), "case_weights_sha256":
                case.manifest["files"].get("weights.safetensors"),
            "faults": faults, "decisions_injected": injected,
            "versions": self.versions, "warnings": self.warnings, "dtypes_seen": floats,
        })
        self.set_phase("write")
        meta["timing"] = dict(self.timing)
        meta["timing"]["total"] = time.perf_counter() - self.t0
        meta["peak_rss_mb"] = peak_rss_mb()
        write_npz(a.out, arrays, meta)
        self.set_phase("done")

    @staticmethod
    def _store_forward(res: Dict[str, Any], arrays, meta, outputs_key: Optional[str] = None,
                       prefix: str = "") -> None:
        """``prefix`` "train/" keeps the forward stage's train-mode pass apart from its eval pass
        (keys ``train/int/...``, order lists ``train/intermediates``, ...)."""
        inter = res.get("intermediates") or OrderedDict()
        meta["order"][prefix + "intermediates"] = list(inter)
        for k, v in inter.items():
            arrays[f"{prefix}int/{k}"] = np.asarray(v)
        outs = res[outputs_key] if outputs_key else {k: v for k, v in res.items()
                                                     if k not in ("intermediates", "decisions")}
        flat: "OrderedDict[str, np.ndarray]" = OrderedDict()
        flatten("", outs, flat)
        meta["order"][prefix + "outputs"] = list(flat)
        for k, v in flat.items():
            arrays[f"{prefix}out/{k}"] = v
        if "decoder.enc_topk_index" in inter:
            arrays[f"{prefix}dec/topk"] = np.asarray(inter["decoder.enc_topk_index"]).astype(np.int64)
        # the evidence behind the decisions (scores, costs, own choices under injection)
        for k, v in (res.get("decisions") or {}).items():
            arrays[f"{prefix}note/{k}"] = np.asarray(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.workers.forward", description="one side of a parity run")
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--case", help="case folder (parity/case/folder.py)")
    p.add_argument("--out", help="result file (.npz); errors go to OUT.error.json")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--task", default="forward", choices=["forward", "grad"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--share-decisions", default=None, metavar="FILE",
                   help="npz with topk_index and matches/<call>/<i> to inject")
    p.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                   help="deliberate fault (tests): weight:NAME:OP=V, upsample:bilinear, config:K=V, crash:KIND")
    p.add_argument("--nproc", type=int, default=1, help="ranks of a data-parallel launch (torchrun / mpirun)")
    p.add_argument("--check", action="store_true", help="import the backend, print versions as JSON, exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.check and (not args.case or not args.out):
        print("parity.workers.forward: --case and --out are required (unless --check)", file=sys.stderr)
        return 2
    if args.out and args.nproc > 1:     # each rank writes its own files
        args.out = rank_out(args.out, launched_rank())
    if args.out:        # a stale result or error file from an earlier run must not be read as ours
        for stale in (args.out, args.out + ".error.json"):
            if os.path.exists(stale):
                os.unlink(stale)
    w = Worker(args)
    try:
        return w.run()
    except BaseException as e:  # noqa: BLE001 - every failure must leave an error file
        return report_failure(e, w.phase, f"parity.workers.forward [{args.backend} {args.dtype} {args.task}]",
                              args.out + ".error.json" if args.out else None,
                              {"backend": args.backend, "dtype": args.dtype, "task": args.task}, {}, w.t0)


if __name__ == "__main__":
    sys.exit(main())
