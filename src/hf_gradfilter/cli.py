"""``hf-gradfilter``: the top floor. Each verb's flags are parsed into its dataclasses and passed to
one library call (`COMMANDS`); nothing below imports this module.

    hf-gradfilter demo   --output_dir demo_out                 # embedded default, offline
    hf-gradfilter score  --dataset_name tatsu-lab/alpaca --model_name_or_path gpt2 --output_dir out
    hf-gradfilter select --scored out/scored --ratio 0.1

Every ``GradFilterConfig`` / ``TrainingArguments`` field is a flag of ``score`` and ``demo``
(``--num_members``, ``--learning_rate``, ``--record_mode snapshot`` ...); ``--help`` lists them.
"""

from __future__ import annotations

import difflib
import os
import sys

from transformers import HfArgumentParser
from trl import SFTConfig

from .demo.backbone import DEMO_LEARNING_RATE
from .finetuning.finetune import FinetuneArguments, finetune_target
from .finetuning.judge import JudgeArguments, compare
from .finetuning.sft import sft_defaults
from .proxy.config import GradFilterConfig
from .publish.push import PushArguments, push
from .run.demo import DemoArguments, run_demo
from .run.pipeline import DEMO_RUN_DEFAULTS, RunArguments, run
from .run.report import ReportArguments, report
from .scores.score import ScoreArguments, score
from .scores.sweep import SweepArguments, sweep
from .selection.select import SelectArguments, select

COMMANDS = {  # verb: (help, the dataclasses its flags fill, the library call they are passed to)
    "score": ("Train the proxy ensemble on a dataset, record per-example gradient norms, write G-SNR columns.",
              (ScoreArguments, GradFilterConfig), score),
    "select": ("Keep the top fraction (or top k) of a scored dataset by a score column, globally or per group.",
               (SelectArguments,), select),
    "sweep": ("Re-score a record for a grid of (s, t, M'): rank correlations and detection AUROC, no training.",
              (SweepArguments, GradFilterConfig), sweep),
    "finetune": ("Fine-tune a target model (LoRA, TRL SFTTrainer) on a selected split.",
                 (FinetuneArguments, SFTConfig), finetune_target),
    "judge": ("Compare two fine-tuned targets with a pairwise LLM judge on instruction prompt sets.",
              (JudgeArguments,), compare),
    "push": ("Publish scored/selected data, the proxy ensemble or a target adapter to the Hub, with a card.",
             (PushArguments,), push),
    "demo": ("Run score + select on the embedded demo dataset with a tiny proxy (offline, a few minutes on CPU).",
             (DemoArguments, GradFilterConfig), run_demo),
    "run": ("score -> select -> fine-tune -> (push) -> report in one command, from flags or --config run.yaml; "
            "finished stages are skipped.", (RunArguments, GradFilterConfig), run),
    "report": ("Rebuild report.md / report.html of a `run` output dir.", (ReportArguments,), report),
}


def _parse_run(rest: list[str]):
    """`run`'s arguments: TRL's `TrlParser` (``--config run.yaml``; flags override the file), and the
    ``--demo`` defaults (`pipeline.DEMO_RUN_DEFAULTS`) under both."""
    import yaml
    from trl import TrlParser

    parser = TrlParser((RunArguments, GradFilterConfig), prog="hf-gradfilter run", description=COMMANDS["run"][0])
    from_file = {}
    if rest[-1:] == ["--config"]:
        raise ValueError("--config needs the path of a YAML file of run flags, e.g. --config run.yaml.")
    if "--config" in rest[:-1]:
        path = rest[rest.index("--config") + 1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No config file {path!r} (--config takes a YAML file of run flags).")
        with open(path) as f:
            try:
                from_file = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ValueError(f"Config file {path!r} is not valid YAML ({getattr(err, 'problem', None) or err}"
                                 f"{where}); write one `flag_name: value` per line.") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"Config file {path!r} must be a YAML mapping of flag names to values.")
        known = {action.dest for action in parser._actions} | {"env"}  # TrlParser sets `env:` as variables
        unknown = [key for key in from_file if key not in known]
        if unknown:
            raise ValueError(f"Config file {path!r} has the key {unknown[0]!r}, which is not a flag of "
                             f"`hf-gradfilter run`{_did_you_mean(unknown[0], known)}; "
                             "`hf-gradfilter run --help` lists them.")
    demo_flag = "--demo" in rest and rest[rest.index("--demo") + 1:][:1] not in (["false"], ["False"])
    defaults = {"output_dir": "gradfilter_run"}
    if demo_flag or from_file.get("demo"):
        defaults.update(DEMO_RUN_DEFAULTS)
    parser.set_defaults_with_config(**defaults)
    i = rest.index("--config") if "--config" in rest[:-1] else len(rest)
    _check_flags(parser, "run", rest[:i] + rest[i + 2:])
    return parser.parse_args_and_config(rest)


def _did_you_mean(name: str, known) -> str:
    near = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def _check_flags(parser, command: str, args: list[str]) -> None:
    """Refuse an argument ``command`` does not take, naming it and the nearest flag (`HfArgumentParser` says only
    "Some specified arguments are not used by the HfArgumentParser: [...]")."""
    _, unknown = parser.parse_known_args(args)
    if unknown:
        flags = [s for action in parser._actions for s in action.option_strings]
        name = unknown[0].split("=")[0]
        what = (f"has no flag {name}{_did_you_mean(name, flags)}" if name.startswith("-")
                else f"takes no value {name!r} here (every value follows its flag)")
        raise ValueError(f"`hf-gradfilter {command}` {what}; `hf-gradfilter {command} --help` lists its flags.")


def _usage() -> str:
    lines = [f"usage: hf-gradfilter {{{','.join(COMMANDS)}}} [--help] [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (help_, _, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(f"hf-gradfilter: error: unknown command {command!r}", file=sys.stderr)
        return 2
    help_, types, call = COMMANDS[command]
    if command == "report" and rest and not rest[0].startswith("-"):  # `hf-gradfilter report DIR`
        rest = ["--output_dir", *rest]
    if command == "run" and not ("-h" in rest or "--help" in rest):  # --help: HfArgumentParser's, below
        try:
            run(*_parse_run(rest))
        except (ValueError, FileNotFoundError, TypeError, FloatingPointError, ImportError) as err:
            print(f"hf-gradfilter run: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser = HfArgumentParser(types, prog=f"hf-gradfilter {command}", description=help_)
    try:
        if GradFilterConfig in types:
            if "--output_dir" not in rest:
                default = {"demo": "demo_out", "sweep": "sweep_output"}.get(command, "gradfilter_output")
                rest += ["--output_dir", default]
            if command == "sweep" and "--demo" in rest and "--num_train_epochs" not in rest:
                rest += ["--num_train_epochs", "4"]
            if command == "demo" or (command == "sweep" and "--demo" in rest):
                for flag, value in (("--learning_rate", DEMO_LEARNING_RATE), ("--per_device_train_batch_size", 16)):
                    if flag not in rest:
                        rest += [flag, str(value)]
        if command == "finetune":
            defaults = {"output_dir": "gradfilter_target", **sft_defaults()}
            given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in rest if a.startswith("--")}
            rest += [x for k, v in defaults.items() if k not in given for x in (f"--{k}", str(v))]
        _check_flags(parser, command, rest)
        call(*parser.parse_args_into_dataclasses(rest))
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError, ImportError) as err:
        print(f"hf-gradfilter {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
