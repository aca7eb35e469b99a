"""The ``fractalformer`` command: train, eval, sample, extract, export, speculate, analyze, serve,
merge, grow.

Thin by design: parse arguments, call the library, print. Any :class:`FractalError`
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import FractalError, UnknownCharacterError
from .presets import PRESETS

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from .loading import TrainedModel

def _windows(s: str) -> int:
    """``--windows``: a count of windows, or ``all`` (0: no limit)."""
    if s == "all":
        return 0
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of windows or 'all', got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 window, got {v}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr and exit status 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option that has one; epilogs (the examples) printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
        prog="fractalformer", formatter_class=_Help,
        description="Self-similar (fractal) nested transformers: train, inspect and run them.",
        epilog=_examples("fractalformer train --preset tiny --out runs/tiny", "fractalformer eval runs/tiny",
                         'fractalformer sample runs/tiny --prompt "ROMEO:"', "fractalformer COMMAND --help"))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)
    common.add_argument("--threads", type=_positive_int, metavar="N",
                        help="CPU threads (unset: OMP_NUM_THREADS, else every core; train divides them "
                             "among its torchrun processes)")
    run = _Parser(add_help=False, parents=[common])
    run.add_argument("run", metavar="RUN", help="run folder written by fractalformer train")
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                     help="where the model runs (auto: CUDA when available; mps: Apple GPUs)")
    run.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                     help="auto: bf16 autocast on CUDA, fp32 on CPU")

    def command(name: str, about: str, *examples: str, parent: argparse.ArgumentParser = run
                ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=about, description=about, parents=[parent], formatter_class=_Help,
                              epilog=_examples(*examples) if examples else None)

    t = command("train", "train a model (or continue one with --resume)", "fractalformer train",
                "fractalformer train --preset tiny --out runs/tiny",
                "fractalformer train --config my.toml --set lr=1e-3 --print-config",
                "fractalformer train --out runs/tiny --resume --max-steps 40", parent=common)
    t.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                   help="base configuration: " + ", ".join(PRESETS) + " (unset: the config file's "
                        "preset key, else default)")
    t.add_argument("--config", metavar="FILE.toml",
                   help="TOML file of config keys (flat, or [model], [model.moe], ... and [train] tables), "
                        "applied on the preset")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, last (repeatable; fractalformer config lists the keys)")
    t.add_argument("--data", help="UTF-8 text file or a `fractalformer prepare` folder (unset: the shipped "
                                  "TinyShakespeare)")
    t.add_argument("--tokenizer", metavar="NAME",
                   help="bpe128, char, byte, bpe:N or gpt2 (unset: bpe128; a prepared folder's own)")
    t.add_argument("--out", help="run folder (unset: runs/<preset>-<time>)")
    t.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="training steps, the schedule's horizon (with --resume: extend the run to N)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved config")
    t.add_argument("--init-from", metavar="RUN", help="fine-tune: start from RUN's weights with a fresh "
                   "optimizer (RUN's model config and tokenizer unless --tokenizer)")
    t.add_argument("--stop-after", type=_positive_int, metavar="N",
                   help="save and stop after N steps of this invocation, keeping the schedule")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML (usable as --config) and exit")
    t.add_argument("--quiet", action="store_true",
                   help="print only the final validation figures (no bar, no evaluations, no samples)")

    e = command("eval", "validation loss and bits/char of every sub-model of a run",
                "fractalformer eval runs/x --json", "fractalformer eval runs/x --data elsewhere/input.txt")
    e.add_argument("--json", action="store_true", help="print a JSON list of rows")
    e.add_argument("--data", help="score all of this text file instead of the run's own validation split "
                   "(the run's own text, moved: its split as usual; a prepared folder: its validation split)")
    e.add_argument("--windows", type=_windows, metavar="N|all",
                   help="score the first N windows of block_size tokens, or all (unset: with --data all; "
                        "else the windows train scored at the end, by default as many as it trained on)")
    e.add_argument("--mix", metavar="LEVELS", help=MIX_HELP)

    s = command("sample", "generate text from a run", 'fractalformer sample runs/x --prompt "ROMEO:"',
                "fractalformer sample runs/x --level 2 --index 3 --temperature 0 --seed 1",
                "fractalformer sample runs/x --level 1 --ensemble",
                "fractalformer sample runs/x --prompt-file prompt.txt --num-samples 3 --seed 1")
    _sampling_args(s, temperature=True)
    s.add_argument("--num-samples", type=_positive_int, default=1, metavar="N",
                   help="samples to draw, one after another (with --seed S: seeds S, S+1, ...)")
    s.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster per token once compiled, but the compile "
                        "can take minutes on a CPU (roughly 1-2 min), so it pays only for long samples")
    s.add_argument("--level", type=int, default=0, help="sub-model level (0 = the full model)")
    s.add_argument("--index", type=int, help="sub-model index within the level (unset: 0)")
    s.add_argument("--ensemble", action="store_true",
                   help="sample the whole level as one ensemble (mean of log-probabilities)")
    s.add_argument("--mix", metavar="LEVELS", help=MIX_HELP)

    sp = command("speculate", "speculative decoding with nested sub-models as drafts",
                 'fractalformer speculate runs/x --draft 2:0 --prompt "ROMEO:" --compare',
                 "fractalformer speculate runs/x --draft 2:0 --draft 2:1 --gamma 4 --temperature 0.8 --json")
    sp.epilog += "\n\n" + SPEC_STATS_HELP
    sp.add_argument("--draft", action="append", required=True, metavar="L:J",
                    help="a draft sub-model (repeatable: several drafts propose in parallel)")
    sp.add_argument("--target", default="0:0", metavar="L:J", help="the model that speaks")
    sp.add_argument("--gamma", type=int, default=4, help="tokens drafted per round (the maximum if adaptive)")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature instead")
    _sampling_args(sp, temperature=False)
    sp.add_argument("--no-adaptive", action="store_true", help="always draft gamma tokens")
    sp.add_argument("--confidence", type=float, default=0.0,
                    help="a draft stops a round early at a token it gives less probability (0: never)")
    sp.add_argument("--compare", action="store_true",
                    help="also time plain KV-cache decoding (both passes after an untimed warm-up of each)")
    sp.add_argument("--compile", action="store_true",
                    help="torch.compile drafts and target (and the --compare run): long outputs, one draft")
    sp.add_argument("--json", action="store_true", help="print the text and statistics as JSON")

    an = command("analyze", "embedding similarity, clusters, losses, consistency -> RUN/analysis/report.html",
                 "fractalformer analyze runs/x", "fractalformer analyze runs/x --data elsewhere/input.txt")
    an.add_argument("--windows", type=_positive_int, default=16,
                    help="validation windows used for the consistency figures")
    an.add_argument("--data", help="score this text instead of the run's own (which must be unchanged)")

    x = command("extract", "save one sub-model as a standalone dense run folder",
                "fractalformer extract runs/x --level 1 --index 0 --out runs/half",
                "fractalformer extract runs/x --mix 0,1,1,2 --out runs/mix")
    x.add_argument("--level", type=int, help="level of the sub-model")
    x.add_argument("--index", type=int, help="index of the sub-model within its level")
    x.add_argument("--mix", metavar="LEVELS", help=MIX_HELP)
    x.add_argument("--out", required=True, help="new run folder (resumable with train --resume)")

    pr = command("prepare", "tokenize text files into a memory-mapped corpus for train --data DIR",
                 "fractalformer prepare corpus/ --tokenizer bpe:4096 --out data/corpus",
                 "fractalformer train --preset 10m --data data/corpus",
                 "fractalformer prepare :stdlib --split files --tokenizer bpe:4096 --out data/stdlib",
                 parent=common)
    pr.add_argument("data", nargs="+", help="text files and/or folders (every file under them, sorted); "
                                            ":stdlib = this Python's standard library sources (*.py)")
    pr.add_argument("--tokenizer", default="byte",
                    help="byte or bpe:N (any text), char (the corpus' characters), bpe128 or gpt2")
    pr.add_argument("--out", required=True, help="new folder for tokens.bin and manifest.json")
    pr.add_argument("--unknown", choices=("error", "replace"), default="error",
                    help="characters the tokenizer lacks: error, or replace with '?'")
    pr.add_argument("--split", choices=("tokens", "files"), default="tokens",
                    help="validation split: the last 10%% of tokens, or whole files (about one in ten, "
                         "by a hash of each file's path)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")

    ex = command("export", "a Hugging Face (Llama) folder of a run or one sub-model (needs the hf extra)",
                 "fractalformer export runs/x --out hf/x",
                 "fractalformer export runs/x --level 2 --index 1 --out hf/x-2-1", parent=common)
    ex.add_argument("run", metavar="RUN", help="run folder written by fractalformer train")
    ex.add_argument("--level", type=int, help="export sub-model (level, index) instead of the full model")
    ex.add_argument("--index", type=int, help="index of the sub-model within its level")
    ex.add_argument("--mix", metavar="LEVELS", help=MIX_HELP)
    ex.add_argument("--out", required=True, help="new folder for AutoModelForCausalLM.from_pretrained")

    mg = command("merge", "glue trained runs into a wider FractalFormer (frozen children, then all)",
                 "fractalformer merge runs/a runs/b --out runs/ab --train-glue-steps 200 --then-steps 400",
                 "fractalformer merge runs/a runs/b --out runs/ab --train-glue-steps 200 --glue-rank 8",
                 parent=common)
    mg.add_argument("runs", nargs="+", metavar="RUN", help="runs of one shape: the level-1 sub-models")
    mg.add_argument("--out", required=True, help="new run folder for the merged model")
    mg.add_argument("--train-glue-steps", type=_positive_int, default=0, metavar="N",
                    help="train only the glue (off-diagonal blocks) for N steps, the children frozen")
    mg.add_argument("--then-steps", type=_positive_int, default=0, metavar="M",
                    help="then train everything for M steps (a new warmup + cosine schedule)")
    mg.add_argument("--attn-nesting", choices=("heads", "head_dim"), default="heads",
                    help="attention nesting of the merged model when the runs are dense")
    mg.add_argument("--glue-rank", type=_positive_int, default=0, metavar="R",
                    help="glue as rank-R maps between the blocks, folded into the weights after the glue "
                         "steps (0: the off-diagonal blocks themselves)")
    mg.add_argument("--routing", choices=("shared", "split", "shard"),
                    help="data routing of the merged run (unset: shard when run j trained on data_shard "
                         "j/N, else shared)")
    _train_on_args(mg, "merged")

    gr = command("grow", "function-preserving growth: the run becomes sub-model (1, 0) of a wider one "
                 "(family concept: one more concept level on top)",
                 "fractalformer grow runs/x --width 2 --out runs/x2",
                 "fractalformer grow runs/x --width 2 --depth 2 --out runs/x2d2 --steps 400 --set lr=1e-3",
                 "fractalformer grow runs/concept --combo 4 --out runs/concept-grown --steps 400",
                 parent=common)
    gr.add_argument("run", metavar="RUN", help="run folder written by fractalformer train")
    gr.add_argument("--width", type=_positive_int,
                    help="width factor (the split, >= 2); required unless RUN is family concept")
    gr.add_argument("--depth", type=_positive_int,
                    help="depth factor (identity layers inserted; default: 1); not for family concept")
    gr.add_argument("--combo", type=_positive_int,
                    help="family concept only: units of the old top level per new concept (default: 4)")
    gr.add_argument("--out", required=True, help="new run folder for the grown model")
    gr.add_argument("--steps", type=_positive_int, default=0, help="then train for this many steps")
    _train_on_args(gr, "grown")

    sv = command("serve", "HTTP API and a page for every sub-model (batched; needs the serve extra)",
                 "fractalformer serve runs/x --port 8000",
                 "FRACTALFORMER_API_KEY=KEY fractalformer serve runs/x --host 0.0.0.0 --allow-host box.lan",
                 parent=common)
    sv.add_argument("run", metavar="RUN", help="run folder written by fractalformer train")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    sv.add_argument("--max-batch", type=_positive_int, default=16, help="requests decoded together")
    sv.add_argument("--queue-size", type=_positive_int, default=64,
                    help="requests that may wait beyond those; more are refused with 503")
    sv.add_argument("--max-tokens", type=_positive_int, default=1024, help="the most tokens one request gets")
    sv.add_argument("--max-prompt-chars", type=_positive_int, default=8192,
                    help="the longest prompt accepted, in characters")
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a Host name requests may give besides the --host address, localhost and IP "
                         "addresses (repeatable; '*': any; other names are refused against DNS rebinding)")
    sv.add_argument("--api-key", metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1/ (unset: FRACTALFORMER_API_KEY, else "
                         "none); for a server reachable beyond this machine")
    sv.add_argument("--mix", metavar="LEVELS", help=MIX_HELP)

    c = command("config", "list every config key with its value in a preset and what it means",
                "fractalformer config", "fractalformer config --preset dense", parent=common)
    c.add_argument("--preset", choices=list(PRESETS), default="default", metavar="NAME",
                   help="whose values to show: " + ", ".join(PRESETS))
    return p


MIX_HELP = ("a Mix'n'Match model of a FractalFormer: a level per layer (0,1,1,2) or per part "
            "(attention:MLP, 0:1,...), each part keeping its level's block diagonal")


def _train_on_args(p: argparse.ArgumentParser, made: str) -> None:
    """merge / grow: the options of the training that follows (read back by :func:`_with_threads`)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a training key of the {made} run (lr, batch_size, ...; repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sampling_args(p: argparse.ArgumentParser, temperature: bool) -> None:
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    given.add_argument("--prompt-file", metavar="FILE", help="continue this UTF-8 file's text instead")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200, help="tokens to generate")
    if temperature:
        p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only")
    p.add_argument("--top-p", type=float, help="sample among the likeliest tokens holding this probability")
    p.add_argument("--seed", type=int, help="seed of the sampling, 0 .. 2^63 - 1 (unset: a fresh one)")
    p.add_argument("--unknown", choices=("error", "replace"), default="error",
                   help="prompt characters the tokenizer lacks: error, or replace with '?' (the echo "
                        "shows what the model saw)")


