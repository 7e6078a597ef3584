"""Greedy captions of a trained CoCa checkpoint, scored against the scenes.

    python experiments/coca_captions.py --config configs/default.py:coca --workdir workdirs/coca \
        [--split test_seen] [--max_examples 1000] [--config.a.b=value ...]

On the single-object scenes of the embedded dataset (``single_class``), the
greedy caption (``CoCa.captions``, one beam) is decoded and checked word by word
against the scene's class name ("red circle"): the colour word present, the
shape word present, both. Chance is one colour in 8 and one shape in 5 for a
caption that names one of each.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vlm_jax import config as config_lib, rules, session  # noqa: E402
from vlm_jax.data import pipeline, scenes  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test_seen")
    p.add_argument("--max_examples", type=int, default=1000)
    args, rest = p.parse_known_args(argv)
    cfg = config_lib.load_config(args.config, [o[len("--config."):] for o in rest if o.startswith("--config.")])
    run = session.setup(cfg)
    if not hasattr(run.objective, "captions"):
        raise SystemExit(f"error: loss.kind={cfg.loss.kind!r} has no caption decoder (use configs/default.py:coca)")
    flat, step = rules.load_params(args.workdir)
    params = rules._unflat({k: jnp.asarray(v) for k, v in flat.items()})
    data = pipeline.load_split(run.ds, cfg.data, args.split, cfg.model.text.max_len, args.max_examples)
    keep = data["single_class"].astype(bool)
    images, labels = data["image"][keep], data["label"][keep]
    tok = run.ds.tokenizer
    generate = jax.jit(lambda p, x: run.objective.captions(p, pipeline.normalize_images(x), tok.eos_id))
    rows = np.concatenate([np.asarray(generate(params, jnp.asarray(images[i:i + 256])))
                           for i in range(0, len(images), 256)])
    names = scenes.composition_names()
    colour_ok, shape_ok, texts = [], [], []
    for ids, label in zip(rows, labels):
        ids = [int(i) for i in ids if i != 0]
        ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        text = tok._sp.decode([i - tok._offset for i in ids])
        words = [scenes._PLURALS.get(w, w) for w in text.split()]  # "two red circles" names circles too
        colour, shape = names[int(label)].split()
        colour_ok.append(colour in words)
        shape_ok.append(shape in words)
        texts.append(text)
    c, s = np.asarray(colour_ok), np.asarray(shape_ok)
    out = {"step": step, "examples": int(len(c)), "colour": float(c.mean()), "shape": float(s.mean()),
           "both": float((c & s).mean())}
    print(f"step {step}, {args.split}, {len(c)} single-object scenes: colour {100 * out['colour']:.1f} %, "
          f"shape {100 * out['shape']:.1f} %, both {100 * out['both']:.1f} % (chance 12.5 / 20 / 2.5 %)")
    for text, label in list(zip(texts, labels))[:8]:
        print(f"  {names[int(label)]:>16s}  ->  {text}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
