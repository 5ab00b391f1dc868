"""The ``peft-mtl`` command line: train, sweep, eval, predict, ensemble, compress, report, serve, export, bench.

Machine-readable results go to stdout (one JSON object or line); progress bars, per-epoch
summaries and data reports go to stderr. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError
from .training.config import ConfigError, TrainConfig
from .options import add_config_arguments, apply_overrides, overrides_from_args

EXIT_USER_ERROR = 2


# Which argparse group each config field's flag is shown in (by dotted-path prefix).
_TRAIN_GROUPS = {"lora.": "LoRA", "smart.": "regularisation (SMART, Bregman)"}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag (generated: see peft_mtl.options), plus run control."""
    add_config_arguments(p, TrainConfig, _TRAIN_GROUPS)
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields; flags given override it")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same flags)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from ``--config`` (or the defaults), overridden by the flags given."""
    if args.config:
        try:
            cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{args.config}: cannot read the config ({err})") from None
    else:
        cfg = TrainConfig()
    overrides = overrides_from_args(args, TrainConfig)
    if "out" not in overrides and not args.config:
        raise ConfigError("--out: say where the adapter set goes (e.g. --out runs/sst)")
    apply_overrides(cfg, overrides)
    return cfg.validate()


def cmd_train(args, argv) -> int:
    from .training.train import summary_line, train

    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary.get("rank", 0) == 0:  # one result line per run, not per process
        print(summary_line(summary), flush=True)
    return 130 if summary.get("interrupted") else 0


def _load_eval_splits(tasks: list[str], data_dir: str | None, split: str, strict: bool, base, set_name: str):
    """Encoded labelled splits, tokenised the way ``set_name`` was trained (length, pair encoding)."""
    from .data.loading import default_data_dir, encode_split, load_split, task_file

    folder = Path(data_dir) if data_dir else default_data_dir()
    aset = base.sets[set_name]
    encoded = {}
    for t in tasks:
        spec = base.spec(t, set_name)  # as saved with the set: file tasks load without their task file
        loaded = load_split(task_file(folder, spec, split), spec, strict=strict)
        if loaded.skip_report():
            print(loaded.skip_report(), file=sys.stderr)
        encoded[t] = encode_split(loaded, base.tokenizer, aset.max_length, aset.pair_encoding)
    return encoded


def _evaluate_folder(folder: str, args, progress: bool) -> dict:
    """Every task of the set in ``folder`` scored on ``args.split``, plus the overall score."""
    from .inference.evaluate import predictions_from_outputs, score
    from .inference.base_model import load_adapters
    from .inference.metrics import overall_score

    base = load_adapters(folder, backbone=args.backbone, precision=args.precision, device=args.device,
                         int8=args.int8)
    name = base.active
    tasks = base.sets[name].tasks
    splits = _load_eval_splits(tasks, args.data_dir, args.split, args.strict, base, name)
    result: dict = {}
    for t, enc in splits.items():
        outputs = base.outputs(t, enc, name, progress=progress)
        result[t] = score(enc, predictions_from_outputs(enc.task, outputs))
    overall = overall_score(result, {t: base.spec(t, name).primary_metric for t in result})
    if overall is not None:
        result["overall"] = overall
    return result


def cmd_eval(args, argv) -> int:
    print(json.dumps(_evaluate_folder(args.folder, args, progress=not args.no_progress)))
    return 0


