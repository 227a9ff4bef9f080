"""One side of ``parity run --stage train``, in that framework's own interpreter.

    python -m parity.workers.train --backend torch|jittor --run RUN_DIR --side LABEL \
        [--dtype float32|float64] [--device cpu|cuda] [--threads N] [--resume] \
        [--stop-after-epoch N] [--inject-fault SPEC ...] [--nproc N] [--dir SIDE_DIR]
        [--follow FILE.npz] [--probe-at IT --probe-out DIR]

Input: the run's case folder ``RUN_DIR/case`` written once by the runner
(``parity/commands/train.py``): ``config.json``, ``weights.safetensors`` (initial weights),
``data.npz`` (every train/val image already decoded and resized, float32, and the targets),
``streams/epoch_NNNN.npz`` (per epoch: the image order and, per iteration, the dataset
indices, the denoising draws and the multi-scale size) and ``manifest.json`` (hashes, plan).
Both sides read the very same files, so they consume identical data, order, denoising
draws and sizes; nothing random is drawn here.

Output, all under ``RUN_DIR/LABEL/`` (every file written atomically)::

    status.json                       {"phase", "epoch", "iteration", "elapsed"}: progress
    log.json                          per-iteration records (every loss term, total, lr per
                                      group, pre-clip grad norm, batch digest, seconds), per-epoch
                                      means, status (running | completed | stopped | nonfinite),
                                      the non-finite event, versions, threads, peak RSS;
                                      rewritten after every epoch
    eval/epoch_NNNN.npz               pred_logits / pred_boxes / topk_index / topk_scores of the val images (EMA model when
                                      EMA is on); the runner turns them into COCO mAP
    checkpoints/epoch_NNNN/           weights.safetensors (adapter dtype), train_state.npz
                                      (optimizer moments/steps/lr, EMA), state.json (epoch,
                                      stream states, the log up to here) — written to a
                                      temporary folder, then renamed: a folder is complete
    final.safetensors                 the weights after the last epoch (parameter drift)
    decisions/epoch_NNNN.rank<r>.npz  every iteration's top-k index and assignments, per rank
                                      (parity/workers/train_decisions.py: also --follow, --probe-at)
    error.json                        on failure (phase, message, traceback); exit code 3
                                      environment, 4 input (case / config / weights / fault), 1 crash

A non-finite loss term, total or gradient norm stops this side at once (``status: nonfinite``,
``nonfinite: {"epoch", "iteration", "term", "value"}``; exit 0: a result, the report says so).

``--nproc N`` (under torchrun / mpirun): each rank trains on its shard of every global batch;
rank 0 writes the files above, the losses logged are the mean over ranks (parity/workers/train_ranks.py).

``--resume``: continue from the newest complete checkpoint (weights, optimizer + EMA state,
log; stream states checked against the case) — the curve then equals an uninterrupted run
bit for bit.  ``--stop-after-epoch N``: stop after epoch N as if interrupted there, after
writing a checkpoint of epoch N.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from rtdetr_core.lr_schedule import multistep_factor

from parity.case.train import batch_digest, epoch_file, load_data, read_epoch_streams
from parity.fileio import jsonable, read_json, write_json
from parity.workers.common import (EXIT_CRASH, EXIT_INPUT, EXIT_OK, WorkerFailure, check_device, import_backend,
    peak_rss_mb, report_failure, threads_info)
from parity.workers.faults import (apply_weight_faults, install_runtime_faults, maybe_crash, poison_weights,
    train_faults)
from parity.workers.train_decisions import DecisionLog
from parity.workers.train_files import (LOG_SCHEMA, SideFiles, epoch_summary, finite_check, nonfinite_error,
    nonfinite_event)
from parity.workers.train_ranks import Ranks, error_path


# ----------------------------------------------------------------------------------------
# the worker
# ----------------------------------------------------------------------------------------

class TrainWorker(SideFiles, Ranks, DecisionLog):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.phase = "start"
        self.dir = args.dir or os.path.join(args.run, args.side)
        self.case_dir = os.path.join(args.run, "case")
        self.epoch = 0
        self.iteration = 0
        self.prev_wall = 0.0
        self.probed = False
        self.init_ranks(args.nproc)

    # --- bookkeeping ---------------------------------------------------------------------
    def status(self, phase: str, **extra: Any) -> None:
        self.phase = phase
        if not self.writer:
            return
        try:
            write_json(os.path.join(self.dir, "status.json"),
                       {"phase": phase, "epoch": self.epoch, "iteration": self.iteration,
                        "elapsed": time.perf_counter() - self.t0, **extra})
        except OSError:
            pass

    def write_log(self) -> None:
        self.write_rank_file()
        if not self.writer:
            return
        self.log["peak_rss_mb"] = peak_rss_mb()
        self.log["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.log["timing"]["wall_s_total"] = self.prev_wall + time.perf_counter() - self.t0  # kept current: killed runs
        write_json(os.path.join(self.dir, "log.json"), self.log)

    # --- setup -----------------------------------------------------------------------------
    def import_backend(self):
        mod, self.versions = import_backend(self.args.backend)
        return mod

    # --- main loop ---------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(error_path(self.dir, self.rank)):
            os.unlink(error_path(self.dir, self.rank))
        faults, nonfinite_at = self.setup()
        self.init_decisions()
        if self.args.nproc > 1:
            self.join_world(faults)
        start = self.restore(int(self.plan["epochs"]))
        if start is None:
            return EXIT_OK
        maybe_crash(faults)
        stopped = self.train_epochs(start, nonfinite_at)
        if self.probed:                 # a probe leaves no log and no weights behind
            return EXIT_OK
        self.finish(stopped)
        return EXIT_OK

    def setup(self):
        """Faults, the backend, the case, the model with the case's weights, the log."""
        a = self.args
        self.status("import")
        faults, nonfinite_at = train_faults(self.args.inject_fault)
        self.mod = self.import_backend()
        applied = install_runtime_faults(a.backend, faults)
        if a.threads and a.backend == "torch":
            import torch  # lazy: the torch side only (the Jittor environment has no torch)
            torch.set_num_threads(int(a.threads))
        check_device(a.backend, a.device)

        self.status("case")
        self.read_case()
        self.data = load_data(self.case_dir)

        self.status("build")
        try:
            self.adapter = self.mod.Adapter(self.cfg, dtype=a.dtype, device=a.device)
        except Exception as e:  # noqa: BLE001
            raise WorkerFailure("build", EXIT_CRASH, f"building the {a.backend} model failed: {type(e).__name__}: {e}") from None
        self.eval_adapter = None
        weights = self.read_safetensors(os.path.join(self.case_dir, "weights.safetensors"))
        applied += apply_weight_faults(weights, faults)
        try:
            self.adapter.load_weights(weights)
        except Exception as e:  # noqa: BLE001
            code = EXIT_INPUT if type(e).__name__ == "WeightsError" else EXIT_CRASH
            raise WorkerFailure("weights", code, f"load_weights: {type(e).__name__}: {e}") from None
        self.base_lrs = self.adapter.get_lr()      # the config's rates (built before any state is loaded)
        # counted on the model this backend built (the seed experiment compared two different
        # models: its parameter counts differed, and nobody checked)
        exported = self.adapter.export_weights()
        dec = self.cfg.decoder
        model_info = {"parameters": int(sum(exported[n].size for n in self.adapter.param_groups())),
                      "state_elements": int(sum(v.size for v in exported.values())),
                      "num_queries": dec.num_queries, "num_decoder_layers": dec.num_decoder_layers,
                      "num_denoising": dec.num_denoising}

        self.log: Dict[str, Any] = {
            "schema": LOG_SCHEMA, "backend": a.backend, "side": a.side, "dtype": a.dtype, "device": a.device,
            "config": self.cfg.name, "config_digest": self.cfg.digest(), "status": "running",
            "epochs_planned": int(self.plan["epochs"]), "base_lrs": self.base_lrs, "versions": self.versions,
            "threads": threads_info(a.backend), "model": model_info,
            "faults": applied + ([f"nonfinite at iteration {nonfinite_at}"] if nonfinite_at else []),
            "resumed": [], "nonfinite": None, "iterations": [], "epochs": [], "evals": [], "timing": {}}
        return faults, nonfinite_at

    def restore(self, E: int) -> Optional[int]:
        """The first epoch to train: 1, or after the newest checkpoint with --resume (None: the
        side is already complete).  Later artefacts of an earlier run are removed."""
        a = self.args
        start = 1
        if a.resume:
            self.status("resume")
            prev_path = os.path.join(self.dir, "log.json")
            prev = read_json(prev_path) if os.path.isfile(prev_path) else None
            if prev and prev.get("status") == "completed" and prev.get("epochs_planned") == E \
                    and os.path.isfile(os.path.join(self.dir, "final.safetensors")):
                self.status("done", note="already complete")
                print(f"[{a.side}] already complete ({E} epochs): nothing to do", file=sys.stderr)
                return None
            ck = self.latest_checkpoint()
            if ck is not None:
                start = self.resume_from(ck, prev, E)
            else:
                print(f"[{a.side}] --resume: no checkpoint yet, starting from epoch 1", file=sys.stderr)
                for d in glob.glob(os.path.join(self.dir, "eval", "*.npz")):
                    self.remove(d)
        else:
            for d in (self.ckpt_root(), os.path.join(self.dir, "eval")):
                if os.path.isdir(d):
                    self.remove(d)
            for f in ("final.safetensors", "log.json"):
                if os.path.exists(os.path.join(self.dir, f)):
                    self.remove(os.path.join(self.dir, f))
        # a resumed run's later artefacts are recomputed: drop evals past the restart point
        self.log["evals"] = [ev for ev in self.log["evals"] if ev["epoch"] < start]
        for f in glob.glob(os.path.join(self.dir, "eval", "epoch_*.npz")):
            if int(os.path.basename(f)[6:10]) >= start:
                self.remove(f)
        if os.path.exists(os.path.join(self.dir, "final.safetensors")):
            self.remove(os.path.join(self.dir, "final.safetensors"))
        return start

    def resume_from(self, ck: str, prev: Optional[Dict[str, Any]], E: int) -> int:
        state = self.load_checkpoint(ck)
        start = int(state["epoch"]) + 1
        self.iteration = int(state["iteration"])
        for k in ("iterations", "epochs", "evals"):
            self.log[k] = state["log"][k]
        self.restore_rank_digests(self.iteration)
        if prev:
            self.log["resumed"] = list(prev.get("resumed", []))
            self.prev_wall = float((prev.get("timing") or {}).get("wall_s_total",
                                                                  (prev.get("timing") or {}).get("wall_s", 0.0)))
        self.log["resumed"].append({"from_epoch": int(state["epoch"]), "checkpoint": os.path.relpath(ck, self.dir),
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if start <= E:
            m0, _ = read_epoch_streams(epoch_file(self.case_dir, start))
            if m0["state_before"] != state["stream_state_after"]:
                raise WorkerFailure("resume", EXIT_INPUT, f"{ck}: the stream state after epoch {state['epoch']} "
                                                          f"differs from the case's epoch {start} streams "
                                                          f"(case regenerated with other settings?)")
        print(f"[{self.args.side}] resuming from {ck} (epoch {state['epoch']} done)", file=sys.stderr)
        return start

    def train_epochs(self, start: int, nonfinite_at: Optional[int]) -> bool:
        """Every planned epoch from ``start`` (the lr of its MultiStepLR step, its iterations, its
        evaluation and checkpoint); True when stopped on request (--stop-after-epoch)."""
        self.status("train")
        E = int(self.plan["epochs"])
        for epoch in range(start, E + 1):
            self.epoch = epoch
            f = multistep_factor(epoch, self.plan["lr_milestones"], float(self.plan["lr_gamma"]))
            self.adapter.set_lr([b * f for b in self.base_lrs])
            meta, its = read_epoch_streams(epoch_file(self.case_dir, epoch))
            t_epoch = time.perf_counter()
            for step, it in enumerate(its):
                if not self.train_iteration(epoch, step, it, nonfinite_at):
                    break
            if self.probed:
                return True
            train_s = time.perf_counter() - t_epoch
            self.log["epochs"].append(self.epoch_record(epoch, train_s))
            if self.log["status"] == "nonfinite":
                self.write_decisions(epoch)
                self.write_log()
                break
            if self.end_epoch(epoch, meta, train_s):
                return True
        return False

    def train_iteration(self, epoch: int, step: int, it: Dict[str, Any], nonfinite_at: Optional[int]) -> bool:
        """One training step on the case's batch; False when a non-finite value stops the side."""
        a = self.args
        self.iteration += 1
        self.status("train")
        images_all, targets_all = self.data["train_images"], self.data["train_targets"]
        idx = it["indices"]
        images = images_all[idx].astype(a.dtype, copy=False)
        targets = [targets_all[int(i)] for i in idx]
        dn, ms = it["dn_draws"], it["multi_scale_size"]
        batch = batch_digest(images_all[idx], targets, dn, ms)        # the global batch (the log's)
        if a.nproc > 1:
            images, targets, dn = self.shard(images, targets, dn)
        if nonfinite_at is not None and self.iteration == nonfinite_at:
            poison_weights(self.adapter)
        topk, matches = self.forced(self.iteration)
        if a.probe_at is not None and self.iteration == a.probe_at:
            self.probe(images, targets, dn, ms, topk, matches)
            self.probed = True
            return False
        t = time.perf_counter()
        try:
            res = self.adapter.train_step(images, targets, dn, multi_scale_size=ms, topk_index=topk, matches=matches)
        except Exception as e:  # noqa: BLE001 - a NaN may surface as an error (matcher)
            event = nonfinite_error(e, self.adapter, epoch, self.iteration, step)
            if event is None:
                raise
            self.log["status"], self.log["nonfinite"] = "nonfinite", event
            print(f"[{a.side}] non-finite values at iteration {self.iteration} (epoch {epoch}): "
                  f"{event['error']}; {event['nonfinite_weights']} non-finite weight tensors: stopping this side",
                  file=sys.stderr)
            return False
        sec = time.perf_counter() - t
        rec = {"iteration": self.iteration, "epoch": epoch, "step": step,
               "losses": OrderedDict((k, jsonable(float(v))) for k, v in res["losses"].items()),
               "total": jsonable(float(res["total"])), "grad_norm": jsonable(float(res["grad_norm"])),
               "lr": [float(x) for x in res["lr"]], "multi_scale_size": ms,
               "num_boxes": [int(len(targets_all[int(i)]["labels"])) for i in idx],
               "batch": batch, "seconds": sec}
        if topk is not None or matches is not None:
            rec["followed"] = True          # this step took the base side's decisions (--follow)
        self.keep_decisions(self.iteration, res.get("decisions"))
        self.log["iterations"].append(rec)
        bad = finite_check(res)
        if bad is not None:
            self.log["status"] = "nonfinite"
            self.log["nonfinite"] = nonfinite_event(self.adapter, epoch, self.iteration, step, bad[0], repr(bad[1]))
            print(f"[{a.side}] non-finite {bad[0]} = {bad[1]} at iteration {self.iteration} "
                  f"(epoch {epoch}): stopping this side", file=sys.stderr)
            return False
        return True

    def epoch_record(self, epoch: int, train_s: float) -> Dict[str, Any]:
        summ = epoch_summary(self.log["iterations"], epoch)
        summ.update(seconds=train_s, seconds_per_iteration=train_s / max(1, summ["iterations"]),
                    peak_rss_mb=peak_rss_mb(), complete=self.log["status"] != "nonfinite")
        if summ["mean_total"] is not None and not math.isfinite(summ["mean_total"]):
            summ["mean_total"] = jsonable(float(summ["mean_total"]))
            summ["mean"] = OrderedDict((k, jsonable(float(v))) for k, v in summ["mean"].items())
            summ["mean_grad_norm"] = jsonable(float(summ["mean_grad_norm"]))
        return summ

    def end_epoch(self, epoch: int, meta: Dict[str, Any], train_s: float) -> bool:
        """Evaluation and checkpoint as planned, the log; True when --stop-after-epoch stops here."""
        E, plan, stop_after = int(self.plan["epochs"]), self.plan, self.args.stop_after_epoch
        eval_every, ckpt_every = int(plan["eval_every"]), int(plan["checkpoint_every"])
        self.write_decisions(epoch)
        if self.args.probe_at is not None:      # a probe only walks to its iteration
            return False
        if self.writer and (epoch == E or (eval_every > 0 and epoch % eval_every == 0)):
            self.evaluate(epoch)
        stop_here = stop_after is not None and epoch == stop_after and epoch < E
        if self.writer and ((ckpt_every > 0 and (epoch % ckpt_every == 0 or epoch == E)) or stop_here):
            self.status("checkpoint")
            self.write_checkpoint(epoch, meta["state_after"])
        self.write_log()
        print(f"[{self.args.side}] epoch {epoch}/{E}: mean loss {self.log['epochs'][-1]['mean_total']:.6g}, "
              f"{train_s:.1f}s", file=sys.stderr)
        return stop_here

    def finish(self, stopped: bool) -> None:
        if self.log["status"] == "running":
            if stopped:
                self.log["status"] = "stopped"
            else:
                self.status("final")
                if self.writer:
                    self.save_safetensors(os.path.join(self.dir, "final.safetensors"), self.adapter.export_weights())
                self.log["status"] = "completed"
        wall = time.perf_counter() - self.t0
        self.log["timing"]["wall_s"] = wall                     # this invocation
        self.write_log()
        self.status("done")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.workers.train", description="one side of a parity train run")
    p.add_argument("--backend", required=True, choices=["torch", "jittor"])
    p.add_argument("--run", required=True, help="run folder (holds case/)")
    p.add_argument("--side", required=True, help="this side's label (T32, J32, T64, ...): its folder in the run")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (Jittor: OMP_NUM_THREADS)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--stop-after-epoch", type=int, default=None, help="stop (with a checkpoint) after this epoch")
    p.add_argument("--inject-fault", action="append", default=[], metavar="SPEC",
                   help="tests: weight:NAME:OP=V, upsample:bilinear, bn-momentum:V, dist:RULE, crash:KIND, "
                        "nonfinite:ITERATION")
    p.add_argument("--nproc", type=int, default=1, help="ranks of a data-parallel launch (torchrun / mpirun)")
    p.add_argument("--dir", default=None, help="this side's folder (default RUN/SIDE)")
    p.add_argument("--follow", default=None, metavar="FILE", help="take these iterations' decisions (npz)")
    p.add_argument("--probe-at", type=int, default=None, metavar="IT",
                   help="stop at iteration IT after recording its decision evidence into --probe-out")
    p.add_argument("--probe-out", default=None, metavar="DIR", help="the probe's output folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.run = os.path.abspath(args.run)
    if (args.probe_at is None) != (args.probe_out is None):
        build_parser().error("--probe-at and --probe-out go together")
    w = TrainWorker(args)
    try:
        return w.run()
    except BaseException as e:  # noqa: BLE001 - every failure must leave an error file
        return report_failure(e, w.phase, f"parity.workers.train [{args.side} {args.backend} {args.dtype}]",
                              error_path(w.dir, w.rank),
                              {"backend": args.backend, "side": args.side, "dtype": args.dtype},
                              {"epoch": w.epoch, "iteration": w.iteration}, w.t0)


if __name__ == "__main__":
    sys.exit(main())
