"""The `archon` command line: `archon train CONFIG.yaml [--section.field=value ...]`, `archon rl ...`,
`archon export-hf CKPT OUT`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from archon.config.fields import describe, load_config
from archon.config.schema import TrainConfig


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
        raise SystemExit(f"archon: overrides must look like --section.field=value, got {bad[0]!r}")
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from archon.rl_cli import RLConfig

    parser = argparse.ArgumentParser(prog="archon", description="Archon: PyTorch-native RL post-training engine",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,rl,export-hf}")
    p_train = sub.add_parser("train", help="language-model / SFT training", description=TrainConfig.__doc__,
                             epilog=_fields_epilog(TrainConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("config", nargs="?", help="YAML config file")
    p_rl = sub.add_parser("rl", help="GRPO / PPO with the embedded sampler", description=RLConfig.__doc__,
                          epilog=_fields_epilog(RLConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_rl.add_argument("config", nargs="?", help="YAML config file")
    p_exp = sub.add_parser("export-hf", help="convert a training checkpoint into an HF model directory")
    p_exp.add_argument("checkpoint", help="checkpoint root (uses `latest`) or a step directory")
    p_exp.add_argument("out", help="output HF directory")
    p_exp.add_argument("--model", required=True, help="HF config directory / config.json of the model")
    p_exp.add_argument("--dtype", default="bfloat16", help="export dtype (bfloat16 | float32)")
    p_exp.add_argument("--tokenizer", default="", help="tokenizer directory or builtin:qwen3 written into OUT with "
                       "generation_config.json (default: the tokenizer beside --model, if any)")
    parser.epilog = _fields_epilog(TrainConfig).replace("config fields", "`archon train` config fields", 1)
    args, rest = parser.parse_known_args(argv)
    # under torchrun, INFO lines come from rank 0 only (every rank would print the same step logs)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 1
    try:
        if args.command == "train":
            from archon.train import run_train

            run_train(load_config(TrainConfig, args.config, _split_overrides(rest)))
        elif args.command == "rl":
            from archon.rl_cli import run_rl

            run_rl(load_config(RLConfig, args.config, _split_overrides(rest)))
        else:
            from archon.engine.checkpoint import export_checkpoint_to_hf

            export_checkpoint_to_hf(args.checkpoint, args.out, args.model, args.dtype, args.tokenizer)
    except ValueError as e:
        print(f"archon: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