def cmd_compress(args, argv) -> int:
    import shlex

    from .artifacts import write_json_atomic
    from .model.compress import compress_set
    from .runs import MANIFEST

    result = compress_set(args.folder, args.out, args.rank, args.task_rank, overwrite=args.overwrite)
    manifest_path = Path(args.out) / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["compressed_from"]["command"] = "peft-mtl " + shlex.join(argv)
    if not args.no_eval:
        args.int8 = False
        scores = _evaluate_folder(args.out, args, progress=not args.no_progress)
        overall = scores.pop("overall", None)
        manifest["metrics"] = {args.split: scores, "overall": overall}
    write_json_atomic(manifest_path, manifest)
    before = (manifest["compressed_from"].get("metrics") or {}).get("overall")
    after = manifest["metrics"].get("overall")
    print(json.dumps({"out": str(result.out), "ranks": result.ranks,
                      "energy_kept": {k: round(v, 4) for k, v in result.energy_kept.items()},
                      "trainable_parameters": result.trainable,
                      "percent_trainable": round(100 * result.trainable / result.total, 2),
                      "overall_before": before, "overall_after": after}))
    return 0


def cmd_predict(args, argv) -> int:
    from .inference.base_model import load_adapters

    base = load_adapters(args.folder, backbone=args.backbone, precision=args.precision, device=args.device,
                         int8=args.int8)
    task = base.spec(args.task)
    inputs: list = []
    if args.pairs_file:
        with open(args.pairs_file, encoding="utf-8") as f:
            inputs = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
    texts = list(args.inputs)
    if task.is_pair:
        for item in texts:
            if args.sep not in item:
                raise UserError(f"task {task.name!r} needs sentence pairs: write \"first{args.sep}second\" "
                                 f"(separator set by --sep) or pass --pairs-file")
            a, b = item.split(args.sep, 1)
            inputs.append((a.strip(), b.strip()))
    else:
        inputs.extend(texts)
    if not inputs:
        raise UserError("nothing to predict: give sentences as arguments or --pairs-file")
    for inp, pred in zip(inputs, base.predict(task.name, inputs)):
        print(json.dumps({"input": inp if isinstance(inp, str) else list(inp), **pred}))
    return 0


