"""The ``peft-mtl`` command line: train, eval, predict, ensemble, report.

Machine-readable results go to stdout (one JSON object or line); progress bars, per-epoch
summaries and data reports go to stderr. Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig

EXIT_USER_ERROR = 2


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--tasks", default="sst", help="comma-separated tasks: sst,qqp,sts (default: sst)")
    g.add_argument("--out", required=True, help="output folder for the adapter set")
    g.add_argument("--mode", choices=["lora", "heads", "full"], default=d.mode,
                   help="lora: frozen backbone + LoRA adapters (default); heads: frozen backbone, heads only; "
                        "full: fine-tune the whole backbone")
    g.add_argument("--backbone", default=None, help="model folder or cached hub id (default: all-MiniLM-L6-v2)")
    g.add_argument("--data-dir", default=None, help="folder with the task files (default: ../shared/data or data/)")
    g.add_argument("--config", default=None, help="JSON file with TrainConfig fields; flags given override it")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr}; full mode wants ~5e-5)")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the heads (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="auto: bf16 autocast where the CPU has native bf16, else fp32")
    g = p.add_argument_group("model")
    g.add_argument("--pooling", choices=["mean", "cls"], default=d.pooling)
    g.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                   help="quantize the frozen backbone with bitsandbytes (LoRA on top); slow on CPU")
    g.add_argument("--pair-encoding", choices=["cross", "bi"], default=d.pair_encoding)
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--head-dropout", type=float, default=d.head_dropout)
    g.add_argument("--backbone-dropout", type=float, default=d.backbone_dropout,
                   help="dropout inside the encoder (default: the checkpoint's own, 0.1 for BERT)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=d.lora.rank)
    g.add_argument("--lora-alpha", type=float, default=d.lora.alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora.dropout)
    g.add_argument("--lora-targets", default=d.lora.targets,
                   help="qv | attention | all (every linear layer of each block) | comma-separated module names")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    g.add_argument("--dora", action="store_true", help="DoRA weight decomposition")
    g.add_argument("--lora-plus-ratio", type=float, default=d.lora_plus_ratio, help="LoRA+: lr(B) = ratio x lr(A)")
    g.add_argument("--no-shared", action="store_true", help="no shared adapter: independent per-task adapters")
    g = p.add_argument_group("multi-task")
    g.add_argument("--sampling", default=d.sampling,
                   help="annealed | uniform | proportional | sqrt | round-robin | staggered | sum")
    g.add_argument("--steps-per-epoch", type=int, default=None)
    g.add_argument("--staggered-epochs", type=int, default=d.staggered_epochs)
    g.add_argument("--pcgrad", action="store_true", help="PCGrad on the shared adapter (needs --sampling sum)")
    g.add_argument("--sst-loss", default=d.sst_loss, help="cross_entropy | dual | ordinal")
    g.add_argument("--ordinal-alpha", type=float, default=d.ordinal_alpha)
    g.add_argument("--extra-train", action="append", default=[], metavar="TASK=FILE",
                   help="extra training rows for TASK (not counted in the sampler's N_i)")
    g = p.add_argument_group("regularisation")
    g.add_argument("--smart-weight", type=float, default=d.smart.weight, help="SMART lambda_s for all tasks (0: off)")
    g.add_argument("--smart-task-weight", action="append", default=[], metavar="TASK=W", help="per-task lambda_s")
    g.add_argument("--smart-epsilon", type=float, default=d.smart.epsilon)
    g.add_argument("--smart-sigma", type=float, default=d.smart.sigma)
    g.add_argument("--smart-step-size", type=float, default=d.smart.step_size)
    g.add_argument("--smart-steps", type=int, default=d.smart.steps,
                   help="ascent steps T (0: random perturbation only, one pass cheaper)")
    g.add_argument("--smart-norm", choices=["inf", "l2"], default=d.smart.norm)
    g.add_argument("--bregman-mu", type=float, default=d.smart.bregman_mu, help="Bregman proximal weight mu (0: off)")
    g.add_argument("--bregman-beta", type=float, default=d.smart.bregman_beta)
    g.add_argument("--simcse-epochs", type=int, default=d.simcse_epochs)
    g.add_argument("--simcse-temperature", type=float, default=d.simcse_temperature)
    g = p.add_argument_group("data and run control")
    g.add_argument("--max-train-examples", type=int, default=None)
    g.add_argument("--max-eval-examples", type=int, default=None)
    g.add_argument("--strict", action="store_true", help="malformed rows are errors instead of being skipped")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--trace-dir", default=None, help="write rankN.jsonl: the tasks and data rows of every step")


def _pairs(items: list[str], flag: str, cast=str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} expects TASK=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = cast(v)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: {v!r} is not a valid value") from None
    return out


def config_from_args(args: argparse.Namespace, given: set[str]) -> TrainConfig:
    if args.config:
        try:
            cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{args.config}: cannot read the config ({err})") from None
    else:
        cfg = TrainConfig()

    def take(flag: str) -> bool:  # with --config, only flags given on the command line override it
        return not args.config or flag in given

    simple = {"mode": "mode", "backbone": "backbone", "data_dir": "data_dir", "epochs": "epochs",
              "batch_size": "batch_size", "lr": "lr", "head_lr": "head_lr", "weight_decay": "weight_decay",
              "warmup_ratio": "warmup_ratio", "max_grad_norm": "max_grad_norm", "patience": "patience",
              "seed": "seed", "precision": "precision", "pooling": "pooling", "pair_encoding": "pair_encoding",
              "max_length": "max_length", "head_dropout": "head_dropout", "backbone_dropout": "backbone_dropout", "lora_plus_ratio": "lora_plus_ratio",
              "sampling": "sampling", "steps_per_epoch": "steps_per_epoch", "staggered_epochs": "staggered_epochs",
              "pcgrad": "pcgrad", "sst_loss": "sst_loss", "ordinal_alpha": "ordinal_alpha",
              "simcse_epochs": "simcse_epochs", "simcse_temperature": "simcse_temperature",
              "max_train_examples": "max_train_examples", "max_eval_examples": "max_eval_examples",
              "checkpoint_every": "checkpoint_every", "overwrite": "overwrite", "trace_dir": "trace_dir", "quantize": "quantize"}
    for arg, fld in simple.items():
        if take(arg):
            setattr(cfg, fld, getattr(args, arg))
    cfg.out = args.out
    if take("tasks"):
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if take("strict"):
        cfg.strict_data = args.strict
    if take("no_shared") and args.no_shared:
        cfg.shared_adapter = False
    lora = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets",
            "rslora": "use_rslora", "dora": "use_dora"}
    for arg, fld in lora.items():
        if take(arg):
            setattr(cfg.lora, fld, getattr(args, arg))
    smart = {"smart_weight": "weight", "smart_epsilon": "epsilon", "smart_sigma": "sigma",
             "smart_step_size": "step_size", "smart_steps": "steps", "smart_norm": "norm",
             "bregman_mu": "bregman_mu", "bregman_beta": "bregman_beta"}
    for arg, fld in smart.items():
        if take(arg):
            setattr(cfg.smart, fld, getattr(args, arg))
    if args.smart_task_weight:
        cfg.smart.task_weights = _pairs(args.smart_task_weight, "--smart-task-weight", float)
    if args.extra_train:
        cfg.extra_train = _pairs(args.extra_train, "--extra-train")
    return cfg.validate()


def _given_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def cmd_train(args, argv) -> int:
    from .train import summary_line, train

    cfg = config_from_args(args, _given_flags(argv))
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary.get("rank", 0) == 0:  # one result line per run, not per process
        print(summary_line(summary), flush=True)
    return 130 if summary.get("interrupted") else 0


def _load_eval_splits(tasks: list[str], data_dir: str | None, split: str, strict: bool, base, set_name: str):
    """Encoded labelled splits, tokenised the way ``set_name`` was trained (length, pair encoding)."""
    from .data import default_data_dir, encode_split, load_split, task_file
    from .tasks import get_task

    folder = Path(data_dir) if data_dir else default_data_dir()
    aset = base.sets[set_name]
    encoded = {}
    for t in tasks:
        loaded = load_split(task_file(folder, get_task(t), split), get_task(t), strict=strict)
        if loaded.skip_report():
            print(loaded.skip_report(), file=sys.stderr)
        encoded[t] = encode_split(loaded, base.tokenizer, aset.max_length, aset.pair_encoding)
    return encoded


def cmd_eval(args, argv) -> int:
    from .evaluate import predictions_from_outputs, score
    from .inference import load_adapters
    from .metrics import overall_score

    base = load_adapters(args.folder, backbone=args.backbone, precision=args.precision)
    name = base.active
    tasks = base.sets[name].tasks
    splits = _load_eval_splits(tasks, args.data_dir, args.split, args.strict, base, name)
    result: dict = {}
    for t, enc in splits.items():
        outputs = base.outputs(t, enc, name, progress=not args.no_progress)
        result[t] = score(enc, predictions_from_outputs(enc.task.kind, outputs))
    overall = overall_score(result)
    if overall is not None:
        result["overall"] = overall
    print(json.dumps(result))
    return 0


def cmd_predict(args, argv) -> int:
    from .inference import load_adapters
    from .tasks import get_task

    task = get_task(args.task)
    inputs: list = []
    if args.pairs_file:
        with open(args.pairs_file, encoding="utf-8") as f:
            inputs = [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]
    texts = list(args.inputs)
    if task.is_pair:
        for item in texts:
            if args.sep not in item:
                raise ValueError(f"task {task.name!r} needs sentence pairs: write \"first{args.sep}second\" "
                                 f"(separator set by --sep) or pass --pairs-file")
            a, b = item.split(args.sep, 1)
            inputs.append((a.strip(), b.strip()))
    else:
        inputs.extend(texts)
    if not inputs:
        raise ValueError("nothing to predict: give sentences as arguments or --pairs-file")
    base = load_adapters(args.folder, backbone=args.backbone, precision=args.precision)
    for inp, pred in zip(inputs, base.predict(task.name, inputs)):
        print(json.dumps({"input": inp if isinstance(inp, str) else list(inp), **pred}))
    return 0


def cmd_ensemble(args, argv) -> int:
    from .ensemble import combine, ensemble_predictions, member_outputs
    from .evaluate import predictions_from_outputs, score
    from .inference import load_base
    from .metrics import overall_score
    from .runs import read_manifest

    folders = [Path(f) for f in args.folders]
    if len(folders) < 2:
        raise ValueError("an ensemble needs at least two adapter-set folders")
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    backbone = args.backbone or read_manifest(folders[0]).get("backbone_source")
    base = load_base(backbone, precision=args.precision)
    names = [base.load(f, name=f"m{i}") for i, f in enumerate(folders)]
    tasks = sorted(set.intersection(*(set(base.sets[n].tasks) for n in names)), key=["sst", "qqp", "sts"].index)
    if not tasks:
        raise ValueError("the folders share no task; an ensemble needs members that predict the same task")
    # Members tokenised differently (max length, cross vs bi encoding) each get their own encoding.
    layouts = {n: (base.sets[n].max_length, base.sets[n].pair_encoding) for n in names}
    splits_by_layout = {}
    for n in names:
        if layouts[n] not in splits_by_layout:
            splits_by_layout[layouts[n]] = _load_eval_splits(tasks, args.data_dir, args.split, args.strict, base, n)
    splits = splits_by_layout[layouts[names[0]]]
    result, members_result = {}, {n: {} for n in names}
    for t, enc in splits.items():
        if len(splits_by_layout) == 1:
            outs = member_outputs(base, t, enc, names, batched=args.batched, progress=not args.no_progress)
        else:
            outs = [member_outputs(base, t, splits_by_layout[layouts[n]][t], [n])[0] for n in names]
        for n, o in zip(names, outs):
            members_result[n][t] = score(enc, predictions_from_outputs(enc.task.kind, o))
        method = args.method if enc.task.kind == "classification" else args.regression_method
        result[t] = score(enc, ensemble_predictions(enc.task.kind, combine(enc.task.kind, outs, weights, method)))
    overall = overall_score(result)
    if overall is not None:
        result["overall"] = overall
    for n, f in zip(names, folders):
        o = overall_score(members_result[n])
        shown = " ".join(f"{t} {k} {v:.4f}" for t, m in members_result[n].items() for k, v in m.items())
        print(f"member {f}: {shown}" + (f" overall {o:.4f}" if o is not None else ""), file=sys.stderr)
    if args.record:
        _write_ensemble_record(Path(args.record), folders, base, names, result, args)
    print(json.dumps(result))
    return 0


def _write_ensemble_record(path: Path, folders: list[Path], base, names: list[str], result: dict, args) -> None:
    from .artifacts import write_json_atomic
    from .report import folder_bytes

    manifests = [base.sets[n].manifest for n in names]
    trainable = sum(m["parameters"]["trainable"] for m in manifests)
    backbone_only = manifests[0]["parameters"]["total"] - manifests[0]["parameters"]["trainable"]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "members": [str(f) for f in folders], "method": args.method, "regression_method": args.regression_method,
        "weights": args.weights, "split": args.split, "metrics": result,
        "backbone": manifests[0]["backbone"]["name"], "trainable": trainable, "total": backbone_only + trainable,
        "bytes_on_disk": sum(folder_bytes(f) for f in folders),
        "train_seconds": sum(m.get("train_seconds") or 0 for m in manifests),
        "command": "peft-mtl " + " ".join(sys.argv[1:]) if sys.argv else None})


def cmd_report(args, argv) -> int:
    from .report import write_report

    roots = [Path(r) for r in (args.runs or ["adapters", "reports"])]
    rows = write_report(roots, Path(args.out))
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "plot": str(Path(args.out) / "params_vs_score.png"),
                      "runs": len(rows)}))
    return 0


def cmd_bench(args, argv) -> int:
    from . import bench

    result = bench.run(Path(args.out), steps=args.steps, repeats=args.repeats, ensemble_members=args.members,
                       quick=args.quick)
    bench.write(result, Path(args.out), "peft-mtl bench " + " ".join(argv[1:]))
    print(json.dumps(result["ratios"]))
    return 0


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
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
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
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ensemble", help="evaluate an ensemble of adapter sets on one shared backbone")
    p.add_argument("folders", nargs="+")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--method", default="mean", choices=["mean", "vote"], help="classification: mean probability or vote")
    p.add_argument("--regression-method", default="mean", choices=["mean", "median"])
    p.add_argument("--weights", default=None, help="comma-separated member weights (default: equal)")
    passes = p.add_mutually_exclusive_group()
    passes.add_argument("--batched", dest="batched", action="store_const", const=True, default=None,
                        help="all members in one forward pass per batch (stacked LoRA factors)")
    passes.add_argument("--sequential", dest="batched", action="store_const", const=False,
                        help="one forward pass per member (default for whole splits: faster on CPU, "
                             "reports/bench.md)")
    p.add_argument("--record", default=None, help="also write the result as NAME.ensemble.json for `peft-mtl report`")
    p.add_argument("--backbone", default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("report", help="table + plot of trainable parameters vs score over saved runs")
    p.add_argument("runs", nargs="*", help="folders to scan for runs and *.ensemble.json records (default: adapters reports)")
    p.add_argument("--out", default="reports", help="where report.md and params_vs_score.png go (default reports/)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="speed/memory benchmark vs the plain Hugging Face pipeline -> reports/bench.{json,md}")
    p.add_argument("--out", default="reports")
    p.add_argument("--steps", type=int, default=12, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--members", type=int, default=5, help="ensemble size")
    p.add_argument("--quick", action="store_true", help="skip full fine-tuning and the bert-base-sized model")
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
    from .backbone import BackboneError
    from .data import DataError
    from .runs import AdapterError
    from .train import TrainingError

    try:
        return args.func(args, argv)
    except (ConfigError, DataError, AdapterError, BackboneError, TrainingError, FileExistsError,
            FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"peft-mtl: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
