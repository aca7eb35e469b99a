"""The ``fractalformer`` command: train, eval, sample, extract, speculate, analyze, serve,
merge, grow.

Thin by design: parse arguments, call the library, print. Any :class:`FractalError`
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PRESETS
from .errors import FractalError

if TYPE_CHECKING:
    import torch


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalformer", description="Self-similar transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (or --resume one)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help="named configuration: " + ", ".join(PRESETS))
    src.add_argument("--config", metavar="FILE.toml", help="TOML file of config keys")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    t.add_argument("--data", help="UTF-8 text file to train on (default: shipped TinyShakespeare)")
    t.add_argument("--tokenizer", help="bpe128 (default), char or byte")
    t.add_argument("--out", help="run folder (default: runs/<preset>-<time>)")
    t.add_argument("--max-steps", type=_positive_int, help="training steps (the schedule's horizon)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-after", type=_positive_int, metavar="N",
                   help="save and stop after N steps of this invocation, keeping the schedule")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="validation loss and bits/char of a run")
    e.add_argument("run")
    e.add_argument("--json", action="store_true", help="print a JSON list of rows")

    s = sub.add_parser("sample", help="generate text from a run")
    s.add_argument("run")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=_positive_int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--unknown", choices=("error", "replace"), default="error",
                   help="what to do with prompt characters the tokenizer lacks")
    s.add_argument("--no-cache", action="store_true", help="recompute the context every token")
    s.add_argument("--level", type=int, default=0, help="sub-model level (0 = the full model)")
    s.add_argument("--index", type=int, default=0, help="sub-model index within the level")
    s.add_argument("--ensemble", action="store_true",
                   help="sample the whole level as one ensemble (mean of log-probabilities)")

    sp = sub.add_parser("speculate", help="speculative decoding with nested sub-models as drafts")
    sp.add_argument("run")
    sp.add_argument("--draft", action="append", required=True, metavar="L:J",
                    help="a draft sub-model (repeatable: several drafts propose in parallel)")
    sp.add_argument("--target", default="0:0", metavar="L:J", help="the model that speaks (default 0:0)")
    sp.add_argument("--gamma", type=int, default=4, help="tokens drafted per round (the maximum if adaptive)")
    sp.add_argument("--prompt", default="\n")
    sp.add_argument("--max-new-tokens", type=_positive_int, default=200)
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature instead")
    sp.add_argument("--top-k", type=int)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--no-adaptive", action="store_true", help="always draft gamma tokens")
    sp.add_argument("--confidence", type=float, default=0.0,
                    help="a draft stops a round early at a token it gives less probability (0: never)")
    sp.add_argument("--unknown", choices=("error", "replace"), default="error",
                    help="what to do with prompt characters the tokenizer lacks")
    sp.add_argument("--compare", action="store_true", help="also time plain KV-cache decoding")
    sp.add_argument("--json", action="store_true", help="print the text and statistics as JSON")

    an = sub.add_parser("analyze", help="embedding similarity, clusters, losses, consistency -> report.html")
    an.add_argument("run")
    an.add_argument("--windows", type=_positive_int, default=16,
                    help="validation windows used for the consistency figures")

    x = sub.add_parser("extract", help="save one sub-model as a standalone dense run folder")
    x.add_argument("run")
    x.add_argument("--level", type=int, required=True)
    x.add_argument("--index", type=int, required=True)
    x.add_argument("--out", required=True)

    mg = sub.add_parser("merge", help="glue trained runs into a wider FractalFormer (frozen children)")
    mg.add_argument("runs", nargs="+", metavar="RUN", help="runs of one shape: the level-1 sub-models")
    mg.add_argument("--out", required=True)
    mg.add_argument("--train-glue-steps", type=_positive_int, default=0, metavar="N",
                    help="train only the glue (off-diagonal blocks) for N steps, the children frozen")
    mg.add_argument("--then-steps", type=_positive_int, default=0, metavar="M",
                    help="then train everything for M steps (a new warmup + cosine schedule)")
    mg.add_argument("--attn-nesting", choices=("heads", "head_dim"), default="heads",
                    help="attention nesting of the merged model when the runs are dense (default heads)")
    mg.add_argument("--glue-rank", type=_positive_int, default=0, metavar="R",
                    help="glue as rank-R maps between the blocks, folded into the weights after the glue "
                         "steps (0: the off-diagonal blocks themselves)")
    mg.add_argument("--routing", choices=("shared", "split", "shard"),
                    help="data routing of the merged run (default: shard when run j trained on data_shard "
                         "j/N, else shared)")
    mg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training key of the merged run (lr, batch_size, ...; repeatable)")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")

    gr = sub.add_parser("grow", help="function-preserving growth: the run becomes sub-model (1, 0)")
    gr.add_argument("run")
    gr.add_argument("--width", type=_positive_int, required=True, help="width factor (the split, >= 2)")
    gr.add_argument("--depth", type=_positive_int, default=1, help="depth factor (identity layers inserted)")
    gr.add_argument("--out", required=True)
    gr.add_argument("--steps", type=_positive_int, default=0, help="then train for this many steps")
    gr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a training key of the grown run (lr, batch_size, ...; repeatable)")
    gr.add_argument("--quiet", action="store_true", help="no progress bar")

    sv = sub.add_parser("serve", help="HTTP API and a page for every sub-model (batched; needs [serve])")
    sv.add_argument("run")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=_positive_int, default=16, help="requests decoded together")
    sv.add_argument("--queue-size", type=_positive_int, default=64,
                    help="requests that may wait beyond those; more are refused with 503")
    sv.add_argument("--max-tokens", type=_positive_int, default=1024, help="the most tokens one request gets")
    sv.add_argument("--max-prompt-chars", type=_positive_int, default=8192)
    return p


def cmd_train(a: argparse.Namespace) -> int:
    from .config import build_config, load_toml, parse_set
    from .data import read_text
    from .tokenizers import get_tokenizer
    from .train import train

    if a.resume:
        if not a.out:
            raise FractalError("--resume needs --out RUN_DIR")
        if a.preset or a.config or a.set or a.data or a.tokenizer:
            raise FractalError("--resume continues a run with its saved config; only --max-steps "
                               "may change")
        from .checkpoint import load_run_config

        cfg, _ = load_run_config(Path(a.out))
    else:
        sets = list(a.set)
        if a.data:
            sets.append(f"data={a.data}")
        if a.tokenizer:
            sets.append(f"tokenizer={a.tokenizer}")
        cfg = build_config(a.preset, a.config, sets)
        explicit = set(parse_set(sets)) | (set(load_toml(a.config)) if a.config else set())
        if not explicit & {"vocab_size", "model.vocab_size"}:
            cfg.model.vocab_size = get_tokenizer(cfg.train.tokenizer, read_text(cfg.train.data)).vocab_size
    if a.max_steps is not None:
        if a.max_steps < 1:
            raise FractalError("--max-steps must be at least 1")
        cfg.train.max_steps = a.max_steps
    out = Path(a.out or f"runs/{a.preset or (Path(a.config).stem if a.config else 'default')}"
                         f"-{time.strftime('%Y%m%d-%H%M%S')}")
    result = train(cfg, out, resume=a.resume, stop_after=a.stop_after, progress=not a.quiet)
    if result.stopped != "done":
        why = "interrupted" if result.stopped == "interrupted" else "stopped"
        print(f"{why} at step {result.step}; saved to {out}. Continue with: "
              f"fractalformer train --out {out} --resume")
        return 130 if result.stopped == "interrupted" else 0
    if result.final is not None:
        for f in result.final:
            who = "" if len(result.final) == 1 else f"sub-model ({f.level}, {f.index}) width {f.width}: "
            print(f"validation {who}{f.val_loss:.4f} nats/token | {f.val_bpc:.4f} bits/{f.unit} | "
                  f"{f.nats_per_char:.4f} nats/{f.unit} ({f.tokens:,} tokens)")
            if f.extra:
                print(_usage_line(f.extra))
        print(f"curves: {out / 'curves.png'}")
        if cfg.train.sample_tokens:
            import fractalformer

            model = fractalformer.load(out)
            for f in result.final:
                if f.index == "ensemble":
                    continue
                print(f"--- sample from sub-model ({f.level}, {f.index}), width {f.width}:"
                      if len(result.final) > 1 else "--- sample:")
                _stream(model, "\n", cfg.train.sample_tokens, 0.8, None, None, 0, "replace", False,
                        f.level, f.index)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import fractalformer

    from .evaluate import evaluate_full
    from .train.trainer import prepare_data

    model = fractalformer.load(a.run)
    cfg = model.run_config
    _, corpus = prepare_data(cfg, model.tokenizer)
    rows = evaluate_full(model, corpus, cfg.model.block_size)
    if a.json:
        print(json.dumps([r.to_json() for r in rows]))
        return 0
    unit = model.tokenizer.unit
    print(f"{'level':>5} {'index':>8} {'width':>6} {'params':>10} {'val_loss':>9} {'val_bp' + unit[0]:>8}")
    for r in rows:
        print(f"{r.level:>5} {r.index!s:>8} {r.width:>6} {r.params:>10,} {r.val_loss:>9.4f} "
              f"{r.val_bpc:>8.4f}")
    print(f"({rows[0].tokens:,} validation tokens; loss in nats/token, bits per {unit})")
    if rows[0].extra:
        print(_usage_line(rows[0].extra))
    return 0


def _usage_line(u: dict) -> str:
    line = (f"experts: {u['expert_usage']:.1%} used, KL from uniform {u['expert_kl']:.3f} nats, "
            f"{u['dead_experts']:.1%} dead (mean over sparse layers)")
    if "mean_depth" in u:
        line += (f"; fractal experts: mean depth {u['mean_depth']:.2f}, {u['compute_saved']:.1%} of "
                 "sub-blocks skipped")
    return line


def _stream(model: torch.nn.Module, prompt: str, n: int, temperature: float, top_k: int | None,
            top_p: float | None, seed: int | None, unknown: str, no_cache: bool,
            level: int = 0, index: int | str = 0) -> None:
    from .generate import generate

    model.nest.check(level, 0 if index == "ensemble" else int(index))
    tok = model.tokenizer
    ids = tok.encode(prompt, on_unknown=unknown)
    if not ids:
        raise FractalError("the prompt is empty")
    decode = tok.stream_decoder()
    sys.stdout.write(prompt)
    for i in generate(model, ids, n, temperature, top_k, top_p, seed, use_cache=not no_cache,
                      level=level, index=index):
        sys.stdout.write(decode(i))
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_sample(a: argparse.Namespace) -> int:
    _check_sampling(a.temperature, a.top_k, a.top_p)
    import fractalformer

    _stream(fractalformer.load(a.run), a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
            a.seed, a.unknown, a.no_cache, a.level, "ensemble" if a.ensemble else a.index)
    return 0


def cmd_speculate(a: argparse.Namespace) -> int:
    import fractalformer

    from .generate import SpecStats, generate, speculate
    from .generate.speculative import parse_sub_model

    temperature = a.temperature if a.temperature is not None else 0.0
    _check_sampling(temperature, a.top_k, a.top_p)
    model = fractalformer.load(a.run)
    tok = model.tokenizer
    drafts = [parse_sub_model(d, model) for d in a.draft]
    target = parse_sub_model(a.target, model)
    ids = tok.encode(a.prompt, on_unknown=a.unknown)
    stats = SpecStats()
    decode = tok.stream_decoder()
    out = []
    t0 = time.perf_counter()
    if not a.json:
        sys.stdout.write(a.prompt)
    for i in speculate(model, ids, a.max_new_tokens, drafts, a.gamma, target, temperature, a.top_k, a.top_p,
                       a.seed, adaptive=not a.no_adaptive, confidence=a.confidence, stats=stats):
        out.append(decode(i))
        if not a.json:
            sys.stdout.write(out[-1])
            sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    report = {**stats.to_json(), "tokens_per_s": round(stats.tokens / elapsed, 1)}
    if a.compare:
        t0 = time.perf_counter()
        n = sum(1 for _ in generate(model, ids, a.max_new_tokens, temperature, a.top_k, a.top_p, a.seed,
                                    level=target[0], index=target[1]))
        report["plain_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
        report["speedup"] = round(report["tokens_per_s"] / report["plain_tokens_per_s"], 3)
    if a.json:
        print(json.dumps({"text": a.prompt + "".join(out), **report}))
    else:
        print("\n" + " | ".join(f"{k} {v}" for k, v in report.items()), file=sys.stderr)
    return 0


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise FractalError(f"--temperature must not be negative, got {temperature}")
    if top_k is not None and top_k < 1:
        raise FractalError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise FractalError(f"--top-p must lie in (0, 1], got {top_p}")


def cmd_analyze(a: argparse.Namespace) -> int:
    from .analysis.report import analyze

    print(f"report: {analyze(a.run, max(1, a.windows))}")
    return 0


def cmd_extract(a: argparse.Namespace) -> int:
    import fractalformer

    from .checkpoint import save_model, save_run_config, save_train_state
    from .config import RunConfig
    from .train import make_optimizer

    out = Path(a.out)
    if (out / "config.json").exists():
        raise FractalError(f"{out} already holds a run; choose another --out")
    model = fractalformer.load(a.run)
    sub = model.extract(a.level, a.index)
    train = dataclasses.replace(model.run_config.train, groups="", emergent_every=0, routing="shared",
                                freeze="none", schedule_start=0)
    cfg = RunConfig(sub.config, train)
    cfg.validate()
    save_run_config(out, cfg, model.tokenizer)
    save_model(out, sub, 0)
    # a fresh training state, so `fractalformer train --out DIR --resume` trains it further
    save_train_state(out, make_optimizer(sub, cfg), {"step": 0, "model_step": 0, "elapsed_s": 0.0})
    print(f"extracted sub-model ({a.level}, {a.index}): {sub.num_params():,} parameters, width "
          f"{sub.config.d_model} -> {out}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .evaluate import sub_model_params
    from .growth import merge_runs

    model = merge_runs(a.runs, a.out, a.train_glue_steps, a.then_steps, a.attn_nesting, a.routing,
                       a.glue_rank, a.set, not a.quiet)
    c = model.config
    print(f"merged {len(a.runs)} runs -> {a.out}: FractalFormer d_model {c.d_model}, levels {c.levels}, "
          f"{model.num_params():,} parameters ({sub_model_params(model, 1):,} per child; "
          f"glue steps {a.train_glue_steps}, full steps {a.then_steps})")
    return 0


def cmd_grow(a: argparse.Namespace) -> int:
    from .growth import grow_run

    f = grow_run(a.run, a.out, a.width, a.depth, a.steps, a.set, not a.quiet)
    print(f"grown x{a.width} wide, x{a.depth} deep -> {a.out}; validation at the growth step: original "
          f"{f['original_val_loss']:.6f} nats/token ({f['original_val_bpc']:.4f} bits/char), grown "
          f"{f['grown_val_loss']:.6f} ({f['grown_val_bpc']:.4f}); difference "
          f"{abs(f['grown_val_loss'] - f['original_val_loss']):.2e}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .serve import Limits, serve
    except ImportError as e:
        raise FractalError(f"fractalformer serve needs the serve extra ({e.name} is missing): "
                           f"pip install 'fractalformer[serve]'") from None
    if min(a.max_batch, a.queue_size, a.max_tokens, a.max_prompt_chars) < 1:
        raise FractalError("--max-batch, --queue-size, --max-tokens and --max-prompt-chars must be "
                           "at least 1")
    serve(a.run, a.host, a.port, Limits(a.max_tokens, a.max_prompt_chars, a.max_batch, a.queue_size))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "extract": cmd_extract,
                    "speculate": cmd_speculate, "analyze": cmd_analyze, "serve": cmd_serve,
                    "merge": cmd_merge, "grow": cmd_grow}
        return commands[args.command](args)
    except FractalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