def cmd_ensemble(args, argv) -> int:
    from .inference.ensemble import SELECTORS, combine, cross_fitted_predictions, ensemble_predictions, member_outputs
    from .inference.evaluate import predictions_from_outputs, score
    from .inference.output_cache import OutputCache
    from .inference.base_model import load_base
    from .inference.metrics import overall_score
    from .runs import read_manifest

    folders = [Path(f) for f in args.folders]
    if len(folders) < 2:
        raise UserError("an ensemble needs at least two adapter-set folders")
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if weights is not None and args.select != "all":
        raise UserError(f"--weights conflicts with --select {args.select}: selection sets the weights per task")
    backbone = args.backbone or read_manifest(folders[0]).get("backbone_source")
    base = load_base(backbone, precision=args.precision, device=args.device, int8=args.int8)
    names = [base.load(f, name=f"m{i}") for i, f in enumerate(folders)]
    folder_of = dict(zip(names, folders))
    # Every task some member has, each served by the members that have it: single-task sets
    # (one per task) combine into one multi-task ensemble, and members may differ per task.
    tasks = list(dict.fromkeys(t for n in names for t in base.sets[n].tasks))
    if weights is not None and len(weights) != len(names):
        raise UserError(f"--weights: {len(weights)} weights for {len(names)} members; give one per folder")
    # Members tokenised differently (max length, cross vs bi encoding) each get their own encoding.
    layouts = {n: (base.sets[n].max_length, base.sets[n].pair_encoding) for n in names}
    encodings: dict = {}

    def split_for(task: str, member: str):
        key = (layouts[member], task)
        if key not in encodings:
            encodings[key] = _load_eval_splits([task], args.data_dir, args.split, args.strict, base, member)[task]
        return encodings[key]

    cache = OutputCache(args.cache_dir) if args.cache_dir else None
    result, members_result = {}, {n: {} for n in names}
    selection: dict = {}  # task -> member weights chosen by greedy selection, and its cross-fitted score
    for t in tasks:
        members = [n for n in names if t in base.sets[n].tasks]
        enc = split_for(t, members[0])
        if len({layouts[m] for m in members}) == 1:
            outs = member_outputs(base, t, enc, members, batched=args.batched, progress=not args.no_progress,
                                  cache=cache)
        else:
            outs = [member_outputs(base, t, split_for(t, m), [m], cache=cache)[0] for m in members]
        for n, o in zip(members, outs):
            members_result[n][t] = score(enc, predictions_from_outputs(enc.task, o))
        method = args.method if enc.task.kind == "classification" else args.regression_method
        task_weights = [weights[names.index(m)] for m in members] if weights is not None else None
        if args.select != "all":
            task_weights = SELECTORS[args.select](enc.task, enc.labels, outs, method=method)
            honest, folds = cross_fitted_predictions(enc.task, enc.labels, outs, method, select=args.select)
            member_folders = [str(folder_of[m]) for m in members]
            honest_scores = score(enc, honest)
            selection[t] = {"weights": dict(zip(member_folders, task_weights)), "cross_fitted": honest_scores,
                            "fold_weights": [dict(zip(member_folders, f)) for f in folds]}
            print(f"{args.select} {t}: " + ", ".join(f"{f} ×{w:g}" for f, w in zip(member_folders, task_weights) if w)
                  + f" | cross-fitted {enc.task.primary_metric} {honest_scores[enc.task.primary_metric]:.4f}",
                  file=sys.stderr)
        result[t] = score(enc, ensemble_predictions(enc.task, combine(enc.task.kind, outs, task_weights, method)))
    primary = {t: base.spec(t, next(n for n in names if t in base.sets[n].tasks)).primary_metric for t in tasks}
    overall = overall_score(result, primary)
    if overall is not None:
        result["overall"] = overall
    if selection:
        honest_overall = overall_score({t: v["cross_fitted"] for t, v in selection.items()}, primary)
        result["selection"] = {"method": SELECTION_METHODS[args.select] + "; selected and scored on the same split; "
                                         "cross_fitted: weights chosen on one half, scored on the other",
                               "tasks": selection, "cross_fitted_overall": honest_overall}
    for n, f in zip(names, folders):
        if not members_result[n]:
            continue
        o = overall_score(members_result[n], primary)
        shown = " ".join(f"{t} {k} {v:.4f}" for t, m in members_result[n].items() for k, v in m.items())
        print(f"member {f}: {shown}" + (f" overall {o:.4f}" if o is not None else ""), file=sys.stderr)
    if cache is not None:
        print(f"output cache {cache.root}: {cache.hits} member outputs reused, {cache.misses} computed", file=sys.stderr)
    if args.record:
        _write_ensemble_record(Path(args.record), folders, base, names, dict(result), args)
    print(json.dumps(result))
    return 0


SELECTION_METHODS = {
    "greedy": "greedy forward selection with replacement (Caruana et al. 2004)",
    "bagged": "bagged greedy selection (Caruana et al. 2004, section 4.3): 20 bags, each of a random half of the "
              "members, selection with replacement initialised with the bag's 3 best members; bag ensembles averaged",
}


def _write_ensemble_record(path: Path, folders: list[Path], base, names: list[str], result: dict, args) -> None:
    from .artifacts import write_json_atomic
    from .report import folder_bytes

    selection = result.pop("selection", None)
    if selection:  # members with weight 0 on every task cost nothing: leave them out of the record's size
        used = {f for task in selection["tasks"].values() for f, w in task["weights"].items() if w}
        keep = [i for i, f in enumerate(folders) if str(f) in used]
        folders, names = [folders[i] for i in keep], [names[i] for i in keep]
    manifests = [base.sets[n].manifest for n in names]
    trainable = sum(m["parameters"]["trainable"] for m in manifests)
    backbone_only = manifests[0]["parameters"]["total"] - manifests[0]["parameters"]["trainable"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "members": [str(f) for f in folders],
        "tasks": {t: [str(f) for f, n in zip(folders, names) if t in base.sets[n].tasks]
                  for t in result if t not in ("overall", "selection")},
        "method": args.method, "regression_method": args.regression_method,
        "weights": args.weights, "split": args.split, "metrics": result, "selection": selection,
        "backbone": manifests[0]["backbone"]["name"], "trainable": trainable, "total": backbone_only + trainable,
        "bytes_on_disk": sum(folder_bytes(f) for f in folders),
        "train_seconds": sum(m.get("train_seconds") or 0 for m in manifests),
        "command": "peft-mtl " + " ".join(sys.argv[1:]) if sys.argv else None})


