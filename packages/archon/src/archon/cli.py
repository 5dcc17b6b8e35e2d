"""The `archon` command line: `archon train CONFIG.yaml [--section.field=value ...]`, `archon rl ...`,
`archon export-hf CKPT OUT`, `archon export-adapter CKPT OUT`, `archon plot RUN_DIR ...`, `archon serve MODEL_DIR`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from archon.config.checks import check_config
from archon.config.fields import describe, load_config
from archon.config.schema import TrainConfig
from archon.errors import UserError, run_guarded, set_strict


def _fields_epilog(cls: type) -> str:
    rows = describe(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["config fields (YAML keys; override with --key=value or +key=value):"]
    for key, default, help_ in rows:
        lines.append(f"  {key:<{width}}  {help_} (default: {default})")
    return "\n".join(lines)


def _split_overrides(rest: list[str]) -> list[str]:
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise UserError(f"overrides must look like --section.field=value, got {bad[0]!r}")
    return rest


def _load(cls: type, path: str | None, rest: list[str]):
    return check_config(load_config(cls, path, _split_overrides(rest)))


def _global_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """`--debug` and `--strict` may stand anywhere on the line."""
    debug, strict = "--debug" in argv, "--strict" in argv
    return [a for a in argv if a not in ("--debug", "--strict")], debug, strict


def main(argv: list[str] | None = None) -> int:
    argv, debug, strict = _global_flags(list(sys.argv[1:] if argv is None else argv))
    from archon.rl_cli import RLConfig

    parser = argparse.ArgumentParser(prog="archon", description="Archon: PyTorch-native RL post-training engine",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of any failure")
    parser.add_argument("--strict", action="store_true", help="turn warnings into errors")
    sub = parser.add_subparsers(dest="command", metavar="{train,rl,serve,export-hf,export-adapter,plot}")
    p_train = sub.add_parser("train", help="language-model / SFT training", description=TrainConfig.__doc__,
                             epilog=_fields_epilog(TrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("config", nargs="?", help="YAML config file")
    p_rl = sub.add_parser("rl", help="GRPO / PPO (embedded sampler or rollout servers)", description=RLConfig.__doc__,
                          epilog=_fields_epilog(RLConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_rl.add_argument("config", nargs="?", help="YAML config file")
    p_exp = sub.add_parser("export-hf", help="convert a training checkpoint into an HF model directory")
    p_exp.add_argument("checkpoint", help="checkpoint root (uses `latest`) or a step directory")
    p_exp.add_argument("out", help="output HF directory")
    p_exp.add_argument("--model", help="HF config directory / config.json of the model (full-model checkpoints)")
    p_exp.add_argument("--dtype", default="bfloat16", help="export dtype (bfloat16 | float32)")
    p_exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p_exp.add_argument("--merge-lora", action="store_true",
                       help="a LoRA checkpoint: fold the adapter into the base weights (needs --config)")
    p_exp.add_argument("--config", help="with --merge-lora: the run's YAML (actor.path, actor.lora); "
                       "--actor.x=y overrides follow")
    p_ad = sub.add_parser("export-adapter", help="write the LoRA adapter of a training checkpoint as a PEFT adapter")
    p_ad.add_argument("checkpoint", help="checkpoint root (uses `latest`) or a step directory")
    p_ad.add_argument("out", help="output adapter directory (adapter_config.json + adapter_model.safetensors)")
    p_ad.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p_ad.add_argument("--config", required=True, help="the run's YAML (actor.path, actor.lora); --actor.x=y overrides "
                      "follow")
    p_plot = sub.add_parser("plot", help="draw metrics.jsonl curves of one or more runs into a PNG")
    p_plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    p_plot.add_argument("--keys", default="loss,reward", help="comma-separated metric keys, one panel each")
    p_plot.add_argument("--out", default="metrics.png", help="output PNG")
    p_exp.add_argument("--tokenizer", default="", help="tokenizer directory or builtin:qwen3 written into OUT with "
                       "generation_config.json (default: the tokenizer beside --model, if any)")
    from archon.serve.app import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="rollout server: SGLang's HTTP API on Archon's sampler"))
    parser.epilog = _fields_epilog(TrainConfig).replace("config fields", "`archon train` config fields", 1)
    args, rest = parser.parse_known_args(argv)
    # under torchrun, INFO lines come from rank 0 only (every rank would print the same step logs)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 1
    set_strict(strict)

    def command() -> None:
        if args.command == "train":
            from archon.train import run_train

            run_train(_load(TrainConfig, args.config, rest))
        elif args.command == "serve":
            from archon.serve.app import run_serve

            if rest:
                raise UserError(f"archon serve: unknown argument {rest[0]!r} (see archon serve --help)")
            run_serve(args)
        elif args.command == "rl":
            from archon.rl_cli import run_rl

            run_rl(_load(RLConfig, args.config, rest))
        elif args.command == "export-adapter":
            from archon.export_adapter import export_adapter

            export_adapter(args.checkpoint, args.out, args.config, _split_overrides(rest), overwrite=args.overwrite)
        elif args.command == "plot":
            from archon.plot import plot_runs

            plot_runs(args.runs, [k for k in args.keys.split(",") if k], args.out)
        elif args.merge_lora:
            from archon.export_adapter import export_merged

            if not args.config:
                raise UserError("export-hf --merge-lora needs --config RUN.yaml (the LoRA settings of the run)")
            export_merged(args.checkpoint, args.out, args.config, _split_overrides(rest), args.dtype,
                          overwrite=args.overwrite)
        else:
            if rest:
                raise UserError(f"export-hf: unknown argument {rest[0]!r} (see archon export-hf --help)")
            from archon.engine.checkpoint import export_checkpoint_to_hf

            if not args.model:
                raise UserError("export-hf needs --model CONFIG (or --merge-lora --config RUN.yaml for a LoRA run)")
            export_checkpoint_to_hf(args.checkpoint, args.out, args.model, args.dtype, args.tokenizer,
                                   overwrite=args.overwrite)

    return run_guarded(command, debug=debug)


if __name__ == "__main__":
    raise SystemExit(main())