SPEC_STATS_HELP = """statistics (printed after the text, on stderr; --json puts them beside the text):
  alpha                   share of drafted tokens the target accepted (per position)
  tokens_per_target_call  tokens emitted per forward pass of the target (1 = no gain)
  cost_ratio_c            time of one draft step / time of one verification round
  target_calls            forward passes of the target (verification rounds + plain steps)
  rounds                  draft-and-verify rounds
  draft_calls             draft steps (every draft once per step)
  tokens                  tokens emitted
  plain_tokens            of those, decoded plainly (the adaptive policy's choice, or past the context)
  mean_gamma              mean tokens drafted per round
  tokens_per_s            emitted tokens per second of wall time
  plain_tokens_per_s      --compare: plain KV-cache decoding of the same request
  speedup                 --compare: tokens_per_s / plain_tokens_per_s"""


def cmd_train(a: argparse.Namespace) -> int:
    from .config import to_toml
    from .memory import check_training_fits
    from .resolve import resolve_run_config
    from .runs import check_run_dir, load_run_config
    from .train import train

    if a.resume:
        if not a.out:
            raise FractalError("--resume needs --out RUN_DIR")
        if a.preset or a.config or a.set or a.data or a.tokenizer or a.init_from:
            raise FractalError("--resume continues a run with its saved config; only --max-steps, "
                               "--stop-after, --threads and --quiet may be given")
        check_run_dir(Path(a.out), resume=True)
        cfg, _ = load_run_config(Path(a.out))
    else:
        cfg = resolve_run_config(a.preset, a.config, a.set, data=a.data, tokenizer=a.tokenizer,
                                 init_from=a.init_from)
    if a.max_steps is not None:
        if a.max_steps < 1:
            raise FractalError("--max-steps must be at least 1")
        cfg.train.max_steps = a.max_steps
    if a.threads is not None:
        cfg.train.threads = a.threads
    if a.print_config:
        print(to_toml(cfg), end="")
        return 0
    check_training_fits(cfg)
    base = a.preset or (Path(a.config).stem if a.config else "default")
    out = Path(a.out or f"runs/{base}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(cfg, out, resume=a.resume, stop_after=a.stop_after, progress=not a.quiet)
    code = 130 if result.stopped == "interrupted" else 0
    if not result.main:  # under torchrun rank 0 alone reports
        return code
    if result.stopped == "complete":
        print(f"the run in {out} is complete (step {result.step} of {result.step}); nothing to do "
              f"(extend it with --resume --max-steps N)")
        return 0
    if result.stopped != "done":
        why = "interrupted" if result.stopped == "interrupted" else "stopped"
        print(f"{why} at step {result.step}; saved to {out}. Continue with: "
              f"fractalformer train --out {out} --resume")
        return code
    if result.final and len(result.final) == 1:
        f = result.final[0]
        print(f"validation {f.val_loss:.4f} nats/token | {f.val_bpc:.4f} bits/{f.unit} | "
              f"{f.nats_per_char:.4f} nats/{f.unit} {f.coverage}")
        if f.extra:
            print(_usage_line(f.extra))
    elif result.final:
        print("validation of every sub-model:")
        _print_rows(result.final)
    if a.quiet:
        return 0
    print(f"curves: {out / 'curves.png'}")
    if cfg.train.sample_tokens:
        import fractalformer

        trained = fractalformer.load(out)
        subs = cfg.model.sub_models()
        for level, index in subs:
            print(f"--- sample from sub-model ({level}, {index}), width {trained.model.level_width(level)}:"
                  if len(subs) > 1 else "--- sample:")
            _stream(trained, "\n", max_new_tokens=cfg.train.sample_tokens, seed=0, on_unknown="replace",
                    level=level, index=index)
    return 0


def _load(a: argparse.Namespace) -> TrainedModel:
    """The run's model on ``--device``, with its tokenizer and config."""
    import fractalformer

    from .device import pick_device

    return fractalformer.load(a.run, pick_device(a.device), mix=getattr(a, "mix", None))


def _precision(a: argparse.Namespace, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """``--dtype``: bf16 autocast (auto: on CUDA only), or nothing."""
    from .device import autocast

    return autocast(next(model.parameters()).device.type, a.dtype)


def cmd_eval(a: argparse.Namespace) -> int:
    from .data.corpus import read_text, text_sha256
    from .data.prepared import is_prepared
    from .evaluate import closing_windows, evaluate_full, text_corpus
    from .runs import run_data

    trained = _load(a)
    model, cfg = trained.model, trained.run_config
    text = None if a.data is None or is_prepared(a.data) else read_text(a.data)
    own = text is None or text_sha256(text) == _data_sha256(a.run)  # the run's data, perhaps moved
    if own:
        corpus = run_data(a.run, cfg, trained.tokenizer, a.data)
    else:  # another text named for scoring is scored whole
        corpus = text_corpus(text, trained.tokenizer, cfg.train.on_unknown)
    if a.windows is not None:
        windows = a.windows
    else:  # the run's own split as train scored it at the end; another text or a corpus in full
        windows = closing_windows(cfg.train) if own and (a.data is None or text is not None) else 0
    with _precision(a, model):
        rows = evaluate_full(model, corpus, cfg.model.block_size, next(model.parameters()).device,
                             windows_limit=windows)
    if a.json:
        print(json.dumps([r.to_json() for r in rows]))
        return 0
    _print_rows(rows)
    if rows[0].tokens < rows[0].split_tokens:
        print("(--windows all scores the whole split)")
    return 0


def _print_rows(rows: list) -> None:
    """Validation rows (evaluate.EvalRow) as a table."""
    unit = rows[0].unit
    print(f"{'level':>5} {'index':>8} {'width':>6} {'params':>10} {'val_loss':>9} {'val_bp' + unit[0]:>8}")
    for r in rows:
        print(f"{r.level:>5} {r.index!s:>8} {r.width:>6} {r.params:>10,} {r.val_loss:>9.4f} "
              f"{r.val_bpc:>8.4f}")
    print(f"(loss in nats/token, bits per {unit}; {rows[0].coverage})")
    if rows[0].extra:
        print(_usage_line(rows[0].extra))


def _usage_line(u: dict) -> str:
    line = (f"experts: {u['expert_usage']:.1%} used, KL from uniform {u['expert_kl']:.3f} nats, "
            f"{u['dead_experts']:.1%} dead (mean over sparse layers)")
    if "mean_depth" in u:
        line += (f"; fractal experts: mean depth {u['mean_depth']:.2f}, {u['compute_saved']:.1%} of "
                 "sub-blocks skipped")
    return line


def _stream(trained: TrainedModel, prompt: str, **kwargs: Any) -> None:
    """Echo what the model sees of ``prompt`` (after any replacement), then stream its continuation."""
    pieces = trained.stream(prompt, **kwargs)  # checks every argument before anything is printed
    tok = trained.tokenizer
    sys.stdout.write(tok.decode(tok.encode(prompt, on_unknown=kwargs.get("on_unknown", "error"))))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _prompt(a: argparse.Namespace) -> str:
    """``--prompt``, or the text of ``--prompt-file``."""
    if a.prompt_file is None:
        return a.prompt
    try:
        return Path(a.prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FractalError(f"--prompt-file {a.prompt_file} is not UTF-8 text") from None
    except OSError as e:
        raise FractalError(f"cannot read --prompt-file {a.prompt_file}: {e.strerror}") from None


def cmd_sample(a: argparse.Namespace) -> int:
    from .generate.sampling import SEED_LIMIT, check_sampling

    if a.ensemble and a.index is not None:
        raise FractalError("--ensemble samples the whole level, --index one sub-model: give one of them")
    if a.mix is not None and (a.ensemble or a.index is not None or a.level):
        raise FractalError("--mix is a model of its own: give it without --level, --index or --ensemble")
    if a.num_samples < 1:
        raise FractalError("--num-samples must be at least 1")
    check_sampling(a.temperature, a.top_k, a.top_p, a.seed)  # before the model loads
    prompt = _prompt(a)
    trained = _load(a)
    with _precision(a, trained.model):
        for i in range(a.num_samples):
            if i:
                print("-" * 15)
            _stream(trained, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, seed=None if a.seed is None else (a.seed + i) % SEED_LIMIT,
                    on_unknown=a.unknown, use_cache=not a.no_cache, compile=a.compile, level=a.level,
                    index="ensemble" if a.ensemble else a.index or 0)
    return 0


def cmd_speculate(a: argparse.Namespace) -> int:
    from .generate import SpecStats, generate, speculate
    from .generate.sampling import check_sampling
    from .generate.speculative import check_speculation, parse_sub_model

    temperature = a.temperature if a.temperature is not None else 0.0
    check_sampling(temperature, a.top_k, a.top_p, a.seed)
    prompt = _prompt(a)
    trained = _load(a)
    model, tok = trained.model, trained.tokenizer
    drafts = [parse_sub_model(d, model) for d in a.draft]
    target = parse_sub_model(a.target, model)
    ids = tok.encode(prompt, on_unknown=a.unknown)
    check_speculation(model, drafts, target, a.gamma, ids, a.confidence)  # errors before the echo

    def spec(n: int, stats: SpecStats) -> Iterator[int]:
        return speculate(model, ids, n, drafts, a.gamma, target, temperature, a.top_k, a.top_p, a.seed,
                         adaptive=not a.no_adaptive, confidence=a.confidence, stats=stats, compile=a.compile)

    def plain(n: int) -> Iterator[int]:
        return generate(model, ids, n, temperature, a.top_k, a.top_p, a.seed, level=target[0],
                        index=target[1], compile=a.compile)

    stats = SpecStats()
    decode = tok.stream_decoder()
    seen = tok.decode(ids)
    out = []
    with _precision(a, model):
        if a.compare:  # both timed warm: a first pass pays for allocations (and compiles) alone
            warm = min(a.max_new_tokens, 16)
            for _ in spec(warm, SpecStats()):
                pass
            for _ in plain(warm):
                pass
        t0 = time.perf_counter()
        if not a.json:
            sys.stdout.write(seen)
        for i in spec(a.max_new_tokens, stats):
            out.append(decode(i))
            if not a.json:
                sys.stdout.write(out[-1])
                sys.stdout.flush()
        elapsed = time.perf_counter() - t0
        report = {**stats.to_json(), "tokens_per_s": round(stats.tokens / elapsed, 1)}
        if a.compare:
            t0 = time.perf_counter()
            n = sum(1 for _ in plain(a.max_new_tokens))
            report["plain_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
            report["speedup"] = round(report["tokens_per_s"] / report["plain_tokens_per_s"], 3)
    if a.json:
        print(json.dumps({"text": seen + "".join(out), **report}))
    else:
        print("\n" + " | ".join(f"{k} {v}" for k, v in report.items()), file=sys.stderr)
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from .analysis.report import analyze
    from .device import pick_device

    report = analyze(a.run, max(1, a.windows), data=a.data, device=pick_device(a.device), dtype=a.dtype)
    print(f"report: {report}")
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    from .config import RunConfig
    from .growth import write_new_run
    from .runs import check_run_dir, claim_run_dir

    out = Path(a.out)
    if (a.mix is None) == (a.level is None or a.index is None) or (a.mix is not None and a.level is not None):
        raise FractalError("extract one sub-model (--level L --index J) or one mix (--mix LEVELS)")
    check_run_dir(out, resume=False)
    trained = _load(a)
    sub = (trained.model if a.mix is not None else trained.model.extract(a.level, a.index)).cpu()
    train = dataclasses.replace(trained.run_config.train, groups="", emergent_every=0, routing="shared",
                                freeze="none", schedule_start=0)
    cfg = RunConfig(sub.config, train)
    cfg.validate()
    with claim_run_dir(out, resume=False):
        write_new_run(out, cfg, sub, trained.tokenizer, _data_sha256(a.run))
    used = f"{trained.mix_params:,} of " if a.mix else ""
    what = f"mix {a.mix}" if a.mix else f"sub-model ({a.level}, {a.index})"
    print(f"extracted {what}: {used}{sub.num_params():,} parameters, width {sub.config.d_model} -> {out}")
    return 0


def _with_threads(a: argparse.Namespace) -> list[str]:
    """merge / grow: ``--set`` overrides, with ``--threads`` as the trained run's threads key."""
    return [*a.set, f"threads={a.threads}"] if a.threads is not None else a.set


def cmd_merge(a: argparse.Namespace) -> int:
    from .growth import merge_runs

    model = merge_runs(a.runs, a.out, a.train_glue_steps, a.then_steps, a.attn_nesting, a.routing,
                       a.glue_rank, _with_threads(a), not a.quiet)
    c = model.config
    print(f"merged {len(a.runs)} runs -> {a.out}: FractalFormer d_model {c.d_model}, levels "
          f"{c.nesting.levels}, "
          f"{model.num_params():,} parameters ({model.num_params(1):,} per child; "
          f"glue steps {a.train_glue_steps}, full steps {a.then_steps})")
    return 0


def cmd_grow(a: argparse.Namespace) -> int:
    from .growth import grow_concept_run, grow_run
    from .runs import load_run_config

    run = Path(a.run)
    family = load_run_config(run)[0].model.family
    if family == "concept":  # a concept run grows one more concept level on top
        if a.width is not None or a.depth is not None:
            raise FractalError("--width / --depth grow dense or fractal runs; a family concept run grows a "
                               "concept level on top (--combo C)")
        grown = grow_concept_run(run, a.out, 4 if a.combo is None else a.combo, a.steps, _with_threads(a),
                                 not a.quiet)
        c = grown.config
        combo = ",".join(map(str, c.concept.combo))
        print(f"grown to {c.concept.levels} concept levels (combo {combo}): {grown.num_params():,} "
              f"parameters -> {a.out}")
        return 0
    if a.combo is not None:
        raise FractalError(f"--combo adds a concept level: it needs a family=concept run, not family "
                           f"{family} (use --width K [--depth D])")
    if a.width is None:
        raise FractalError(f"grow needs --width K (>= 2) for a family {family} run")
    depth = 1 if a.depth is None else a.depth
    f = grow_run(run, a.out, a.width, depth, a.steps, _with_threads(a), not a.quiet)
    print(f"grown x{a.width} wide, x{depth} deep -> {a.out}; validation at the growth step: original "
          f"{f['original_val_loss']:.6f} nats/token ({f['original_val_bpc']:.4f} bits/char), grown "
          f"{f['grown_val_loss']:.6f} ({f['grown_val_bpc']:.4f}); difference "
          f"{abs(f['grown_val_loss'] - f['original_val_loss']):.2e}")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from .config import check_tokenizer_name
    from .data.prepared import prepare

    check_tokenizer_name(a.tokenizer)
    m = prepare(a.data, a.tokenizer, a.out, a.unknown, progress=not a.quiet, split=a.split)
    print(f"prepared {len(m['files'])} file(s), {m['bytes']:,} bytes -> {m['count']:,} {a.tokenizer} tokens "
          f"({m['train_count']:,} train, {m['val_units_per_token']:.3f} {m['unit']}s per validation token) "
          f"in {a.out}; train with --data {a.out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import fractalformer

    from .export import export

    out = Path(a.out)
    if out.exists():
        raise FractalError(f"{out} already exists; choose another --out")
    if a.mix is not None and (a.level is not None or a.index is not None):
        raise FractalError("export either a sub-model (--level, --index) or a mix (--mix), not both")
    trained = fractalformer.load(a.run, mix=a.mix)
    dense = export(trained.model, trained.tokenizer, out, a.level, a.index)
    what = (f"mix {a.mix}" if a.mix else "the model" if a.level is None
            else f"sub-model ({a.level}, {a.index})")
    print(f"exported {what}: "
          f"{dense.num_params():,} parameters, width {dense.config.d_model} -> {out} "
          f"(transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _data_sha256(run: str) -> str | None:
    from .runs import load_data_sha256

    return load_data_sha256(Path(run))


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve import Limits, serve
    except ImportError as e:
        raise FractalError(f"fractalformer serve needs the serve extra ({e.name} is missing): "
                           f"pip install 'fractalformer[serve]'") from None
    if min(a.max_batch, a.queue_size, a.max_tokens, a.max_prompt_chars) < 1:
        raise FractalError("--max-batch, --queue-size, --max-tokens and --max-prompt-chars must be "
                           "at least 1")
    serve(a.run, a.host, a.port, Limits(a.max_tokens, a.max_prompt_chars, a.max_batch, a.queue_size),
          allow_hosts=a.allow_host, mix=a.mix,
          api_key=a.api_key if a.api_key is not None else os.environ.get("FRACTALFORMER_API_KEY") or None)
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    from .config import build_config, describe_keys, get_value

    cfg = build_config(a.preset)
    rows = describe_keys()
    width = max(len(r[1]) for r in rows)
    for section, key, _, about in rows:
        value = get_value(cfg, f"{section}.{key}")
        shown = "unset" if value is None else json.dumps(value) if isinstance(value, (str, list, bool)) \
            else repr(value)
        print(f"{section:<5} {key:<{width}} {shown:<10} {about}")
    return 0


UNKNOWN_ADVICE = {  # command -> how its options replace unknown characters, and another way out
    "prepare": ("--unknown replace", "--tokenizer byte or bpe:N takes any text"),
    "train": ("--set on_unknown=replace", "--tokenizer byte, char or bpe:N takes any text"),
    "sample": ("--unknown replace", None), "speculate": ("--unknown replace", None),
    "grow": ("--set on_unknown=replace", None), "merge": ("--set on_unknown=replace", None),
    "eval": ("a run trained with --set on_unknown=replace", None),
    "analyze": ("a run trained with --set on_unknown=replace", None)}


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage mistake (2): a status, not an exception
        return e.code if isinstance(e.code, int) else 2
    warnings.formatwarning = _warning_line  # library warnings as one line each
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise FractalError("--threads must be at least 1")
            if args.command != "train":  # train shares them among its processes itself
                import torch

                torch.set_num_threads(args.threads)
        commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "extract": cmd_extract,
                    "speculate": cmd_speculate, "analyze": cmd_analyze, "serve": cmd_serve,
                    "config": cmd_config, "export": cmd_export, "prepare": cmd_prepare,
                    "merge": cmd_merge, "grow": cmd_grow}
        return commands[args.command](args)
    except UnknownCharacterError as e:
        print(f"error: {e.advice(*UNKNOWN_ADVICE[args.command]) if args.command in UNKNOWN_ADVICE else e}",
              file=sys.stderr)
        return 2
    except FractalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a fault of the machine (a full disk, a lost mount): one line too
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
