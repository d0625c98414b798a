"""The data statistics the preflight prints (and ``ia3-dist prepare``): records, examples, drops, truncation,
lengths, label tokens, and where the tokens came from."""

from __future__ import annotations

import os

import numpy as np

from ..config import RunConfig
from .tokens import TokenizedData


def data_lines(d: TokenizedData, cfg: RunConfig) -> list[str]:
    """The data statistics: records, examples, drops, truncation, lengths, label tokens, where the tokens came
    from."""
    lens = d.lengths
    pct = np.percentile(lens, [50, 90, 99]).round().astype(int).tolist()
    n_labels = d.label_tokens()
    sources = (", ".join(f"{src} ({fmt})" for src, fmt in d.formats.items()) if d.formats
               else str(cfg.data.path))
    n_skipped = d.skipped_total if d.skipped_total is not None else len(d.skipped)
    if d.seconds == 0:
        origin = f"from cache {d.cache_file}" if d.cache_file else "from cache"
    else:
        origin = (f"tokenized in {d.seconds:.2f}s ({(d.n_records + n_skipped) / d.seconds:,.0f} records/s)"
                  + (f" into {d.cache_file}" if d.cache_file else ""))
    return [
        f"data: {d.n_records + n_skipped} records read from {sources}"
        + (f"; {n_skipped} bad records skipped (data.on_bad_record=skip), first: "
           + "; ".join(d.skipped[:3]) if n_skipped else ""),
        (f"  {len(d)} preference pairs (2 rows each); {len(d.dropped)} dropped (the prompt left no answer token on a "
         f"side, or the two sides the same tokens, after truncation to data.max_length)" if d.group == 2 else
         f"  {len(d)} examples; {len(d.dropped)} dropped (no label token after truncation, data.unlabeled=drop"
         + (f"; {d.answerless} of them weight 0 on every answer to train on, data.train_on={cfg.data.train_on}"
            if d.answerless and len(d.dropped) else "") + ")")
        + (f", first{_places(d.dropped_where)}" if d.dropped_where else "")
        + (f"; {d.unlabeled} kept with no label token (data.unlabeled=keep, as the reference recipe"
           + (f"; {d.answerless} of them weight 0 on every answer to train on" if d.answerless else "") + ")"
           if d.unlabeled and not len(d.dropped) else ""),
        f"  truncated at {cfg.data.max_length}: {d.truncated} ({100.0 * d.truncated / max(d.n_records, 1):.1f}%); "
        f"length p50 {pct[0]} p90 {pct[1]} p99 {pct[2]} max {int(lens.max())}; {n_labels} label tokens; " + origin,
        *([f"  {single} example(s) train on one label token: an empty answer (its end token alone, kept as the "
           f"reference recipe keeps it), or a one-token answer without data.append_eos, or one cut to a token by "
           f"truncation"]
          if (single := d.single_label_examples()) else []),
        *(d.mix.lines() if d.mix is not None else []),
        *([f"  {d.held_copies} example(s) left out of training: copies of held-out examples (data.eval_ratio; the "
           f"eval would score what the run trained on)"] if d.held_copies else []),
        *_template_note(cfg),
    ]


def _places(wheres: list[str]) -> str:
    """Where records were read (``file:line``, ``file: record N``), the file said once when they share it:
    ``, in f.jsonl: line 3, line 9`` rather than ``: f.jsonl:3; f.jsonl:9``."""
    cut = os.path.commonprefix(wheres).rfind(":")
    rest = [w[cut + 1:].strip() for w in wheres]
    if len(wheres) < 2 or cut < 1 or not all(rest):
        return ": " + "; ".join(wheres)
    return f", in {wheres[0][:cut]}: " + ", ".join(f"line {r}" if r.isdigit() else r for r in rest)


def _template_note(cfg: RunConfig) -> list[str]:
    """A mixture whose every source sets a template other than data.template: the adapter saves data.template (what
    generate, chat and eval prompt it in), a format it never trained on."""
    if not cfg.data.sources:
        return []
    used = sorted({s.template or cfg.data.template for s in cfg.data.sources})
    if cfg.data.template in used:
        return []
    return [f"  note: the adapter's prompts at inference follow data.template ({cfg.data.template}), which no "
            f"source trains on (they use {', '.join(used)}); set data.template to the one to prompt it in"]