def cmd_tasks(args, argv) -> int:
    """List the built-in tasks, or validate task files (labels inferred, every split read)."""
    from .data.loading import load_split
    from .data.tasks import TASKS, builtin_task_files, resolve_tasks

    if not args.files:
        for f in builtin_task_files():
            spec = TASKS[f.stem]
            print(json.dumps({"name": spec.name, "type": spec.kind, "text": list(spec.text_columns),
                              "labels": list(spec.labels) if spec.labels else None, "metrics": list(spec.metrics),
                              "loss": spec.loss, "files": spec.files, "description": spec.description}))
        return 0
    for spec in resolve_tasks(list(args.files), args.strict):
        splits = {}
        for split in ("train", "dev", "test"):
            if split in spec.files:
                loaded = load_split(spec.file_for(split), spec, strict=args.strict)
                if loaded.skip_report():
                    print(loaded.skip_report(), file=sys.stderr)
                splits[split] = len(loaded.examples)
        print(json.dumps({"file": spec.source, "name": spec.name, "type": spec.kind,
                          "labels": list(spec.labels) if spec.labels else None, "metrics": list(spec.metrics),
                          "rows": splits, "valid": True}))
    return 0


def cmd_serve(args, argv) -> int:
    try:
        from .serving import ServeConfig
        from .serving.server import serve
    except ImportError as err:
        raise UserError(f"serving needs the serve extra ({err.name} is missing): pip install 'peft_mtl[serve]'") from None
    token = None
    if args.admin_token_file:
        path = Path(args.admin_token_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: admin token file not found")
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < 16:
            raise UserError(f"{path}: the admin token is shorter than 16 characters; use a long random one "
                             f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    root = Path(args.sets_root) if args.sets_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"{root}: --sets-root is not a folder")
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                         max_inputs=args.max_inputs, max_chars=args.max_chars, admin_token=token, sets_root=root)
    serve(args.sets, args.host, args.port, config, args.backbone, args.precision, args.device, args.int8)
    return 0


def cmd_export(args, argv) -> int:
    from .inference.export import ExportError, export_set

    try:
        record = export_set(args.folder, args.out, args.format, args.int8, args.backbone, args.overwrite)
    except ExportError as err:
        raise UserError(str(err)) from None
    print(json.dumps({"out": args.out, "tasks": {t: e["check"] for t, e in record["tasks"].items()}}))
    return 0


def cmd_report(args, argv) -> int:
    from .report import write_report

    roots = [Path(r) for r in (args.runs or ["adapters", "reports"])]
    rows = write_report(roots, Path(args.out))
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "plot": str(Path(args.out) / "params_vs_score.png"),
                      "runs": len(rows)}))
    return 0


def cmd_bench(args, argv) -> int:
    from . import bench

    # --quick: fewer and shorter repeats (≤ 5 min on 2 cores), unless given explicitly.
    steps = args.steps or (6 if args.quick else 12)
    repeats = args.repeats or (3 if args.quick else 5)
    result = bench.run(Path(args.out), steps=steps, repeats=repeats, ensemble_members=args.members, quick=args.quick)
    bench.write(result, Path(args.out), "peft-mtl bench " + " ".join(argv[1:]))
    print(json.dumps(result["ratios"]))
    return 0


def cmd_sweep(args, argv) -> int:
    from .training.sweep import archive, load_sweep, plan, run_jobs, stale_runs, summary_paths, write_summary

    spec = load_sweep(args.file)
    out = Path(args.out)
    jobs = plan(spec, out)
    stale = stale_runs(jobs)
    if stale:
        raise ConfigError(f"{args.file}: these finished runs in {out} were trained with other settings than their "
                          f"recipe now asks for: " + "; ".join(stale) + ". Move them away (they will be retrained) "
                          "or give the changed recipe a new name.")
    if args.summary_only and not out.is_dir():
        raise ConfigError(f"{out}: no such folder, so no finished runs to tabulate; train them first "
                          f"(`peft-mtl sweep {args.file} --out {out}`) or point --out at the sweep's folder")
    failed = [] if args.summary_only else run_jobs(jobs, out, workers=args.workers, threads=args.threads)
    # The table is a function of the runs, however they were trained: record the command that trains them.
    command = " ".join(a for a in ["peft-mtl", *argv] if a != "--summary-only")
    command = command.split(" --archive ")[0]
    summary = write_summary(spec, out, command)
    done = sum(len(r["seeds"]) for r in summary["recipes"].values())
    json_path, md_path = summary_paths(spec, out)
    print(f"sweep: {done} of {len(jobs)} runs finished; table in {md_path}", file=sys.stderr)
    if args.archive:
        copied = archive(spec, out, Path(args.archive))
        print(f"sweep: {copied} manifests and the table copied to {args.archive} (weights left out)", file=sys.stderr)
    print(json.dumps({"summary": str(json_path), "finished": done, "planned": len(jobs),
                      "failed": [f"{j.recipe}/seed{j.seed}" for j in failed]}))
    return 1 if failed else 0


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """How a loaded set runs: the options shared by eval, predict and ensemble."""
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if present, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument("--int8", action="store_true",
                   help="run each set as an int8 ONNX Runtime graph with its adapters merged (CPU; built once, "
                        "cached in ~/.cache/peft_mtl). Measured cost: reports/int8.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-mtl", description="Parameter-efficient multi-task fine-tuning of BERT encoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train adapters (or heads, or the full model) on one or more tasks")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained folder; prints one JSON object")
    p.add_argument("folder")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None, help="override the backbone recorded in the folder")
    _add_engine_options(p)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict for sentences; one JSON line per input",
                       description="Pairs: write each as 'first ||| second', or give --pairs-file with "
                                   "tab-separated pairs, one per line.")
    p.add_argument("folder")
    p.add_argument("--task", required=True)
    p.add_argument("inputs", nargs="*")
    p.add_argument("--sep", default="|||", help="separator between the sentences of a pair (default |||)")
    p.add_argument("--pairs-file", default=None)
    p.add_argument("--backbone", default=None)
    _add_engine_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ensemble", help="evaluate an ensemble of adapter sets on one shared backbone")
    p.add_argument("folders", nargs="+")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--method", default="mean", choices=["mean", "vote"], help="classification: mean probability or vote")
    p.add_argument("--regression-method", default="mean", choices=["mean", "median"])
    p.add_argument("--weights", default=None, help="comma-separated member weights (default: equal)")
    p.add_argument("--select", default="all", choices=["all", "greedy", "bagged"],
                   help="greedy: per task, forward selection with replacement on the split (Caruana et al. 2004); "
                        "bagged: the same over 20 random halves of the members, averaged (less overfit on a small "
                        "split); the chosen weights and a cross-fitted score are printed and recorded")
    passes = p.add_mutually_exclusive_group()
    passes.add_argument("--batched", dest="batched", action="store_const", const=True, default=None,
                        help="all members in one forward pass per batch (stacked LoRA factors)")
    passes.add_argument("--sequential", dest="batched", action="store_const", const=False,
                        help="one forward pass per member (default for whole splits: faster on CPU, "
                             "reports/bench.md)")
    p.add_argument("--record", default=None, help="also write the result as NAME.ensemble.json for `peft-mtl report`")
    p.add_argument("--cache-dir", default=None,
                   help="keep each member's outputs on the split here and reuse them (keyed by the set's files, "
                        "the inputs, precision, device and versions), so rescoring other combinations of the "
                        "same members costs no forward pass")
    p.add_argument("--backbone", default=None)
    _add_engine_options(p)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("tasks", help="list the built-in tasks, or validate task files (one JSON line each)")
    p.add_argument("files", nargs="*", help="task files (YAML or JSON) to validate")
    p.add_argument("--strict", action="store_true", help="malformed rows are errors")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("serve", help="serve adapter sets over HTTP (one backbone, dynamic batching)")
    p.add_argument("sets", nargs="*", help="set folders to load at start (NAME=DIR to name one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="rows per forward pass across requests (1: off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--admin-token-file", default=None, help="file holding the token for POST/DELETE /v1/sets")
    p.add_argument("--sets-root", default=None, help="folders loadable at run time must be under it")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per sentence")
    p.add_argument("--backbone", default=None, help="default: the first set's backbone")
    _add_engine_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a set as self-contained ONNX or OpenVINO models (adapters merged, heads included)")
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx (ONNX Runtime) or openvino (OpenVINO IR: model.xml + model.bin)")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (int8 weights per channel, "
                                                       "activations quantized per batch)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compress", help="cut every LoRA adapter of a set to its best low-rank fit (truncated SVD); "
                                        "writes a new set and scores it on dev",
                       description="Each adapter's update scale·BA is replaced by its truncated SVD at the given rank "
                                   "(the closest update of that rank). Shared adapters get --rank, task-private ones "
                                   "--task-rank (default: --rank). The new set is scored on --split (dev) and the "
                                   "score written into its manifest; `peft-mtl train --init-from OUT` fine-tunes it.")
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, required=True, help="rank of every adapter (of the shared ones with --task-rank)")
    p.add_argument("--task-rank", type=int, default=None, help="rank of the adapters only one task uses")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-eval", action="store_true", help="write the set without scoring it")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("report", help="table + plot of trainable parameters vs score over saved runs")
    p.add_argument("runs", nargs="*", help="folders to scan for runs and *.ensemble.json records (default: adapters reports)")
    p.add_argument("--out", default="reports", help="where report.md and params_vs_score.png go (default reports/)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sweep", help="recipe search: train each recipe of a sweep file over several seeds, "
                                     "table of mean ± sd (resumable)")
    p.add_argument("file", help="sweep file (YAML/JSON: base, seeds, baseline, recipes); see recipes/")
    p.add_argument("--out", required=True, help="folder for the runs (OUT/RECIPE/seedS) and sweep.{json,md}")
    p.add_argument("--workers", type=int, default=1, help="runs trained side by side (the cores are split)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / workers)")
    p.add_argument("--summary-only", action="store_true", help="train nothing; tabulate the finished runs")
    p.add_argument("--archive", default=None, help="also copy the manifests (no weights) and the table here, "
                                                   "for `peft-mtl report` (e.g. reports/sweeps/NAME)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="speed/memory benchmark vs the plain Hugging Face pipeline -> reports/bench.{json,md}")
    p.add_argument("--out", default="reports")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat (default 12, --quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5, --quick 3)")
    p.add_argument("--members", type=int, default=5, help="ensemble size")
    p.add_argument("--quick", action="store_true", help="≤ 5 min on 2 cores: fewer repeats; skips full fine-tuning, "
                                                        "SMART T=0, the merged copy and the bert-base-sized model")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `predict FOLDER --task sst "a" "b"`: sentences may follow the options, which argparse
    # cannot split between two positionals, so leftovers become inputs for predict only.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command != "predict" or any(e.startswith("--") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.inputs = list(args.inputs) + extras
    from .model.backbone import BackboneError
    from .data.loading import DataError
    from .runs import AdapterError
    from .training.train import TrainingError

    try:
        return args.func(args, argv)
    except (ConfigError, DataError, AdapterError, BackboneError, TrainingError, FileExistsError,
            FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"peft-mtl: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
